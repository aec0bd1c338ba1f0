"""Store / quantize-on-write: one step's new K/V tokens into the KIVI pages (Triton).

Writes the same bytes as :func:`kivi_vllm.reference.store` (codes bit-exact, fp16 scale/min identical). One program
per (token, KV head): a token whose group does not complete in this step goes to its page's stage; the token that
completes a group quantizes the whole group (keys per channel over G tokens, values per token over Gv channels,
KIVI paper §3.2) from the stage (tokens of earlier steps) and this step's rows, and writes its record. Many
sequences completing groups in one step are handled by the same launch.

Phases (why two launches at most). Only the group that is open when a request's step starts (its *first group*,
``g0 = context_len // G``) reads the stage; a later group of the same step may write that page's stage (the next
open group) or the page's last record, which shares bytes with the stage (residual="kv"). Phase 0 handles tokens
of first groups, phase 1 every other token, and phase 1 is launched after phase 0 (and after the attention that
reads the stage; the order is in :func:`kivi_vllm.kernels.forward`). A decode token is always in its first group, so a pure-decode
step is phase 0 only: one launch per layer.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from ..layout import PageLayout
from .common import check_cache, check_rows, find_request, layout_args, pack_rows, quantize, stage_dtype


@triton.jit
def _store_token(
    kv_ptr, key_ptr, value_ptr, qsl_ptr, seq_lens_ptr, num_reqs, t, slot, h,
    stride_cache_block, stride_cache_head, stride_kt, stride_kh, stride_vt, stride_vh,
    STAGE_DTYPE: tl.constexpr, PHASE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, GROUP_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, V_GROUP: tl.constexpr, RECORD_BYTES: tl.constexpr,
    OFF_KC: tl.constexpr, OFF_KS: tl.constexpr, OFF_KM: tl.constexpr, OFF_VC: tl.constexpr,
    OFF_VS: tl.constexpr, OFF_VM: tl.constexpr, OFF_KSTAGE: tl.constexpr, OFF_VSTAGE: tl.constexpr,
    RESIDUAL_KV: tl.constexpr,
):
    """One token's store (module docstring) once :func:`_store_kernel` found it may have work."""
    G: tl.constexpr = GROUP_SIZE
    NVG: tl.constexpr = HEAD_PAD // V_GROUP  # value channel groups per token (padded)
    r = find_request(qsl_ptr, num_reqs, t)
    q_start = tl.load(qsl_ptr + r)
    q_end = tl.load(qsl_ptr + r + 1)
    t = t.to(tl.int64)  # row offsets: T x row stride may pass 2^31
    seq_len = tl.load(seq_lens_ptr + r)
    ctx = seq_len - (q_end - q_start)  # tokens cached before this step
    pos = ctx + (t - q_start)  # this token's position in its sequence
    first_group = (pos // G) == (ctx // G)
    mine = (t < q_end) & (first_group == (PHASE == 0))
    if mine:
        blk = slot // BLOCK_SIZE
        grp = (slot % BLOCK_SIZE) // G
        p = slot % G
        page = kv_ptr + blk * stride_cache_block + h * stride_cache_head
        rec = page + grp * RECORD_BYTES
        d = tl.arange(0, HEAD_PAD)
        dmask = d < HEAD_SIZE
        group_end = pos - p + G  # one past the group's last position
        k_stage = (page + OFF_KSTAGE).to(tl.pointer_type(STAGE_DTYPE))
        if not RESIDUAL_KV:
            # residual="k": every value is quantized per token on arrival into its record row
            v = tl.load(value_ptr + t * stride_vt + h * stride_vh + d, mask=dmask, other=0.0).to(tl.float32)
            vq, vs, vm = quantize(tl.reshape(v, (1, NVG, V_GROUP)), 2, V_BITS)
            vb = pack_rows(tl.reshape(vq, (1, HEAD_PAD)), 1, HEAD_PAD, V_BITS)
            nb = tl.arange(0, HEAD_PAD * V_BITS // 8)
            tl.store(rec + OFF_VC + p * (HEAD_SIZE * V_BITS // 8) + nb[None, :], vb,
                     mask=nb[None, :] < HEAD_SIZE * V_BITS // 8)
            ci = tl.arange(0, NVG)
            cmask = ci < HEAD_SIZE // V_GROUP
            tl.store((rec + OFF_VS).to(tl.pointer_type(tl.float16)) + p * (HEAD_SIZE // V_GROUP) + ci,
                     tl.reshape(vs, (NVG,)), mask=cmask)
            tl.store((rec + OFF_VM).to(tl.pointer_type(tl.float16)) + p * (HEAD_SIZE // V_GROUP) + ci,
                     tl.reshape(vm, (NVG,)), mask=cmask)
        if p == G - 1:
            # This token completes its group: gather the G tokens (earlier steps' from the stage, this step's
            # from key/value), quantize, write the record.
            i = tl.arange(0, G)
            j = pos - p + i  # positions of the group
            from_step = j >= ctx
            rows = t - p + i  # batch rows of this step's tokens
            m2 = dmask[None, :]
            k = tl.load(key_ptr + rows[:, None] * stride_kt + h * stride_kh + d[None, :],
                        mask=from_step[:, None] & m2, other=0.0).to(STAGE_DTYPE).to(tl.float32)
            k_old = tl.load(k_stage + i[:, None] * HEAD_SIZE + d[None, :], mask=(~from_step[:, None]) & m2,
                            other=0.0).to(tl.float32)
            k = tl.where(from_step[:, None], k, k_old)
            if RESIDUAL_KV:
                v_stage = (page + OFF_VSTAGE).to(tl.pointer_type(STAGE_DTYPE))
                v = tl.load(value_ptr + rows[:, None] * stride_vt + h * stride_vh + d[None, :],
                            mask=from_step[:, None] & m2, other=0.0).to(STAGE_DTYPE).to(tl.float32)
                v_old = tl.load(v_stage + i[:, None] * HEAD_SIZE + d[None, :], mask=(~from_step[:, None]) & m2,
                                other=0.0).to(tl.float32)
                v = tl.where(from_step[:, None], v, v_old)
            # the last record of a page shares bytes with the stage: every stage read above happens before any
            # record write below
            tl.debug_barrier()
            # keys: per channel over the G tokens (padded channels are quantized but never stored)
            kq, ks, km = quantize(k, 0, K_BITS)
            kb = pack_rows(kq, G, HEAD_PAD, K_BITS)
            nbk = tl.arange(0, HEAD_PAD * K_BITS // 8)
            tl.store(rec + OFF_KC + i[:, None] * (HEAD_SIZE * K_BITS // 8) + nbk[None, :], kb,
                     mask=nbk[None, :] < HEAD_SIZE * K_BITS // 8)
            tl.store((rec + OFF_KS).to(tl.pointer_type(tl.float16)) + d, tl.reshape(ks, (HEAD_PAD,)), mask=dmask)
            tl.store((rec + OFF_KM).to(tl.pointer_type(tl.float16)) + d, tl.reshape(km, (HEAD_PAD,)), mask=dmask)
            if RESIDUAL_KV:
                # values: per token over channel groups of V_GROUP
                vq, vs, vm = quantize(tl.reshape(v, (G, NVG, V_GROUP)), 2, V_BITS)
                vb = pack_rows(tl.reshape(vq, (G, HEAD_PAD)), G, HEAD_PAD, V_BITS)
                nbv = tl.arange(0, HEAD_PAD * V_BITS // 8)
                tl.store(rec + OFF_VC + i[:, None] * (HEAD_SIZE * V_BITS // 8) + nbv[None, :], vb,
                         mask=nbv[None, :] < HEAD_SIZE * V_BITS // 8)
                ci = tl.arange(0, NVG)
                cmask = ci[None, :] < HEAD_SIZE // V_GROUP
                off = i[:, None] * (HEAD_SIZE // V_GROUP) + ci[None, :]
                tl.store((rec + OFF_VS).to(tl.pointer_type(tl.float16)) + off, tl.reshape(vs, (G, NVG)), mask=cmask)
                tl.store((rec + OFF_VM).to(tl.pointer_type(tl.float16)) + off, tl.reshape(vm, (G, NVG)), mask=cmask)
        elif group_end > seq_len:
            # the group stays open after this step: stage the token exactly (index = position mod G)
            kx = tl.load(key_ptr + t * stride_kt + h * stride_kh + d, mask=dmask)
            tl.store(k_stage + p * HEAD_SIZE + d, kx.to(STAGE_DTYPE), mask=dmask)
            if RESIDUAL_KV:
                vx = tl.load(value_ptr + t * stride_vt + h * stride_vh + d, mask=dmask)
                v_stage = (page + OFF_VSTAGE).to(tl.pointer_type(STAGE_DTYPE))
                tl.store(v_stage + p * HEAD_SIZE + d, vx.to(STAGE_DTYPE), mask=dmask)


@triton.jit
def _store_kernel(
    kv_ptr, key_ptr, value_ptr, slot_ptr, qsl_ptr, seq_lens_ptr, num_reqs,
    stride_cache_block, stride_cache_head, stride_kt, stride_kh, stride_vt, stride_vh,
    STAGE_DTYPE: tl.constexpr, PHASE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, GROUP_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, V_GROUP: tl.constexpr, RECORD_BYTES: tl.constexpr,
    OFF_KC: tl.constexpr, OFF_KS: tl.constexpr, OFF_KM: tl.constexpr, OFF_VC: tl.constexpr,
    OFF_VS: tl.constexpr, OFF_VM: tl.constexpr, OFF_KSTAGE: tl.constexpr, OFF_VSTAGE: tl.constexpr,
    RESIDUAL_KV: tl.constexpr, ROWS: tl.constexpr = False, rows_ptr=None,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    if ROWS:  # a list of the rows with work (store_rows), one program each
        t = tl.load(rows_ptr + t)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    busy = slot >= 0
    if busy:
        _store_token(kv_ptr, key_ptr, value_ptr, qsl_ptr, seq_lens_ptr, num_reqs, t, slot, h,
                     stride_cache_block, stride_cache_head, stride_kt, stride_kh, stride_vt, stride_vh,
                     STAGE_DTYPE, PHASE, BLOCK_SIZE, GROUP_SIZE, HEAD_SIZE, HEAD_PAD, K_BITS, V_BITS, V_GROUP,
                     RECORD_BYTES, OFF_KC, OFF_KS, OFF_KM, OFF_VC, OFF_VS, OFF_VM, OFF_KSTAGE, OFF_VSTAGE,
                     RESIDUAL_KV)


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
        rows: residual="kv" only: int32 [N] on the device, the rows with work (:func:`store_rows`); one program per
            listed row instead of one per row of ``key``. None: every row.

    Raises:
        ValueError: wrong cache shape/dtype, key/value shapes that do not match the layout, key/value not
            contiguous in head_size, or ``rows`` with residual="k" or not int32.
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
    grid = T if rows is None else rows.numel()
    if grid == 0 or n == 0:
        return
    _store_kernel[(grid, H)](
        kv_cache, key, value, slot_mapping, query_start_loc, seq_lens, n,
        kv_cache.stride(0), kv_cache.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        STAGE_DTYPE=stage_dtype(layout), PHASE=phase, ROWS=rows is not None,
        rows_ptr=rows, num_warps=num_warps, **layout_args(layout),
    )
