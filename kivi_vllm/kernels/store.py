"""Store / quantize-on-write: one step's new K/V tokens into the KIVI pages (Triton).

Writes the same bytes as :func:`kivi_vllm.reference.store` (codes bit-exact, fp16 scale/min identical). One program
per KV head and R consecutive rows (``rows_per_program``): a token whose group does not complete in this step goes to
its page's stage (all R rows at once); the token that completes a group quantizes the whole group (keys per channel
over G tokens, values per token over Gv channels, KIVI paper §3.2) from the stage (tokens of earlier steps) and this
step's rows, and writes its record (the program's completing rows one after the other). Many sequences completing
groups in one step are handled by the same launch. Codes are ``(x - min) * (1 / scale)``, one IEEE reciprocal per
group (:func:`.common.quantize`; a division per element was a quarter of the kernel's instructions and, with its
slow-path branches, most of its latency: one group took 22 µs on the H200, 8.5 µs with the reciprocal).

Phases (why two launches at most). Only the group that is open when a request's step starts (its *first group*,
``g0 = context_len // G``) reads the stage; a later group of the same step may write that page's stage (the next
open group) or the page's last record, which shares bytes with the stage (residual="kv"). Phase 0 handles tokens
of first groups, phase 1 every other token, and phase 1 is launched after phase 0 (and after the attention that
reads the stage; the order is in :func:`kivi_vllm.kernels.forward`). A decode token is always in its first group, so a pure-decode
step is phase 0 only: one launch per layer.

In a pure-decode step on Hopper that launch is a programmatic dependent of the attention (``store(pdl=True)``, the
open group's launch lets it start): its programs load and quantize their first completing group, or load their
stage rows, while the attention runs, and wait for it (``griddepcontrol.wait``) before their first write.
"""

from __future__ import annotations

import functools
import itertools
from functools import partial

import numpy as np
import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from ..layout import PageLayout
from .common import check_cache, check_rows, find_request, layout_args, pack_rows, quantize, stage_dtype
from .decode import cuda_capability


@triton.jit
def _request_state(qsl_ptr, seq_lens_ptr, num_reqs, t, G: tl.constexpr, PHASE: tl.constexpr):
    """(position, context before the step, context after it, whether this phase stores row ``t``) of batch row(s)
    ``t`` (a scalar or a vector of rows; padding rows past the last request are never theirs: ``t < q_end``)."""
    r = find_request(qsl_ptr, num_reqs, t)
    q_start = tl.load(qsl_ptr + r)
    q_end = tl.load(qsl_ptr + r + 1)
    seq_len = tl.load(seq_lens_ptr + r)
    ctx = seq_len - (q_end - q_start)  # tokens cached before this step
    pos = ctx + (t - q_start)  # this token's position in its sequence
    first_group = (pos // G) == (ctx // G)
    return pos, ctx, seq_len, (t < q_end) & (first_group == (PHASE == 0))


@triton.jit
def _group_codes(kv_ptr, key_ptr, value_ptr, t, slot, pos, ctx, h, stride_cache_block, stride_cache_head,
                 stride_kt, stride_kh, stride_vt, stride_vh, STAGE_DTYPE: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, GROUP_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr,
                 HEAD_PAD: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr, V_GROUP: tl.constexpr,
                 RECORD_BYTES: tl.constexpr, OFF_KSTAGE: tl.constexpr, OFF_VSTAGE: tl.constexpr,
                 RESIDUAL_KV: tl.constexpr):
    """Row ``t`` (cache ``slot``, sequence position ``pos``, ``ctx`` tokens cached before the step) completes its
    group of KV head ``h``: gather the G tokens (earlier steps' from the stage, this step's from ``key``/``value``)
    and quantize them (keys per channel over the G tokens, values per token over channel groups of V_GROUP, KIVI
    paper §3.2). Reads only; :func:`_write_group` writes the result. Returns (the group's record, a uint8
    pointer; key codes [G, HEAD_PAD * K_BITS / 8] uint8, key scale and min [1, HEAD_PAD] fp16; with residual "kv"
    value codes [G, HEAD_PAD * V_BITS / 8] uint8, value scale and min [G, HEAD_PAD / V_GROUP, 1] fp16, else 0s)."""
    G: tl.constexpr = GROUP_SIZE
    NVG: tl.constexpr = HEAD_PAD // V_GROUP  # value channel groups per token (padded)
    t = t.to(tl.int64)  # row offsets: T x row stride may pass 2^31
    p = slot % G
    page = kv_ptr + (slot // BLOCK_SIZE) * stride_cache_block + h * stride_cache_head
    rec = page + ((slot % BLOCK_SIZE) // G) * RECORD_BYTES
    d = tl.arange(0, HEAD_PAD)
    m2 = (d < HEAD_SIZE)[None, :]
    i = tl.arange(0, G)
    from_step = (pos - p + i) >= ctx  # the group's positions written in this step
    rows = t - p + i  # their batch rows
    k_stage = (page + OFF_KSTAGE).to(tl.pointer_type(STAGE_DTYPE))
    k = tl.load(key_ptr + rows[:, None] * stride_kt + h * stride_kh + d[None, :],
                mask=from_step[:, None] & m2, other=0.0).to(STAGE_DTYPE).to(tl.float32)
    k_old = tl.load(k_stage + i[:, None] * HEAD_SIZE + d[None, :], mask=(~from_step[:, None]) & m2,
                    other=0.0).to(tl.float32)
    k = tl.where(from_step[:, None], k, k_old)
    # keys: per channel over the G tokens (padded channels are quantized but never stored)
    kq, ks, km = quantize(k, 0, K_BITS)
    kb = pack_rows(kq, G, HEAD_PAD, K_BITS)
    if RESIDUAL_KV:
        v_stage = (page + OFF_VSTAGE).to(tl.pointer_type(STAGE_DTYPE))
        v = tl.load(value_ptr + rows[:, None] * stride_vt + h * stride_vh + d[None, :],
                    mask=from_step[:, None] & m2, other=0.0).to(STAGE_DTYPE).to(tl.float32)
        v_old = tl.load(v_stage + i[:, None] * HEAD_SIZE + d[None, :], mask=(~from_step[:, None]) & m2,
                        other=0.0).to(tl.float32)
        v = tl.where(from_step[:, None], v, v_old)
        vb, vs, vm = _value_codes(tl.reshape(v, (G, NVG, V_GROUP)), G, HEAD_PAD, V_BITS)
    else:
        vb = 0
        vs = 0
        vm = 0
    return rec, kb, ks, km, vb, vs, vm


@triton.jit
def _write_group(rec, kb, ks, km, vb, vs, vm, GROUP_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr,
                 HEAD_PAD: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr, V_GROUP: tl.constexpr,
                 OFF_KC: tl.constexpr, OFF_KS: tl.constexpr, OFF_KM: tl.constexpr, OFF_VC: tl.constexpr,
                 OFF_VS: tl.constexpr, OFF_VM: tl.constexpr, RESIDUAL_KV: tl.constexpr):
    """Write a completed group's record ``rec`` from :func:`_group_codes` (keys; values with residual "kv"). The
    last record of a page shares bytes with the stage: the caller has read the stage (and, in the open group's
    step, the attention has) before this runs."""
    G: tl.constexpr = GROUP_SIZE
    i = tl.arange(0, G)
    d = tl.arange(0, HEAD_PAD)
    nbk = tl.arange(0, HEAD_PAD * K_BITS // 8)
    tl.store(rec + OFF_KC + i[:, None] * (HEAD_SIZE * K_BITS // 8) + nbk[None, :], kb,
             mask=nbk[None, :] < HEAD_SIZE * K_BITS // 8)
    tl.store((rec + OFF_KS).to(tl.pointer_type(tl.float16)) + d, tl.reshape(ks, (HEAD_PAD,)), mask=d < HEAD_SIZE)
    tl.store((rec + OFF_KM).to(tl.pointer_type(tl.float16)) + d, tl.reshape(km, (HEAD_PAD,)), mask=d < HEAD_SIZE)
    if RESIDUAL_KV:
        _write_values(rec + i * 0, i, i >= 0, vb, vs, vm, G, HEAD_SIZE, HEAD_PAD, V_BITS, V_GROUP, OFF_VC, OFF_VS,
                      OFF_VM)


@triton.jit
def _value_codes(v, R: tl.constexpr, HEAD_PAD: tl.constexpr, V_BITS: tl.constexpr):
    """Quantize the values ``v`` [R, HEAD_PAD / V_GROUP, V_GROUP] float32 per token over each channel group: (codes
    [R, HEAD_PAD * V_BITS / 8] uint8, scale and min [R, HEAD_PAD / V_GROUP, 1] fp16)."""
    vq, vs, vm = quantize(v, 2, V_BITS)
    return pack_rows(tl.reshape(vq, (R, HEAD_PAD)), R, HEAD_PAD, V_BITS), vs, vm


@triton.jit
def _write_values(rec, i, row_mask, vb, vs, vm, R: tl.constexpr, HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr,
                  V_BITS: tl.constexpr, V_GROUP: tl.constexpr, OFF_VC: tl.constexpr, OFF_VS: tl.constexpr,
                  OFF_VM: tl.constexpr):
    """Write values quantized by :func:`_value_codes` as rows ``i`` [R] of the records ``rec`` ([R] uint8
    pointers), where ``row_mask`` [R]."""
    NVG: tl.constexpr = HEAD_PAD // V_GROUP
    nbv = tl.arange(0, HEAD_PAD * V_BITS // 8)
    tl.store(rec[:, None] + OFF_VC + i[:, None] * (HEAD_SIZE * V_BITS // 8) + nbv[None, :], vb,
             mask=row_mask[:, None] & (nbv[None, :] < HEAD_SIZE * V_BITS // 8))
    ci = tl.arange(0, NVG)
    off = i[:, None] * (HEAD_SIZE // V_GROUP) + ci[None, :]
    cmask = row_mask[:, None] & (ci[None, :] < HEAD_SIZE // V_GROUP)
    tl.store((rec[:, None] + OFF_VS).to(tl.pointer_type(tl.float16)) + off, tl.reshape(vs, (R, NVG)), mask=cmask)
    tl.store((rec[:, None] + OFF_VM).to(tl.pointer_type(tl.float16)) + off, tl.reshape(vm, (R, NVG)), mask=cmask)


@triton.jit
def _arrivals(key_ptr, value_ptr, t64, h, mine, staged, stride_kt, stride_kh, stride_vt, stride_vh,
              R: tl.constexpr, HEAD_PAD: tl.constexpr, HEAD_SIZE: tl.constexpr, V_BITS: tl.constexpr,
              V_GROUP: tl.constexpr, RESIDUAL_KV: tl.constexpr):
    """This step's rows ``t64`` [R] of KV head ``h`` as they are written on arrival: (keys to stage [R, HEAD_PAD]
    where ``staged``; values to stage likewise with residual "kv"; with residual "k" every value where ``mine``
    quantized per token (codes, scale, min of :func:`_value_codes`), else 0s). Reads only."""
    NVG: tl.constexpr = HEAD_PAD // V_GROUP
    d = tl.arange(0, HEAD_PAD)
    dmask = (d < HEAD_SIZE)[None, :]
    kx = tl.load(key_ptr + t64[:, None] * stride_kt + h * stride_kh + d[None, :], mask=staged)
    if RESIDUAL_KV:
        vx = tl.load(value_ptr + t64[:, None] * stride_vt + h * stride_vh + d[None, :], mask=staged)
        vb = 0
        vs = 0
        vm = 0
    else:  # residual="k": every value is quantized per token on arrival into its record row
        vx = 0
        v = tl.load(value_ptr + t64[:, None] * stride_vt + h * stride_vh + d[None, :], mask=mine[:, None] & dmask,
                    other=0.0).to(tl.float32)
        vb, vs, vm = _value_codes(tl.reshape(v, (R, NVG, V_GROUP)), R, HEAD_PAD, V_BITS)
    return kx, vx, vb, vs, vm


@triton.jit
def _write_arrivals(page, slot, p, mine, staged, kx, vx, vb, vs, vm, STAGE_DTYPE: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, GROUP_SIZE: tl.constexpr, R: tl.constexpr, HEAD_SIZE: tl.constexpr,
                    HEAD_PAD: tl.constexpr, V_BITS: tl.constexpr, V_GROUP: tl.constexpr, RECORD_BYTES: tl.constexpr,
                    OFF_VC: tl.constexpr, OFF_VS: tl.constexpr, OFF_VM: tl.constexpr, OFF_KSTAGE: tl.constexpr,
                    OFF_VSTAGE: tl.constexpr, RESIDUAL_KV: tl.constexpr):
    """Write :func:`_arrivals`' rows: staged keys (and values) at stage index ``p`` of ``page`` [R]; with residual
    "k" the quantized values into their record rows."""
    G: tl.constexpr = GROUP_SIZE
    d = tl.arange(0, HEAD_PAD)
    if not RESIDUAL_KV:
        rec = page + ((slot % BLOCK_SIZE) // G) * RECORD_BYTES
        _write_values(rec, p, mine, vb, vs, vm, R, HEAD_SIZE, HEAD_PAD, V_BITS, V_GROUP, OFF_VC, OFF_VS, OFF_VM)
    k_stage = (page + OFF_KSTAGE).to(tl.pointer_type(STAGE_DTYPE))
    tl.store(k_stage[:, None] + p[:, None] * HEAD_SIZE + d[None, :], kx.to(STAGE_DTYPE), mask=staged)
    if RESIDUAL_KV:
        v_stage = (page + OFF_VSTAGE).to(tl.pointer_type(STAGE_DTYPE))
        tl.store(v_stage[:, None] + p[:, None] * HEAD_SIZE + d[None, :], vx.to(STAGE_DTYPE), mask=staged)


# the counts are not specialized (Triton would compile another kernel for a count of 1 or a multiple of 16: in the
# middle of serving, as prompt chunks list their rows; vLLM's JIT monitor saw it, fourteenth session)
@triton.jit(do_not_specialize=["num_reqs", "num_rows"])
def _store_kernel(
    kv_ptr, key_ptr, value_ptr, slot_ptr, qsl_ptr, seq_lens_ptr, num_reqs, num_rows,
    stride_cache_block, stride_cache_head, stride_kt, stride_kh, stride_vt, stride_vh,
    STAGE_DTYPE: tl.constexpr, PHASE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, GROUP_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, V_GROUP: tl.constexpr, RECORD_BYTES: tl.constexpr,
    OFF_KC: tl.constexpr, OFF_KS: tl.constexpr, OFF_KM: tl.constexpr, OFF_VC: tl.constexpr,
    OFF_VS: tl.constexpr, OFF_VM: tl.constexpr, OFF_KSTAGE: tl.constexpr, OFF_VSTAGE: tl.constexpr,
    RESIDUAL_KV: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr = 1, ROWS: tl.constexpr = False, rows_ptr=None,
    PDL: tl.constexpr = False,
):
    """Rows ``program_id(0) * ROWS_PER_PROGRAM ..`` (of the batch, or of ``rows_ptr`` with ``ROWS``) of KV head
    ``program_id(1)``: the rows that complete a group, one after the other, gather and quantize it
    (:func:`_group_codes`) and write its record; after the first of them (or at once, without one) every row's
    arrival (:func:`_arrivals`: its stage row or, residual="k", its quantized values), all rows at once.
    ``PDL``: launched as a programmatic dependent of the attention that reads the stage (the decode step's open
    group, :data:`kivi_vllm.kernels.decode.PDL`), the program waits for it (``griddepcontrol.wait``) before its
    first write: the first group's loads and quantization (or, without one, the arrivals' loads) overlap it.
    Every program waits."""
    R: tl.constexpr = ROWS_PER_PROGRAM
    G: tl.constexpr = GROUP_SIZE
    h = tl.program_id(1)
    j = tl.program_id(0) * R + tl.arange(0, R)
    listed = j < num_rows
    t = tl.load(rows_ptr + j, mask=listed, other=0) if ROWS else j
    slot = tl.load(slot_ptr + t, mask=listed, other=-1)
    busy = slot >= 0
    # (t, not the slot, decides the request: the slot and the request loads go out together)
    pos, _ctx, seq_len, mine = _request_state(qsl_ptr, seq_lens_ptr, num_reqs, t, G, PHASE)
    mine = mine & busy
    p = slot % G
    page = kv_ptr + (slot // BLOCK_SIZE) * stride_cache_block + h * stride_cache_head  # [R]
    d = tl.arange(0, HEAD_PAD)
    dmask = (d < HEAD_SIZE)[None, :]
    t64 = t.to(tl.int64)
    # a token whose group stays open after this step: staged exactly (index = position mod G)
    staged = (mine & (p != G - 1) & (pos - p + G > seq_len))[:, None] & dmask
    # the rows that complete their group (a bit mask, a warp-uniform scalar), quantized one after the other
    completes = mine & (p == G - 1)
    lane = tl.arange(0, R)
    first = tl.min(tl.where(completes, lane, R), axis=0)
    heavy = tl.sum(tl.where(completes, 1 << lane, 0), axis=0)
    if first == R:  # none: the arrivals' loads are what overlaps the attention
        kx, vx, avb, avs, avm = _arrivals(key_ptr, value_ptr, t64, h, mine, staged, stride_kt, stride_kh, stride_vt,
                                         stride_vh, R, HEAD_PAD, HEAD_SIZE, V_BITS, V_GROUP, RESIDUAL_KV)
        if PDL:
            gdc_wait()
        _write_arrivals(page, slot, p, mine, staged, kx, vx, avb, avs, avm, STAGE_DTYPE, BLOCK_SIZE, GROUP_SIZE, R,
                        HEAD_SIZE, HEAD_PAD, V_BITS, V_GROUP, RECORD_BYTES, OFF_VC, OFF_VS, OFF_VM, OFF_KSTAGE,
                        OFF_VSTAGE, RESIDUAL_KV)
    for jj in range(R):
        if (heavy >> jj) & 1:
            tj = tl.load(rows_ptr + tl.program_id(0) * R + jj) if ROWS else tl.program_id(0) * R + jj
            slot_j = tl.load(slot_ptr + tj).to(tl.int64)
            pos_j, ctx_j, _seq_j, _mine_j = _request_state(qsl_ptr, seq_lens_ptr, num_reqs, tj, G, PHASE)
            rec, kb, ks, km, vb, vs, vm = _group_codes(
                kv_ptr, key_ptr, value_ptr, tj, slot_j, pos_j, ctx_j, h, stride_cache_block, stride_cache_head,
                stride_kt, stride_kh, stride_vt, stride_vh, STAGE_DTYPE, BLOCK_SIZE, GROUP_SIZE, HEAD_SIZE, HEAD_PAD,
                K_BITS, V_BITS, V_GROUP, RECORD_BYTES, OFF_KSTAGE, OFF_VSTAGE, RESIDUAL_KV)
            if PDL and jj == first:
                gdc_wait()  # the attention that reads the stage (and the last record's bytes) has finished
            tl.debug_barrier()  # this program's stage reads happen before the record write below (shared bytes)
            _write_group(rec, kb, ks, km, vb, vs, vm, GROUP_SIZE, HEAD_SIZE, HEAD_PAD, K_BITS, V_BITS, V_GROUP,
                         OFF_KC, OFF_KS, OFF_KM, OFF_VC, OFF_VS, OFF_VM, RESIDUAL_KV)
            if jj == first:  # the arrivals after the first group: its tiles and theirs are never live together
                kx, vx, avb, avs, avm = _arrivals(key_ptr, value_ptr, t64, h, mine, staged, stride_kt, stride_kh,
                                                 stride_vt, stride_vh, R, HEAD_PAD, HEAD_SIZE, V_BITS, V_GROUP,
                                                 RESIDUAL_KV)
                _write_arrivals(page, slot, p, mine, staged, kx, vx, avb, avs, avm, STAGE_DTYPE, BLOCK_SIZE,
                                GROUP_SIZE, R, HEAD_SIZE, HEAD_PAD, V_BITS, V_GROUP, RECORD_BYTES, OFF_VC, OFF_VS,
                                OFF_VM, OFF_KSTAGE, OFF_VSTAGE, RESIDUAL_KV)


def store_rows(query_start_loc: np.ndarray, seq_lens: np.ndarray, group_size: int) -> np.ndarray:
    """The batch rows a store has work for (int32, ascending), from host arrays (``query_start_loc`` [num_reqs + 1],
    ``seq_lens`` [num_reqs], context after the step): a token that completes its group (position ``p % G == G -
    1``) or stays in its request's open group (``p >= (seq_len // G) * G``), and every token of a one-token
    request (a decode token always does one or the other; kept whatever the host's length says). Every other
    token is quantized by the token that completes its group, from ``key``/``value``, and needs no program of its
    own. For residual="kv" only
    (with "k" every value is quantized on arrival). In a prompt chunk that is about 1 token in G: a grid of one
    program per token was mostly programs without work, 752 of the 1,196 µs of a 4 x 4,096-token Llama-2-7B-shaped
    store on the H200 (``benchmarks/prefill_attention.py --store-probe``, every slot -1; docs/benchmarks.md)."""
    qsl = np.asarray(query_start_loc, dtype=np.int64)
    seq = np.asarray(seq_lens[: len(qsl) - 1], dtype=np.int64)
    lens = np.diff(qsl)
    req = np.repeat(np.arange(len(lens)), lens)
    row = np.arange(int(qsl[-1] - qsl[0])) + qsl[0]
    pos = seq[req] - lens[req] + (row - qsl[req])
    work = (pos % group_size == group_size - 1) | (pos >= (seq[req] // group_size) * group_size)
    work |= lens[req] == 1  # a one-token request always has work (vLLM's host lengths are exact for prefill rows)
    return row[work].astype(np.int32)


def store(
    kv_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    layout: PageLayout,
    phase: int,
    num_reqs: int | None = None,
    num_warps: int = 4,
    rows: torch.Tensor | None = None,
    rows_per_program: int | None = None,
    pdl: bool = False,
) -> None:
    """Write this step's tokens of one phase (see the module docstring) into the KIVI pages, in place.

    Args:
        kv_cache: [num_blocks, num_kv_heads, layout.page_bytes] uint8 (this layer's pages).
        key, value: [T, num_kv_heads, head_size] in the model dtype (T may include padding rows).
        slot_mapping: [T] int64 ``block_id * block_size + offset``; -1 (padding) is skipped.
        query_start_loc: [num_reqs + 1] int32 on the device; request r owns rows [qsl[r], qsl[r+1]).
        seq_lens: [num_reqs] int32, context length after this step.
        layout: the page layout (bytes from :class:`PageLayout`).
        phase: 0 = tokens of each request's first group (reads the stage), 1 = the others (launch after 0).
        num_reqs: requests to consider (default ``len(seq_lens)``).
        num_warps: warps per program (Triton's; a group's [G, head_size] keys and values spread over them).
        rows: residual="kv" only: int32 [N] on the device, the rows with work (:func:`store_rows`); the programs
            take the listed rows instead of every row of ``key``. None: every row.
        rows_per_program: rows (a power of two, at most 32: a bit each in one int32) per program and KV head; None:
            :func:`rows_per_program_for` this launch (1 with ``rows``).
        pdl: launch as a programmatic dependent of the previous kernel (Triton's ``launch_pdl``; compute
            capability 9.0+; the interpreter cannot run its wait): the programs load and quantize while it runs and
            wait for it before writing. For the decode step's store after the attention's open group
            (:func:`kivi_vllm.kernels.forward`, where :func:`kivi_vllm.kernels.decode.pdl_for` decides). Their
            loads before the wait (key, value, slots, the stage) must not be written by that kernel or any kernel
            still running: true there, since the decode's first launch is a plain one.

    Raises:
        ValueError: wrong cache shape/dtype, key/value shapes that do not match the layout, key/value not
            contiguous in head_size, ``rows`` with residual="k" or not int32, ``rows_per_program`` not a power
            of two in [1, 32], ``pdl`` on a CUDA GPU of compute capability below 9.0.
    """
    check_cache(kv_cache, layout)
    T, H, D = key.shape
    if value.shape != key.shape or D != layout.head_size or H != kv_cache.shape[1]:
        raise ValueError(f"KIVI store: key {tuple(key.shape)} / value {tuple(value.shape)} do not match "
                         f"{kv_cache.shape[1]} KV heads of size {layout.head_size}")
    check_rows(key, value)
    n = len(seq_lens) if num_reqs is None else num_reqs
    if rows is not None and (layout.residual != "kv" or rows.dtype != torch.int32):
        raise ValueError(f"KIVI store: rows need residual 'kv' and int32, got {layout.residual!r}, {rows.dtype}")
    num_rows = T if rows is None else rows.numel()
    if rows_per_program is not None:
        per = int(rows_per_program)
    else:  # listed rows (steps with prompt chunks) mostly complete a group: quantized in parallel, one per program
        # (H200, fourteenth session, prefill_attention.py --store-rows-per-program 1 2 4 16: 16 rows per program
        # took 0.99-1.40x the time of 1; and one value means one compiled specialization, not one per row count)
        per = 1 if rows is not None else rows_per_program_for(num_rows, H, kv_cache.device)
    if per < 1 or per > 32 or per & (per - 1):
        raise ValueError(f"KIVI store: rows_per_program must be a power of two in [1, 32], got {per}")
    cap = cuda_capability(kv_cache.device) if pdl else None
    if cap is not None and cap < (9, 0):
        raise ValueError(f"KIVI store: pdl (griddepcontrol) needs compute capability 9.0 or newer, not {cap}")
    if num_rows == 0 or n == 0:
        return
    _store_kernel[(triton.cdiv(num_rows, per), H)](
        kv_cache, key, value, slot_mapping, query_start_loc, seq_lens, n, num_rows,
        kv_cache.stride(0), kv_cache.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        STAGE_DTYPE=stage_dtype(layout), PHASE=phase, ROWS_PER_PROGRAM=per, ROWS=rows is not None,
        rows_ptr=rows, PDL=pdl, num_warps=num_warps, launch_pdl=pdl, **layout_args(layout),
    )


def warm_up(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, query_start_loc: torch.Tensor,
            seq_lens: torch.Tensor, layout: PageLayout, num_reqs: int | None = None, pdl: bool = False) -> None:
    """Compile every store launch a serving step makes, by running each over one row whose slot is -1 (writes
    nothing): the prompt steps' (listed rows, both phases, residual "kv"; every row at each of
    :data:`ROWS_PER_PROGRAM_CHOICES`, both phases, residual "k") and the decode steps' (phase 0, every row, each
    choice, as :func:`kivi_vllm.kernels.forward` launches it with ``pdl``): 7 specializations with "kv", 15 with
    "k" on a Hopper GPU (cached on disk by Triton after the first start). Not covered: residual "kv" prompt steps
    without host sequence lengths (every row, no list), which the metadata builder never makes under vLLM 0.26
    (it always has ``seq_lens_cpu_upper_bound``). vLLM's warm-up runs (memory profile,
    CUDA-graph capture) have no prompt chunks with a KV cache, and capture only its batch sizes, so without this
    the first prompt step of serving compiled its store, about 2 s in which no request ran (Llama-3-8B shape on the
    H200, ``scripts/bench_gpu.sh decode kivi2``, vLLM's JIT monitor: "Triton kernel JIT compilation during
    inference: _store_kernel", fourteenth and fifteenth sessions).

    Args:
        kv_cache, key, value, query_start_loc, seq_lens, layout, num_reqs: as :func:`store` (a step's, e.g. a
            warm-up step's; ``key``/``value`` need at least one row). Not modified.
        pdl: what the decode step's store gets (:func:`kivi_vllm.kernels.decode.pdl_for` of the device).
    """
    if key.shape[0] == 0:
        return
    one = partial(store, kv_cache, key[:1], value[:1], torch.full((1,), -1, dtype=torch.int64, device=key.device),
                  query_start_loc, seq_lens, layout, num_reqs=num_reqs)
    row = torch.zeros(1, dtype=torch.int32, device=key.device)
    choices = rows_per_program_choices(key.device)
    listed = layout.residual == "kv"
    # (phase, listed rows, rows per program, pdl): the prompt steps', then the decode steps'
    launches = [(phase, listed, 1 if listed else per, False) for phase, per in itertools.product((0, 1), choices)]
    launches += [(0, False, per, pdl) for per in choices]
    for phase, rows, per, dependent in dict.fromkeys(launches):
        one(phase, rows=row if rows else None, rows_per_program=per, pdl=dependent)


#: Store programs per SM that :func:`rows_per_program_for` aims at: the rows per program grow until the launch has
#: at most this many programs per SM. Measured on the H200 at batch 256 (docs/benchmarks.md, twelfth session,
#: command 2): 1 (16 rows per program at both shapes) gave the fastest steady step, 11.7 µs GQA and 17.3 µs
#: Llama-2-7B against 15.4 and 33.2 with one row per program; the step where every request completes a group takes
#: longer (65 µs against 43 GQA), since a program quantizes its rows' groups one after the other.
STORE_PROGRAMS_PER_SM = 1


#: The rows per program :func:`rows_per_program_for` picks from on CUDA (one compiled store each).
ROWS_PER_PROGRAM_CHOICES = (1, 2, 4, 8, 16)


def rows_per_program_choices(device: torch.device) -> tuple[int, ...]:
    """The values :func:`rows_per_program_for` can return on ``device``: :data:`ROWS_PER_PROGRAM_CHOICES` on CUDA,
    (1,) elsewhere."""
    return ROWS_PER_PROGRAM_CHOICES if device.type == "cuda" else (1,)


def rows_per_program_for(num_rows: int, num_kv_heads: int, device: torch.device) -> int:
    """Rows per store program for ``num_rows`` rows x ``num_kv_heads`` heads: the smallest power of two (at most 16)
    that leaves at most :data:`STORE_PROGRAMS_PER_SM` programs per SM; 1 off CUDA. A program writes its rows'
    stage rows at once and quantizes its group-completing rows one after the other, so fewer programs cost less
    when few rows complete a group (a running batch: 1 in G) and more when many do."""
    if device.type != "cuda":
        return 1
    wave = STORE_PROGRAMS_PER_SM * _sm_count(device)
    per = 1
    while per < ROWS_PER_PROGRAM_CHOICES[-1] and triton.cdiv(num_rows, per) * num_kv_heads > wave:
        per *= 2
    return per


@functools.cache
def _sm_count(device: torch.device) -> int:
    """SMs of ``device`` (cached: store() runs per layer and step)."""
    return torch.cuda.get_device_properties(device).multi_processor_count
