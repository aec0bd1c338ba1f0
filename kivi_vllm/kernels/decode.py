"""Decode attention over KIVI pages: split-KV (flash-decoding) with an online softmax, then the exact open group
merged with the splits ("fma", "tc") or a reduction ("mma") (Triton).

For every request whose step has exactly one query token (position p = seq_len - 1), and every KV head, this
computes attention of that head's query heads (GQA: all ``num_heads / num_kv_heads`` of them in one program, so a
KV head's codes are unpacked once) over

* the complete groups 0 .. p // G - 1, read from their records (packed codes + fp16 scale/min), and
* the open group, exactly: its earlier tokens from the page's stage, the new token from this step's key/value.

It runs *before* this step's store (the store may quantize the open group over the stage), so it reads the new
token from ``key``/``value``. Nothing is dequantized into global memory: each program unpacks one group record at a
time into registers. KIVI's algebra (paper §3.2, keys per channel) keeps the key dequantization out of the inner
product::

    q . (c * s + m) = (q * s) . c + q . m        per group: s, m are [D] per-channel scale and minimum

so a kernel multiplies the query by the group's scale once and takes one product with the raw codes, plus one scalar
per query head (q . m). Three kernels (:func:`default_kernel` picks one):

* ``_decode_fma_kernel`` (CUDA cores): codes stay in the page's 32-bit word layout, ``q * s`` is formed in that
  layout, scores are multiply-adds; values accumulate per output channel as ``sum_j (p_j * s_j) c_jc`` plus
  ``sum_j p_j m_j`` (per-token scale and minimum per channel group). Complete groups only: the open group runs as a
  second launch, one program per (request, KV head), ``_open_group_kernel`` or ``_decode_split_kernel`` with
  ``DO_GROUPS=False`` and ``COMBINE`` (:func:`open_kernel_for`), which also merges the first launch's partial slots
  and writes the output (no reduction launch).
* "tc", :mod:`.decode_tc` (Gluon, NVIDIA sm_80+, the default there wherever :func:`tc_supports` the shape): fp16
  tensor-core MMAs whose operands are dequantized in registers (scale applied per element, one rounding), P taken from
  the score accumulator in place; shared memory only holds the next groups' packed records on their way in
  (``decode_tc.STAGES``); complete groups only, the open group as for "fma".
* ``_decode_split_kernel`` (tensor cores, rows padded to 16 query heads): one MMA ([QH, D] x [D, G]) for the
  scores, values dequantized in registers (``c * s + m``) before ``P . V``; the last split also handles the open
  group.

The grid is (num_reqs, num_kv_heads, num_splits) with a fixed ``num_splits`` per batch size, or, with a work list
(:func:`decode_work`: what the engine gives "tc"), (work-list rows, num_kv_heads, 1) with the rows fixed per batch
size, so the launch shape does not depend on context lengths and the whole decode step can be captured in a CUDA
graph. Split s (or work item i) handles a contiguous range of groups and writes a (max, sum, accumulator) triple to
its slot; the open group's launch ("fma", "tc") or ``_reduce_kernel`` ("mma") merges the slots (FlashDecoding, Dao
et al. 2023; vLLM ``triton_decode_attention.py``).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ..layout import PageLayout
from .common import (LOG2E, ONE_F32_BITS, check_attention, dot_args, gather_codes, layout_args, load_value_scales,
                     stage_dtype, unit_floats)


@triton.jit
def _decode_split_kernel(
    q_ptr, key_ptr, value_ptr, kv_ptr, block_table_ptr, seq_lens_ptr, qsl_ptr,
    part_m_ptr, part_l_ptr, part_acc_ptr, sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cache_block, stride_cache_head, stride_bt, out_ptr, count_ptr, stride_ot, stride_oh,
    QPK: tl.constexpr, QPK_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr, DO_GROUPS: tl.constexpr,
    STAGE_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, GROUP_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, V_GROUP: tl.constexpr, RECORD_BYTES: tl.constexpr,
    OFF_KC: tl.constexpr, OFF_KS: tl.constexpr, OFF_KM: tl.constexpr, OFF_VC: tl.constexpr,
    OFF_VS: tl.constexpr, OFF_VM: tl.constexpr, OFF_KSTAGE: tl.constexpr, OFF_VSTAGE: tl.constexpr,
    RESIDUAL_KV: tl.constexpr, COMBINE: tl.constexpr = False, WORK_LIST: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    """Split ``split`` of request r's complete groups (program (r, h, split) of the grid (num_reqs, num_kv_heads,
    NUM_SPLITS)), the last split also the open group, written as (max, sum, accumulator) partials to slot
    ``split`` for :func:`_reduce_kernel` (the "mma" kernel). With ``DO_GROUPS`` False, the open group only, in a
    grid (num_reqs, num_kv_heads, 1) after the "fma" or "tc" kernel; with ``COMBINE`` too, it merges its partial
    with the ``NUM_SPLITS`` slots that kernel wrote (with ``WORK_LIST``: ``count_ptr[r]`` slots, the request's work
    items) and writes the attention output ``out_ptr`` [T, num_heads, head_size] itself: no partial of its own, no
    reduction launch (FlashDecoding's second pass, Dao et al. 2023, done by the open group's program). ``DO_GROUPS``
    False needs ``COMBINE`` (alone it would write slot 0, which the first kernel owns). ``PDL`` (with ``COMBINE``):
    launched as a programmatic dependent of the first kernel, it waits for that kernel's slots (``griddepcontrol.wait``)
    only before merging them; every program waits once, also those without a one-token request (:data:`PDL`)."""
    tl.static_assert(DO_GROUPS or COMBINE, "the open group alone must merge (COMBINE): slot 0 is the first kernel's")
    tl.static_assert(COMBINE or not PDL, "PDL is for the open group's launch (COMBINE)")
    if PDL:
        gdc_launch_dependents()  # the store after this launch loads and quantizes while it runs (store.store(pdl))
    G: tl.constexpr = GROUP_SIZE
    GROUPS_PER_PAGE: tl.constexpr = BLOCK_SIZE // GROUP_SIZE
    K_ROW: tl.constexpr = HEAD_SIZE * K_BITS // 8
    V_ROW: tl.constexpr = HEAD_SIZE * V_BITS // 8
    r = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(qsl_ptr + r).to(tl.int64)
    q_len = tl.load(qsl_ptr + r + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + r)

    rows = tl.arange(0, QPK_PAD)  # query heads of this KV head (padded to a tl.dot-sized tile)
    rmask = rows < QPK
    d = tl.arange(0, HEAD_PAD)
    dmask = d < HEAD_SIZE
    i = tl.arange(0, G)
    m_i = tl.full((QPK_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((QPK_PAD,), tl.float32)
    acc = tl.zeros((QPK_PAD, HEAD_PAD), tl.float32)
    KPW: tl.constexpr = 32 // K_BITS  # codes per 32-bit word
    VPW: tl.constexpr = 32 // V_BITS
    KW_ROW: tl.constexpr = K_ROW // 4  # words per packed row
    VW_ROW: tl.constexpr = V_ROW // 4
    NVG: tl.constexpr = HEAD_SIZE // V_GROUP
    NVG_PAD: tl.constexpr = HEAD_PAD // V_GROUP
    K_MASK: tl.constexpr = (1 << K_BITS) - 1
    V_MASK: tl.constexpr = (1 << V_BITS) - 1
    kw = tl.arange(0, HEAD_PAD // KPW)
    vw = tl.arange(0, HEAD_PAD // VPW)
    vg = tl.arange(0, NVG_PAD)
    k_shift = tl.arange(0, KPW) * K_BITS
    v_shift = tl.arange(0, VPW) * V_BITS

    if (q_len == 1) & (seq_len > 0):
        p = seq_len - 1
        n_full = p // G  # complete groups, all read from records
        per_split = tl.cdiv(n_full, NUM_SPLITS)
        g_lo = split * per_split
        g_hi = tl.minimum(n_full, g_lo + per_split)
        # softmax in base 2: fold log2(e) and the softmax scale into q once
        q = tl.load(q_ptr + q_start * stride_qt + (h * QPK + rows[:, None]) * stride_qh + d[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32) * (sm_scale * LOG2E)
        bt_row = block_table_ptr + r * stride_bt
        if not DO_GROUPS:  # the open group only (the FMA kernel's companion launch)
            g_hi = g_lo
        for g in tl.range(g_lo, g_hi, num_stages=NUM_STAGES):
            blk = tl.load(bt_row + g // GROUPS_PER_PAGE).to(tl.int64)
            rec = kv_ptr + blk * stride_cache_block + h * stride_cache_head + (g % GROUPS_PER_PAGE) * RECORD_BYTES
            # every load of the record first, as 32-bit words (so that Triton's pipeliner can stage them with
            # cp.async for the next iterations while this one computes)
            k_scale = tl.load((rec + OFF_KS).to(tl.pointer_type(tl.float16)) + d, mask=dmask, other=0.0)
            k_min = tl.load((rec + OFF_KM).to(tl.pointer_type(tl.float16)) + d, mask=dmask, other=0.0)
            k_words = tl.load((rec + OFF_KC).to(tl.pointer_type(tl.int32)) + kw[:, None] + i[None, :] * KW_ROW,
                              mask=(kw < KW_ROW)[:, None], other=0)  # [KW, G], transposed for the MMA
            v_words = tl.load((rec + OFF_VC).to(tl.pointer_type(tl.int32)) + i[:, None] * VW_ROW + vw[None, :],
                              mask=(vw < VW_ROW)[None, :], other=0)  # [G, VW]
            v_scale = tl.load((rec + OFF_VS).to(tl.pointer_type(tl.float16)) + i[:, None] * NVG + vg[None, :],
                              mask=(vg < NVG)[None, :], other=0.0)  # [G, NVG_PAD]
            v_min = tl.load((rec + OFF_VM).to(tl.pointer_type(tl.float16)) + i[:, None] * NVG + vg[None, :],
                            mask=(vg < NVG)[None, :], other=0.0)
            # keys: s_ij = (q_i * scale) . code_j + q_i . min     (per-channel scale/min of this group)
            k_codes = tl.reshape((k_words[:, None, :] >> k_shift[None, :, None]) & K_MASK, (HEAD_PAD, G))
            q_scaled = q * k_scale.to(tl.float32)[None, :]
            q_dot_min = tl.sum(q * k_min.to(tl.float32)[None, :], axis=1)
            s = tl.dot(q_scaled.to(DOT_DTYPE), k_codes.to(DOT_DTYPE), input_precision=DOT_PRECISION)
            s = s + q_dot_min[:, None]
            # online softmax
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            prob = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(prob, axis=1)
            # values: v_jc = code_jc * scale_j[c // Gv] + min_j[c // Gv]   (per token and channel group)
            v_codes = tl.reshape((v_words[:, :, None] >> v_shift[None, None, :]) & V_MASK, (G, NVG_PAD, V_GROUP))
            v = v_codes.to(tl.float32) * v_scale.to(tl.float32)[:, :, None] + v_min.to(tl.float32)[:, :, None]
            v = tl.reshape(v, (G, HEAD_PAD))
            acc = acc * alpha[:, None] + tl.dot(prob.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
            m_i = m_new
        if (split == NUM_SPLITS - 1) | (not DO_GROUPS):
            # the open group, exact: positions n_full*G .. p; earlier ones staged, p itself is this step's token
            n_staged = p - n_full * G
            k_ex, v_ex = _open_group_kv(key_ptr, value_ptr, kv_ptr, bt_row, q_start, h, n_full, n_staged,
                                        stride_kt, stride_kh, stride_vt, stride_vh, stride_cache_block,
                                        stride_cache_head, STAGE_DTYPE, BLOCK_SIZE, GROUP_SIZE, HEAD_SIZE, HEAD_PAD,
                                        V_BITS, V_GROUP, RECORD_BYTES, OFF_VC, OFF_VS, OFF_VM, OFF_KSTAGE,
                                        OFF_VSTAGE, RESIDUAL_KV)
            s = tl.dot(q.to(DOT_DTYPE), tl.trans(k_ex.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
            s = tl.where((i <= n_staged)[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            prob = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(prob, axis=1)
            acc = acc * alpha[:, None] + tl.dot(prob.to(DOT_DTYPE), v_ex.to(DOT_DTYPE), input_precision=DOT_PRECISION)
            m_i = m_new
        if COMBINE:
            # merge the other kernel's slots into this (finite: the open group holds at least p itself) partial;
            # a slot without keys has max -inf and weighs exp2(-inf) = 0
            if PDL:
                gdc_wait()  # the slots are the first kernel's: everything above overlapped with it
            n_slots = NUM_SPLITS
            if WORK_LIST:
                n_slots = tl.load(count_ptr + r)
            pbase = (r * (QPK * tl.num_programs(1)) + h * QPK + rows) * NUM_SPLITS
            for sl in tl.range(0, n_slots, num_stages=2):
                m_s = tl.load(part_m_ptr + pbase + sl, mask=rmask, other=float("-inf"))
                l_s = tl.load(part_l_ptr + pbase + sl, mask=rmask, other=0.0)
                acc_s = tl.load(part_acc_ptr + (pbase + sl)[:, None] * HEAD_PAD + d[None, :], mask=rmask[:, None],
                                other=0.0)
                m_new = tl.maximum(m_i, m_s)
                alpha = tl.exp2(m_i - m_new)
                beta = tl.exp2(m_s - m_new)
                l_i = l_i * alpha + l_s * beta
                acc = acc * alpha[:, None] + acc_s * beta[:, None]
                m_i = m_new
            o = acc / l_i[:, None]
            tl.store(out_ptr + q_start * stride_ot + (h * QPK + rows)[:, None] * stride_oh + d[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
    elif PDL:
        gdc_wait()  # a dependent grid must not end before the first kernel: the next launch waits for this one only

    if not COMBINE:
        base = (r * (QPK * tl.num_programs(1)) + h * QPK + rows) * NUM_SPLITS + split
        tl.store(part_m_ptr + base, m_i, mask=rmask)
        tl.store(part_l_ptr + base, l_i, mask=rmask)
        tl.store(part_acc_ptr + base[:, None] * HEAD_PAD + d[None, :], acc, mask=rmask[:, None])


@triton.jit
def _open_group_kv(key_ptr, value_ptr, kv_ptr, bt_row, q_start, h, n_full, n_staged,
                   stride_kt, stride_kh, stride_vt, stride_vh, stride_cache_block, stride_cache_head,
                   STAGE_DTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr, GROUP_SIZE: tl.constexpr,
                   HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr, V_BITS: tl.constexpr, V_GROUP: tl.constexpr,
                   RECORD_BYTES: tl.constexpr, OFF_VC: tl.constexpr, OFF_VS: tl.constexpr, OFF_VM: tl.constexpr,
                   OFF_KSTAGE: tl.constexpr, OFF_VSTAGE: tl.constexpr, RESIDUAL_KV: tl.constexpr):
    """Keys and values of KV head ``h``'s open group (group ``n_full`` of the request whose block-table row is
    ``bt_row``), exact, [G, HEAD_PAD] in the stage dtype (the model's): rows ``0 .. n_staged - 1`` from the page's
    stage, row ``n_staged`` this step's key/value (row ``q_start`` of ``key_ptr``/``value_ptr``, rounded to the
    stage dtype as the store will keep it), rows after it 0. With residual "k" the earlier values were quantized per
    token on arrival and are dequantized from the group's record: values in float32 then."""
    G: tl.constexpr = GROUP_SIZE
    i = tl.arange(0, G)
    d = tl.arange(0, HEAD_PAD)
    dmask = d < HEAD_SIZE
    blk = tl.load(bt_row + n_full // (BLOCK_SIZE // G)).to(tl.int64)
    page = kv_ptr + blk * stride_cache_block + h * stride_cache_head
    staged = (i < n_staged)[:, None] & dmask[None, :]
    new = (i == n_staged)[:, None]
    k_st = tl.load((page + OFF_KSTAGE).to(tl.pointer_type(STAGE_DTYPE)) + i[:, None] * HEAD_SIZE + d[None, :],
                   mask=staged, other=0.0)
    k_new = tl.load(key_ptr + q_start * stride_kt + h * stride_kh + d, mask=dmask, other=0.0)
    k_ex = tl.where(new, k_new.to(STAGE_DTYPE)[None, :], k_st)
    v_new = tl.load(value_ptr + q_start * stride_vt + h * stride_vh + d, mask=dmask, other=0.0)
    if RESIDUAL_KV:
        v_old = tl.load((page + OFF_VSTAGE).to(tl.pointer_type(STAGE_DTYPE)) + i[:, None] * HEAD_SIZE + d[None, :],
                        mask=staged, other=0.0)
        v_ex = tl.where(new, v_new.to(STAGE_DTYPE)[None, :], v_old)
    else:
        rec = page + (n_full % (BLOCK_SIZE // G)) * RECORD_BYTES
        vc = gather_codes(rec + OFF_VC, i[:, None], (i < n_staged)[:, None], d[None, :], HEAD_SIZE * V_BITS // 8,
                          V_BITS, HEAD_SIZE).to(tl.float32)
        v_scale = load_value_scales(rec + OFF_VS, i, i < n_staged, G, HEAD_PAD, HEAD_SIZE, V_GROUP)
        v_min = load_value_scales(rec + OFF_VM, i, i < n_staged, G, HEAD_PAD, HEAD_SIZE, V_GROUP)
        v_ex = tl.where(new, v_new.to(STAGE_DTYPE).to(tl.float32)[None, :], vc * v_scale + v_min)
    return k_ex, v_ex


@triton.jit
def _open_group_kernel(
    q_ptr, key_ptr, value_ptr, kv_ptr, block_table_ptr, seq_lens_ptr, qsl_ptr,
    part_m_ptr, part_l_ptr, part_acc_ptr, sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cache_block, stride_cache_head, stride_bt, out_ptr, count_ptr, stride_ot, stride_oh,
    QPK: tl.constexpr, NUM_SPLITS: tl.constexpr, WORK_LIST: tl.constexpr, STAGE_DTYPE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, GROUP_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, V_GROUP: tl.constexpr, RECORD_BYTES: tl.constexpr,
    OFF_KC: tl.constexpr, OFF_KS: tl.constexpr, OFF_KM: tl.constexpr, OFF_VC: tl.constexpr,
    OFF_VS: tl.constexpr, OFF_VM: tl.constexpr, OFF_KSTAGE: tl.constexpr, OFF_VSTAGE: tl.constexpr,
    RESIDUAL_KV: tl.constexpr, PDL: tl.constexpr = False,
):
    """The second launch of the "fma" and "tc" paths, program (r, h) of the grid (num_reqs, num_kv_heads): the
    open group of request r, KV head h, exactly (:func:`_open_group_kv`: its staged tokens and this step's), then,
    per query head, its (max, sum, accumulator) merged with the ``NUM_SPLITS`` slots the first launch wrote (with
    ``WORK_LIST``: the request's ``count_ptr[r]`` work items' slots) into the attention output ``out_ptr`` [T,
    num_heads, head_size]: FlashDecoding's second pass (Dao et al. 2023) in the same program, no reduction launch.

    Scores and value sums are float32 multiply-adds over the [G, head_size] tiles, one query head at a time: no
    MMA, so no padding of the query heads to 16 rows, and a small register footprint (more programs resident: the
    launch is one or a few waves of short dependent load chains, not of arithmetic). ``PDL``: launched as a
    programmatic dependent of the first kernel, it loads the open group while that kernel runs and waits for its
    slots (``griddepcontrol.wait``) before the first merge; every program waits once (:data:`PDL`)."""
    G: tl.constexpr = GROUP_SIZE
    if PDL:
        gdc_launch_dependents()  # the store after this launch loads and quantizes while it runs (store.store(pdl))
    r = tl.program_id(0)
    h = tl.program_id(1)
    q_start = tl.load(qsl_ptr + r).to(tl.int64)
    q_len = tl.load(qsl_ptr + r + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + r)
    if (q_len == 1) & (seq_len > 0):
        p = seq_len - 1
        n_full = p // G
        n_staged = p - n_full * G
        i = tl.arange(0, G)
        d = tl.arange(0, HEAD_PAD)
        dmask = d < HEAD_SIZE
        k, v = _open_group_kv(key_ptr, value_ptr, kv_ptr, block_table_ptr + r * stride_bt, q_start, h, n_full,
                              n_staged, stride_kt, stride_kh, stride_vt, stride_vh, stride_cache_block,
                              stride_cache_head, STAGE_DTYPE, BLOCK_SIZE, GROUP_SIZE, HEAD_SIZE, HEAD_PAD, V_BITS,
                              V_GROUP, RECORD_BYTES, OFF_VC, OFF_VS, OFF_VM, OFF_KSTAGE, OFF_VSTAGE, RESIDUAL_KV)
        n_slots = NUM_SPLITS
        if WORK_LIST:
            n_slots = tl.load(count_ptr + r)
        for j in tl.static_range(QPK):
            hq = h * QPK + j
            # softmax in base 2, the scale and log2(e) folded into q
            q = tl.load(q_ptr + q_start * stride_qt + hq * stride_qh + d, mask=dmask, other=0.0).to(tl.float32)
            s = tl.sum(k.to(tl.float32) * (q * (sm_scale * LOG2E))[None, :], axis=1)  # [G]
            s = tl.where(i <= n_staged, s, float("-inf"))
            m_i = tl.max(s, axis=0)  # finite: row n_staged (this step's token) is always there
            prob = tl.exp2(s - m_i)
            l_i = tl.sum(prob, axis=0)
            acc = tl.sum(prob[:, None] * v.to(tl.float32), axis=0)  # [HEAD_PAD]
            base = (r * (QPK * tl.num_programs(1)) + hq) * NUM_SPLITS
            if PDL and j == 0:
                gdc_wait()  # the slots are the first kernel's; the loads and the first head's scores overlapped it
            for sl in tl.range(0, n_slots):  # a slot without keys has max -inf: weight exp2(-inf) = 0
                m_s = tl.load(part_m_ptr + base + sl)
                l_s = tl.load(part_l_ptr + base + sl)
                acc_s = tl.load(part_acc_ptr + (base + sl) * HEAD_PAD + d)
                m_new = tl.maximum(m_i, m_s)
                alpha = tl.exp2(m_i - m_new)
                beta = tl.exp2(m_s - m_new)
                l_i = l_i * alpha + l_s * beta
                acc = acc * alpha + acc_s * beta
                m_i = m_new
            tl.store(out_ptr + q_start * stride_ot + hq * stride_oh + d, (acc / l_i).to(out_ptr.dtype.element_ty),
                     mask=dmask)
    elif PDL:
        gdc_wait()  # a dependent grid must not end before the first kernel: the next launch waits for this one only


@triton.jit
def _word_codes(ptr, rows, row_mask, one_bits, ROW_BYTES: tl.constexpr, BITS: tl.constexpr, W_PAD: tl.constexpr,
                HEAD_SIZE: tl.constexpr):
    """float32 ``1 + code / 2**BITS`` [1, 32 // BITS, RA, RB, W_PAD] of the packed rows ``rows`` ([RA, RB]) at
    ``ptr``: element (0, b, ja, jb, w) is channel ``w * (32 // BITS) + b`` of row ``rows[ja, jb]``. One 32-bit load
    per word; each code becomes a float by the exponent trick of :func:`.common.unit_floats` (a shift and a LOP3), so
    no integer-to-float conversion runs (I2FP was 256 of the loop's 1,348 SASS instructions, SGXT another 224). The
    caller subtracts the 1: ``sum_c x_c code_c = 2**BITS * (sum_c x_c f_c - sum_c x_c)``. Rows that are masked and
    words past the head size give 1.0 (code 0). ``one_bits``: :data:`.common.ONE_F32_BITS`."""
    PW: tl.constexpr = 32 // BITS
    w = tl.arange(0, W_PAD)
    words = tl.load((ptr + rows[:, :, None] * ROW_BYTES).to(tl.pointer_type(tl.int32)) + w[None, None, :],
                    mask=row_mask[:, :, None] & (w[None, None, :] < HEAD_SIZE * BITS // 32), other=0)
    sh = tl.arange(0, PW) * BITS  # where code b starts in its word
    return unit_floats(words[None, None, :, :, :], sh[None, :, None, None, None], one_bits, BITS)


@triton.jit
def _word_chans(ptr, PW: tl.constexpr, W_PAD: tl.constexpr, HEAD_SIZE: tl.constexpr, DTYPE: tl.constexpr):
    """float32 [PW, W_PAD] of a per-channel vector at ``ptr`` (element (b, w) is channel ``w * PW + b``), 0 past the
    head size: the channel order of :func:`_word_codes`."""
    c = tl.arange(0, PW)[:, None] + tl.arange(0, W_PAD)[None, :] * PW
    return tl.load(ptr.to(tl.pointer_type(DTYPE)) + c, mask=c < HEAD_SIZE, other=0.0).to(tl.float32)


@triton.jit
def _decode_fma_kernel(
    q_ptr, key_ptr, value_ptr, kv_ptr, block_table_ptr, seq_lens_ptr, qsl_ptr,
    part_m_ptr, part_l_ptr, part_acc_ptr, sm_scale, one_bits,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cache_block, stride_cache_head, stride_bt, work_ptr,
    QPK: tl.constexpr, QPK_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, GROUP_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, V_GROUP: tl.constexpr, RECORD_BYTES: tl.constexpr,
    OFF_KC: tl.constexpr, OFF_KS: tl.constexpr, OFF_KM: tl.constexpr, OFF_VC: tl.constexpr,
    OFF_VS: tl.constexpr, OFF_VM: tl.constexpr, OFF_KSTAGE: tl.constexpr, OFF_VSTAGE: tl.constexpr,
    RESIDUAL_KV: tl.constexpr, NUM_STAGES: tl.constexpr = 1, LANE_ROWS: tl.constexpr = 1,
    WORK_LIST: tl.constexpr = False, PDL: tl.constexpr = False,
):
    """The same attention as :func:`_decode_split_kernel`, on CUDA cores: no MMA, no shared memory in the loop.

    Codes stay in the word layout of the page (:func:`_word_codes`: [1, codes per word, G, words]); the key scale is
    folded into the query in that layout, so a score is multiply-adds over the codes of each word followed by a sum
    over the words (lane shuffles); values accumulate per output channel as ``sum_j (p_j * scale_j) * code_jc``
    and ``sum_j p_j * min_j``. About 3 instructions per code (shift, LOP3, multiply-add) and 128 registers with one
    warp at 1 query head per KV head, G 32, head 128, 2 bits (sm_90 compile, ``benchmarks/kernel_resources.py``; 96
    before the per-lane value sums, ``default_lane_rows``).
    Complete groups only: the open group (exact stage rows) is a separate launch after this one (so that its [G, D]
    tiles do not raise this kernel's register count), :func:`_open_group_kernel` or :func:`_decode_split_kernel`
    with ``DO_GROUPS`` False and ``COMBINE`` (:func:`open_kernel_for`), which also merges this kernel's slots into
    the output.

    Program (r, h, split) of the grid (num_reqs, num_kv_heads, NUM_SPLITS) takes split ``split`` of request r's
    groups; with ``WORK_LIST`` program (i, h) of the grid (work items, num_kv_heads, 1) takes work item i of
    ``work_ptr`` (:func:`decode_work`: request, slot, first group, end group; request -1: nothing). With ``PDL`` it
    lets the open group's launch start at once (:data:`PDL`)."""
    if PDL:
        gdc_launch_dependents()
    G: tl.constexpr = GROUP_SIZE
    GROUPS_PER_PAGE: tl.constexpr = BLOCK_SIZE // GROUP_SIZE
    K_ROW: tl.constexpr = HEAD_SIZE * K_BITS // 8
    V_ROW: tl.constexpr = HEAD_SIZE * V_BITS // 8
    KPW: tl.constexpr = 32 // K_BITS  # key channels per 32-bit word
    VPW: tl.constexpr = 32 // V_BITS
    KW: tl.constexpr = HEAD_PAD // KPW  # words per packed key row, padded to a power of 2
    VW: tl.constexpr = HEAD_PAD // VPW
    NVG: tl.constexpr = HEAD_SIZE // V_GROUP  # value scale/min pairs per token
    r = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    if WORK_LIST:
        item = work_ptr + tl.program_id(0) * 4
        r = tl.load(item)
        split = tl.load(item + 1)
    live = r >= 0  # an unused work item: no request, writes nothing
    r = tl.maximum(r, 0)
    q_start = tl.load(qsl_ptr + r).to(tl.int64)
    q_len = tl.load(qsl_ptr + r + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + r)

    rows = tl.arange(0, QPK_PAD)
    rmask = rows < QPK
    # the G rows of a group as [GA, GB] (row ja * GB + jb): with LANE_ROWS = GB > 1 the value sums over rows run
    # over ja only (inside a thread) and keep GB partial sums, added once after the loop (no lane shuffles per group)
    GB: tl.constexpr = LANE_ROWS
    GA: tl.constexpr = G // LANE_ROWS
    i = tl.arange(0, GA)[:, None] * GB + tl.arange(0, GB)[None, :]  # [GA, GB]
    kch = tl.arange(0, KPW)[:, None] + tl.arange(0, KW)[None, :] * KPW  # [KPW, KW] channel of (position, word)
    vch = tl.arange(0, VPW)[:, None] + tl.arange(0, VW)[None, :] * VPW  # [VPW, VW]
    vgrp = tl.arange(0, VW) * VPW // V_GROUP  # value channel group of each value word (V_GROUP >= VPW)
    # the running state starts as reductions of zero tiles, so that it has the loop's layouts (no conversion per
    # iteration): acc [QPK_PAD, VPW, GB, VW] = sum_j p_j scale_j code_jc, acc_m [QPK_PAD, GB, VW] = sum_j p_j min_j
    acc = tl.sum(tl.zeros((QPK_PAD, VPW, GA, GB, VW), tl.float32), axis=2)
    acc_m = tl.sum(tl.zeros((QPK_PAD, GA, GB, VW), tl.float32), axis=1)
    zeros_s = tl.sum(tl.sum(tl.zeros((QPK_PAD, KPW, GA, GB, KW), tl.float32), axis=1), axis=3)  # [QPK_PAD, GA, GB]
    m_i = tl.max(tl.max(zeros_s, axis=2), axis=1) + float("-inf")
    l_i = tl.sum(tl.sum(zeros_s, axis=2), axis=1)

    if (q_len == 1) & (seq_len > 0) & live:
        p = seq_len - 1
        n_full = p // G  # complete groups, all read from records
        if WORK_LIST:  # the item's end is clamped to the device's group count (the host's may be an upper bound)
            g_lo = tl.load(item + 2)
            g_hi = tl.minimum(n_full, tl.load(item + 3))
        else:
            per_split = tl.cdiv(n_full, NUM_SPLITS)
            g_lo = split * per_split
            g_hi = tl.minimum(n_full, g_lo + per_split)
        # softmax in base 2: fold log2(e) and the softmax scale into q once; q in the key word layout
        q = tl.load(q_ptr + q_start * stride_qt + (h * QPK + rows)[:, None, None] * stride_qh + kch[None, :, :],
                    mask=rmask[:, None, None] & (kch < HEAD_SIZE)[None, :, :], other=0.0).to(tl.float32)
        q = q * (sm_scale * LOG2E)  # [QPK_PAD, KPW, KW]
        bt_row = block_table_ptr + r * stride_bt
        for g in tl.range(g_lo, g_hi, num_stages=NUM_STAGES):
            blk = tl.load(bt_row + g // GROUPS_PER_PAGE).to(tl.int64)
            rec = kv_ptr + blk * stride_cache_block + h * stride_cache_head + (g % GROUPS_PER_PAGE) * RECORD_BYTES
            kc = _word_codes(rec + OFF_KC, i, i < G, one_bits, K_ROW, K_BITS, KW, HEAD_SIZE)  # [1, KPW, GA, GB, KW]
            ks = _word_chans(rec + OFF_KS, KPW, KW, HEAD_SIZE, tl.float16)
            km = _word_chans(rec + OFF_KM, KPW, KW, HEAD_SIZE, tl.float16)
            vc = _word_codes(rec + OFF_VC, i, i < G, one_bits, V_ROW, V_BITS, VW, HEAD_SIZE)  # [1, VPW, GA, GB, VW]
            vmask = (i < G)[:, :, None] & (vgrp < NVG)[None, None, :]
            vs = tl.load((rec + OFF_VS).to(tl.pointer_type(tl.float16)) + i[:, :, None] * NVG + vgrp[None, None, :],
                         mask=vmask, other=0.0).to(tl.float32)  # [GA, GB, VW] scale of each (token, value word)
            vm = tl.load((rec + OFF_VM).to(tl.pointer_type(tl.float16)) + i[:, :, None] * NVG + vgrp[None, None, :],
                         mask=vmask, other=0.0).to(tl.float32)
            # keys: s_ij = (q_i * scale) . code_j + q_i . min   (KIVI's per-channel scale folded into the query);
            # with f = 1 + code / 2**K_BITS from _word_codes: (q_i * scale) . code_j
            # = (q_i * scale * 2**K_BITS) . f_j - (q_i * scale * 2**K_BITS) . 1, the second term joins q_i . min
            ks = ks * (1 << K_BITS)
            qm = tl.sum(tl.sum(q * (km - ks)[None, :, :], axis=2), axis=1)
            s = tl.sum(tl.sum((q * ks[None, :, :])[:, :, None, None, :] * kc, axis=1), axis=3)  # [QPK_PAD, GA, GB]
            s = s + qm[:, None, None]
            m_new = tl.maximum(m_i, tl.max(tl.max(s, axis=2), axis=1))
            alpha = tl.exp2(m_i - m_new)
            prob = tl.exp2(s - m_new[:, None, None])  # [QPK_PAD, GA, GB]
            l_i = l_i * alpha + tl.sum(tl.sum(prob, axis=2), axis=1)
            # values: sum_j p_j (code_jc * scale_j + min_j) = sum_j (p_j * scale_j) code_jc + sum_j p_j * min_j,
            # and with f: sum_j (p_j * scale_j * 2**V_BITS) f_jc + sum_j p_j (min_j - scale_j * 2**V_BITS)
            vs = vs * (1 << V_BITS)
            pv = prob[:, :, :, None] * vs[None, :, :, :]  # [QPK_PAD, GA, GB, VW]
            acc = acc * alpha[:, None, None, None] + tl.sum(pv[:, None, :, :, :] * vc, axis=2)
            acc_m = acc_m * alpha[:, None, None] + tl.sum(prob[:, :, :, None] * (vm - vs)[None, :, :, :], axis=1)
            m_i = m_new

    acc_out = tl.sum(acc, axis=2) + tl.sum(acc_m, axis=1)[:, None, :]  # [QPK_PAD, VPW, VW]: the GB partial sums
    base = (r * (QPK * tl.num_programs(1)) + h * QPK + rows) * NUM_SPLITS + split
    wmask = rmask & live
    tl.store(part_m_ptr + base, m_i, mask=wmask)
    tl.store(part_l_ptr + base, l_i, mask=wmask)
    tl.store(part_acc_ptr + base[:, None, None] * HEAD_PAD + vch[None, :, :], acc_out,
             mask=wmask[:, None, None])


@triton.jit
def _reduce_kernel(out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, seq_lens_ptr, qsl_ptr, stride_ot, stride_oh,
                   SLOTS: tl.constexpr, SLOTS_PAD: tl.constexpr, HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr):
    """out = sum_s exp2(m_s - M) acc_s / sum_s exp2(m_s - M) l_s, with M = max_s m_s (splits without keys have
    m_s = -inf and weigh 0): the "mma" kernel's second pass, program (r, query head)."""
    r = tl.program_id(0)
    hq = tl.program_id(1)
    q_start = tl.load(qsl_ptr + r).to(tl.int64)
    q_len = tl.load(qsl_ptr + r + 1) - q_start
    if (q_len == 1) & (tl.load(seq_lens_ptr + r) > 0):
        s = tl.arange(0, SLOTS_PAD)
        smask = s < SLOTS
        d = tl.arange(0, HEAD_PAD)
        base = (r * tl.num_programs(1) + hq) * SLOTS + s
        m = tl.load(part_m_ptr + base, mask=smask, other=float("-inf"))
        l = tl.load(part_l_ptr + base, mask=smask, other=0.0)
        m_max = tl.max(m, axis=0)
        w = tl.exp2(m - m_max)
        acc = tl.load(part_acc_ptr + base[:, None] * HEAD_PAD + d[None, :], mask=smask[:, None], other=0.0)
        o = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
        tl.store(out_ptr + q_start * stride_ot + hq * stride_oh + d, o.to(out_ptr.dtype.element_ty),
                 mask=d < HEAD_SIZE)


def fma_constexprs(layout: PageLayout, qpk: int, num_splits: int, num_stages: int = 1,
                   lane_rows: int | None = None) -> dict:
    """The constexprs :func:`decode` launches :func:`_decode_fma_kernel` with (``num_splits`` slots, which the open
    group's launch merges); ``benchmarks/kernel_resources.py`` compiles the kernel with the same. ``lane_rows`` None:
    :func:`default_lane_rows`."""
    lane_rows = default_lane_rows(qpk, layout.group_size, layout.v_bits) if lane_rows is None else lane_rows
    return dict(QPK=qpk, QPK_PAD=triton.next_power_of_2(qpk), NUM_SPLITS=num_splits,
                NUM_STAGES=num_stages, LANE_ROWS=lane_rows, **layout_args(layout))


def mma_constexprs(layout: PageLayout, qpk: int, num_stages: int, dot: dict) -> dict:
    """The constexprs of :func:`_decode_split_kernel` that do not depend on the launch mode (``NUM_SPLITS``,
    ``DO_GROUPS``, ``COMBINE`` and ``WORK_LIST`` do); ``dot``: :func:`.common.dot_args` of the query."""
    return dict(QPK=qpk, QPK_PAD=max(16, triton.next_power_of_2(qpk)), STAGE_DTYPE=stage_dtype(layout),
                NUM_STAGES=num_stages, **dot, **layout_args(layout))


def num_splits_for(num_reqs: int, num_kv_heads: int, target_programs: int = 4096, max_splits: int = 16) -> int:
    """Splits per (request, KV head): a power of two that brings the grid near ``target_programs`` programs
    (enough to fill an H200's 132 SMs several times: 4,096 for the 2-warp MMA kernel, 16,384 for the 1-warp FMA
    kernel), at least 1 and at most ``max_splits``. Depends only on
    the batch shape, so a CUDA graph captured for a batch size keeps its grid."""
    want = max(1, target_programs // max(1, num_reqs * num_kv_heads))
    return min(max_splits, triton.next_power_of_2(want))


def default_num_splits(kernel: str, num_reqs: int, num_kv_heads: int) -> int:
    """Splits per (request, KV head) that :func:`decode` uses by default: :func:`num_splits_for` with 4,096 target
    programs (at most 16 splits) for the 2-warp "mma" kernel, 16,384 (at most 32) for the 1-warp "fma" and "tc"
    kernels ("fma" keeps about 16-25 programs resident per SM, "tc" 8)."""
    if kernel == "mma":
        return num_splits_for(num_reqs, num_kv_heads)
    return num_splits_for(num_reqs, num_kv_heads, target_programs=16384, max_splits=32)


#: Programs of a decode kernel resident on one SM at once, for the kernels that run a work list (the metadata
#: builder makes one every step for a kernel listed here; the others keep the grid of :func:`default_num_splits`).
#: "tc": 8, one warp each (255 registers before the tenth session; with the 2 shared-memory stages of
#: ``decode_tc.STAGES``, 202 registers fit 9, but waves of 9 per SM (at 3 stages) took 1.12-1.37x the time of 8 at the
#: GQA shape, and of 11 or 12 with a register cap 1.11-1.53x: tenth session, docs/benchmarks.md; offline sm_90 compile,
#: ``benchmarks/kernel_resources.py``). The transposed loop (``decode_tc.TRANSPOSED``, 157 registers) fits 12: waves
#: of 12 took 0.95x the time of 8 at batch 64 / 4k-16k and 1.26-1.30x at batch 256 (thirteenth session, GQA shape,
#: ``decode_attention.py --work-target 1584``), so 8 stays. Why a work list sized
#: in waves of ``SMs x this``: on the H200 "tc" was fastest with about 1,024 programs whatever the batch
#: (2026-11-30, seventh session: batch 64 / 4k at 8 KV heads, 158 µs with 2 splits against 225 at the default 32),
#: and rows without work slow the launch down: a work list that left a third of its rows empty took 245 µs of
#: kernel time where the same items without the empty rows took 138 (716 against 518 at batch 256; eighth
#: session, ``benchmarks/decode_attention.py --work-variant``, docs/benchmarks.md).
WORK_PROGRAMS_PER_SM: dict[str, int] = {"tc": 8}

#: Warps per program of the open group's launch ("fma", "tc": one program per request and KV head, which also
#: merges the other kernel's slots) for each form (:func:`open_kernel_for`). Measured on the H200 with :data:`PDL`
#: (fifteenth session, ``decode_attention.py --open-warps 2|8`` against the default 4, kivi2 at 4k, batch 16 / 256):
#: "light" (Llama-2-7B shape) took 0.98x the time at 2 warps (99.7 / 1,275.2 µs against 101.8 / 1,296.2) and
#: 1.02-1.03x at 8; "dot" (GQA shape) 1.13x at 2 warps at batch 16 (45.9 against 40.8) and 0.99x at 256.
OPEN_WARPS_FOR: dict[str, int] = {"light": 2, "dot": 4}

#: Warps of the open group's launch whatever its form; None: :data:`OPEN_WARPS_FOR` the form
#: (``benchmarks/decode_attention.py --open-warps`` sets it).
OPEN_WARPS: int | None = None

#: The open group's launch, "light" or "dot" (:func:`open_kernel_for`); None: :func:`open_kernel_for` the shape.
#: ``benchmarks/decode_attention.py --open-kernel`` and ``scripts/decode_kernels_check.py --open-kernel`` set it.
OPEN_KERNEL: str | None = None


#: Programmatic dependent launch (Hopper, CUDA 12.3+; captured into CUDA graphs as programmatic edges): the open
#: group's launch is a dependent of the "fma"/"tc" kernel, which lets it start at once
#: (``griddepcontrol.launch_dependents``); its programs load the open group while that kernel still runs and wait for
#: its slots (``griddepcontrol.wait``, which waits for the whole first grid and its memory) only before merging them,
#: so the open group's load chains leave the step's critical path. Applies on compute capability 9.0+; False: a plain
#: launch after the first kernel (the fourteenth session's kernels). ``benchmarks/decode_attention.py --pdl 0|1``.
PDL = True


def pdl_for(device: torch.device) -> bool:
    """Whether the decode step's launches after the first kernel run as programmatic dependents on ``device`` (the
    open group in :func:`decode`, the store after it in :func:`kivi_vllm.kernels.forward`): :data:`PDL` and an
    NVIDIA GPU of compute capability 9.0 or newer (griddepcontrol is sm_90 PTX), never under the Triton
    interpreter (which cannot run it) or off CUDA.

    Args:
        device: the device of the step's tensors.
    """
    cap = cuda_capability(device)
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return bool(PDL) and cap is not None and cap >= (9, 0) and not interpreted


def open_kernel_for(qpk: int) -> str:
    """The open group's launch after the "fma" or "tc" kernel at ``qpk`` query heads per KV head: "light"
    (:func:`_open_group_kernel`: float32 multiply-adds over the [G, head_size] tiles, one query head after the
    other) at 1, "dot" (:func:`_decode_split_kernel` with ``COMBINE``: TF32 dots, the query heads padded to 16
    rows) above. Both merge the first launch's slots and write the output. Measured on the H200 (fourteenth
    session, ``decode_attention.py --profile``, kivi2 at 4k context, docs/benchmarks.md): at the Llama-2-7B shape
    (1 query head per KV head) "light" took 20.6 and 64.1 µs at batch 64 and 256 against 28.9 and 103.6 for "dot"
    (resident programs per SM, ``benchmarks/kernel_resources.py --open-group``: "dot" 4 at 112 registers x 4
    warps, "light" 8, then at 64 registers x 4 warps, now 124 x 2 warps, :data:`OPEN_WARPS_FOR`; the launch is
    waves of short dependent load chains); at 4 query heads per KV head "light" took
    19.1 and 61.5 against 10.6 and 29.8 (its per-head reductions over the tile run one after the other)."""
    return "light" if qpk == 1 else "dot"


def open_launch(qpk: int) -> tuple[str, int]:
    """The open group's launch :func:`decode` runs at ``qpk`` query heads per KV head, (form, warps per program):
    :data:`OPEN_KERNEL` if set, else :func:`open_kernel_for`; :data:`OPEN_WARPS` if set, else
    :data:`OPEN_WARPS_FOR` the form.

    Raises:
        ValueError: :data:`OPEN_KERNEL` other than None, "light" or "dot".
    """
    kind = OPEN_KERNEL or open_kernel_for(qpk)
    if kind not in ("light", "dot"):
        raise ValueError(f"KIVI decode: OPEN_KERNEL must be 'light', 'dot' or None, got {kind!r}")
    return kind, OPEN_WARPS or OPEN_WARPS_FOR[kind]


def set_options(open_kernel: str | None = None, open_warps: int | None = None, pdl: bool | None = None,
                **tc: int | None) -> None:
    """Set the decode path's module options that the benchmarks and checks vary (a None leaves one as it is):
    :data:`OPEN_KERNEL`, :data:`OPEN_WARPS`, :data:`PDL`, and ``tc`` = ``prefetch``, ``stages``, ``transposed`` for
    :mod:`.decode_tc`'s ``PREFETCH``, ``STAGES``, ``TRANSPOSED`` (imported, i.e. Gluon, only if one is given).
    The module's functions read them at each call. (``import kivi_vllm.kernels.decode`` binds the re-exported
    function ``decode``, not this module, so scripts call this rather than set attributes.)"""
    global OPEN_KERNEL, OPEN_WARPS, PDL
    OPEN_KERNEL = open_kernel or OPEN_KERNEL
    OPEN_WARPS = open_warps or OPEN_WARPS
    PDL = PDL if pdl is None else bool(pdl)
    tc = {name.upper(): v for name, v in tc.items() if v is not None}
    if tc:
        from . import decode_tc

        for name, v in tc.items():
            setattr(decode_tc, name, type(getattr(decode_tc, name))(v))


#: End group of a request's last work item: "to the end", the kernel clamps it to the device's group count.
WORK_END = 1 << 30


def wave_programs(kernel: str, device: torch.device) -> int | None:
    """Programs of ``kernel`` resident at once on ``device`` (SMs x :data:`WORK_PROGRAMS_PER_SM`): the wave a decode
    work list is sized in; None for kernels that run the split grid, and off CUDA."""
    if kernel not in WORK_PROGRAMS_PER_SM or device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count * WORK_PROGRAMS_PER_SM[kernel]


def work_capacity(num_reqs: int, num_kv_heads: int, wave_programs: int) -> int:
    """Rows (programs per KV head) of a decode work list: ``num_reqs`` rounded up to whole waves of ``per_head =
    max(1, wave_programs // num_kv_heads)`` rows (one wave up to ``per_head`` requests; the rows beyond one per
    request split the long ones). Depends only on the batch shape, so a CUDA graph captured for a batch size keeps
    its grid. Measured on the H200 (eighth session, docs/benchmarks.md): forcing at least ``per_head / 2`` spare rows
    (3 waves instead of 2 at batch 256, 8 KV heads) took 22% more time on uniform batches (703 against 578 µs at
    256 / 4k), so the rows are not padded beyond the wave."""
    per_head = max(1, wave_programs // num_kv_heads)
    return max(1, -(-num_reqs // per_head)) * per_head


def decode_work(query_start_loc: np.ndarray, seq_lens: np.ndarray, group_size: int, num_reqs: int,
                num_kv_heads: int, wave_programs: int, max_splits: int) -> tuple[np.ndarray, np.ndarray]:
    """A decode launch's work list: the complete groups of the step's one-token requests cut into contiguous
    ranges, one per row of :func:`work_capacity`, so that the grid is whole waves of programs that all have work
    (a batch of short requests gets few programs each, a long request among them many).

    Each decode request (query length 1) with ``n_r = (seq_len - 1) // G >= 1`` complete groups gets ``k_r`` items
    of ``n_r / k_r`` groups (rounded), ``1 <= k_r <= min(n_r, max_splits)``: first the fewest items that keep every
    item at most ``s`` groups, ``s`` the smallest size for which they fit the rows (water-filling: the longest
    request sets the step's time), then the rows left over, one at a time, to the requests with the most groups per
    item, so that every row has work unless no request can take more (rows without work slow the launch down:
    :data:`WORK_PROGRAMS_PER_SM`). Requests without complete groups get none (the open-group launch covers them). A
    request's last item ends at :data:`WORK_END`: the kernel clamps it to the group count it reads on the device, so
    ``seq_lens`` may be upper bounds (vLLM's ``seq_lens_cpu_upper_bound``). The scheduling idea is FlashInfer's
    split-KV ``plan``; the slots are FlashDecoding's.

    Args:
        query_start_loc: host [>= num_reqs + 1] int; seq_lens: host [>= num_reqs] int, context after the step (an
            upper bound is enough); num_reqs: requests of the launch (CUDA-graph padding included).
        group_size, num_kv_heads, wave_programs: as :func:`work_capacity` (``wave_programs``: SMs x
            :data:`WORK_PROGRAMS_PER_SM`); max_splits: the launch's ``num_splits`` (partial slots per request).

    Returns:
        items: [work_capacity, 4] int32 rows (request, slot, first group, end group), unused rows (-1, 0, 0, 0);
        counts: [num_reqs] int32 items per request.

    Raises:
        ValueError: num_reqs below 0, or num_kv_heads, wave_programs, max_splits or group_size below 1.
    """
    if num_reqs < 0 or min(num_kv_heads, wave_programs, max_splits, group_size) < 1:
        raise ValueError(f"KIVI decode_work: need num_reqs >= 0 and positive num_kv_heads, wave_programs, "
                         f"max_splits, group_size; got {num_reqs}, {num_kv_heads}, {wave_programs}, {max_splits}, "
                         f"{group_size}")
    cap = work_capacity(num_reqs, num_kv_heads, wave_programs)
    qsl = np.asarray(query_start_loc[: num_reqs + 1], dtype=np.int64)
    seq = np.asarray(seq_lens[:num_reqs], dtype=np.int64)
    n = np.where(np.diff(qsl) == 1, np.maximum(seq - 1, 0) // group_size, 0)
    kmax = np.minimum(n, max_splits)

    def items_at(size):  # fewest items per request with none above ``size`` groups
        return np.minimum(kmax, -(-n // size))

    lo_s, hi_s = 1, max(1, int(n.max(initial=0)))  # smallest size whose items fit the rows
    while lo_s < hi_s:
        mid = (lo_s + hi_s) // 2
        lo_s, hi_s = (lo_s, mid) if items_at(mid).sum() <= cap else (mid + 1, hi_s)
    k = items_at(lo_s)
    while (left := cap - int(k.sum())) > 0:
        open_ = np.nonzero(k < kmax)[0]
        if not len(open_):
            break
        take = open_[np.argsort(-n[open_] / k[open_], kind="stable")[:left]]
        k[take] += 1
    req = np.repeat(np.arange(num_reqs), k)
    slot = np.arange(len(req)) - np.repeat(np.cumsum(k) - k, k)
    lo = slot * n[req] // k[req]
    hi = np.where(slot == k[req] - 1, WORK_END, (slot + 1) * n[req] // k[req])
    items = np.zeros((cap, 4), dtype=np.int32)
    items[:, 0] = -1
    items[: len(req)] = np.stack([req, slot, lo, hi], axis=1)
    return items, k.astype(np.int32)


def default_lane_rows(qpk: int, group_size: int, v_bits: int = 2) -> int:
    """``lane_rows`` of the FMA decode kernel when the caller gives none: with 2-bit values 4 at 1 query head per KV
    head (MHA) and 2 with more (GQA); with 4-bit values 1; never more than the group size. Measured on the H200
    (``benchmarks/decode_attention.py --lane-rows N``, batches 64/256 x contexts 4k/16k, docs/benchmarks.md):
    KIVI-2, against 1, lane_rows 4 took 5.3-6.0% less time at the Llama-2-7B shape and -1% to +2% at 4 query heads
    per KV head, where 2 took 5.8-6.5% less (2026-11-30, third session); KIVI-4 is fastest at 1 in all 8 cells:
    lane_rows 4 took 30-35% more time at the Llama-2-7B shape (688 vs 508 µs at 64 / 4k) and 2 took 1-2% more at 4
    query heads per KV head (2026-11-30, fifth session; the 4-bit value tile is twice as many codes per word,
    so per-lane partial sums cost registers instead of saving shuffles)."""
    if v_bits != 2:
        return 1
    return min(4 if qpk == 1 else 2, group_size)


def kernel_for(qpk: int, group_size: int = 32, head_size: int = 128) -> str:
    """The decode kernel for ``qpk`` query heads per KV head: "fma" (CUDA cores) while one warp's tile of a group,
    ``qpk x G x head_pad`` multiply-adds, is at most that of 4 query heads at G=32 and head size 128, "mma" (tensor
    cores) above, where the FMA kernel's registers spill (sm_90 compile, ``benchmarks/kernel_resources.py --qpk N
    --group-size G --head-size D``, commit ``0e2b14f``: 96 registers at 1 query head / G 32 / head 128, 168 at
    G 128, 255 without spills at head 256 / G 64, 255 with 340 B spilled at 4 query heads; 4,364 B spilled at 4 query
    heads / G 128). Measured on the H200 (2026-11-30, docs/benchmarks.md): "fma" 0.63-0.69x the fp8 FA3 time at 1
    query head per KV head and 4k+ context, 1.4x faster than "mma" at 4 (1,325 vs 1,867 µs, batch 64 / 16k)."""
    return "fma" if qpk * group_size * triton.next_power_of_2(head_size) <= 4 * 32 * 128 else "mma"


def tc_supports(layout: PageLayout, qpk: int) -> str | None:
    """None if the "tc" kernel (:mod:`.decode_tc`) handles ``qpk`` query heads per KV head on pages of ``layout``,
    else why not: at most 16 query heads per KV head (two 8-column MMA tiles in the transposed form, one 16-row
    tile in the other), head size 64 or 128 (a quarter of a key row must be whole 32-bit words; the float32 output
    accumulator is [128, 8], 32 registers per thread, transposed, [16, 128], 64 registers, not), group size a
    multiple of 16. (Here, not in :mod:`.decode_tc`, so that choosing a kernel never imports Gluon.)"""
    if qpk > 16:
        return f"{qpk} query heads per KV head (at most 16)"
    if layout.head_size not in (64, 128):
        return f"head size {layout.head_size} (64 or 128)"
    if layout.group_size % 16:
        return f"group size {layout.group_size} (a multiple of 16)"
    return None


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of an NVIDIA CUDA ``device``; None on the CPU and on ROCm (whose torch also says "cuda")."""
    if device.type != "cuda" or torch.version.hip is not None:
        return None
    return torch.cuda.get_device_capability(device)


def default_kernel(layout: PageLayout, qpk: int, capability: tuple[int, int] | None) -> str:
    """The decode kernel :func:`decode` runs when the caller names none: on an NVIDIA GPU of compute capability 8.0 or
    newer (``capability``, :func:`cuda_capability`; the "tc" kernel's ``mma.sync.m16n8k16`` and inline PTX), "tc"
    (:mod:`.decode_tc`, tensor cores with register operands) where :func:`tc_supports` the shape; otherwise
    :func:`kernel_for`. Measured on the H200 (2026-11-30, ``benchmarks/decode_attention.py --kernel tc|fma``,
    docs/benchmarks.md), KIVI-2 at batch 64-256, 4k-16k context: "tc" takes 0.69-0.80x the "fma" kernel's time at 2
    query heads per KV head, 0.46-0.63x at 3 (both timed with ``maxnreg=168``, 0-9% slower than the default at 4),
    0.47-0.66x at 4 and 0.11-0.29x at 8. At 1 query head per KV head (MHA) the 16-row form was slower than "fma" (559 vs
    464 µs at 64 / 4k); the transposed form (``decode_tc.TRANSPOSED``, query heads padded to 8 columns) took 0.81-1.00x
    its time at batch 16-256, 1k-16k, at the Llama-2-7B shape (thirteenth session, docs/benchmarks.md), so "tc" is the
    default there too. Its fp16 operands are less accurate than "fma"'s float32 at very sharp attention
    (docs/benchmarks.md, ``benchmarks/tc_rounding.py``)."""
    if capability is not None and capability >= (8, 0) and tc_supports(layout, qpk) is None:
        return "tc"
    return kernel_for(qpk, layout.group_size, layout.head_size)


def decode(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    layout: PageLayout,
    scale: float,
    out: torch.Tensor,
    num_reqs: int | None = None,
    num_splits: int | None = None,
    num_stages: int = 1,
    num_warps: int | None = None,
    lane_rows: int | None = None,
    kernel: str | None = None,
    maxnreg: int | None = None,
    rescale_slack: float | None = None,
    work: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Attention of every one-token request of the batch over its KIVI pages (before this step's store).

    Args:
        query: [T, num_heads, head_size]; key, value: [T, num_kv_heads, head_size] (this step's rows, model dtype).
        kv_cache: [num_blocks, num_kv_heads, layout.page_bytes] uint8 (this layer's pages; read only).
        block_table: [>= num_reqs, max_blocks] int32 physical block ids.
        query_start_loc: [num_reqs + 1] int32 (device); requests with a query length other than 1 are skipped
            (the prefill kernel handles them), as are requests with seq_len 0 (CUDA-graph padding).
        seq_lens: [num_reqs] int32, context length including this step's token.
        layout: page layout. scale: softmax scale (e.g. head_size ** -0.5).
        out: [T, num_heads, head_size]; rows of one-token requests are written.
        num_reqs: requests of the batch (default ``len(seq_lens)``); num_splits: default :func:`default_num_splits`.
        num_stages: Triton software-pipelining depth of the split kernel's group loop: with more than 1, Triton
            stages the next groups' loads with ``cp.async`` through shared memory (MMA kernel: measured slower,
            docs/benchmarks.md; FMA kernel: 7-20% slower at 1 query head per KV head, 4-7% faster at 4, H200).
        lane_rows: FMA kernel only: the value sums over a group's rows keep ``lane_rows`` partial sums (the rows
            spread over lanes) and add them once after the loop instead of per group; a power of two dividing the
            group size; default :func:`default_lane_rows` (2-bit values: 4 at 1 query head per KV head, 2 above;
            4-bit values: 1; the fastest on the H200, docs/benchmarks.md).
        num_warps: warps per program of the split kernel (default 1 for "fma", 2 for "mma"; "tc" takes only 1;
            the FMA and TC paths' open-group launch uses :func:`open_launch`'s).
        kernel: "fma" (CUDA cores, codes in their word layout: :func:`_decode_fma_kernel`), "mma" (tensor cores,
            rows padded to 16 query heads: :func:`_decode_split_kernel`) or "tc" (tensor cores with operands built
            in registers, Gluon, NVIDIA sm_80+ only: :mod:`.decode_tc`); default :func:`default_kernel`.
        maxnreg: "fma" and "tc" (ignored by "mma"): cap on registers per thread (Triton's ``maxnreg``; ptxas spills
            above it), for more programs per SM; default none (the compiler's choice; measured: caps are slower or
            equal on the H200, docs/benchmarks.md).
        rescale_slack: "tc" only (ignored by the others): see :func:`.decode_tc.tc_constexprs` (default
            ``decode_tc.RESCALE_SLACK``).
        work: "fma" and "tc" only: (items [P, 4], counts [num_reqs]) int32 on the query's device, a work list from
            :func:`decode_work` made with this launch's ``num_reqs`` and ``num_splits`` (read by the kernels, so a
            CUDA graph replays whatever the buffers hold): the grid is (P, num_kv_heads) work items instead of
            (num_reqs, num_kv_heads, num_splits). None: the split grid.

    Returns:
        ``out``.

    Raises:
        ValueError: shapes that do not match the layout, num_heads not a multiple of num_kv_heads, tensors not
            contiguous in head_size, num_splits not a power of 2, lane_rows not a power of 2 dividing the group
            size, an unknown kernel, or "tc" off NVIDIA GPUs of compute capability 8.0+, outside
            :func:`tc_supports`, with num_warps other than 1 or with rescale_slack outside [0, 15], or a ``work``
            with the "mma" kernel or that is not (int32 [P, 4] with P >= num_reqs, int32 [>= num_reqs]) on the
            query's device.
    """
    HQ, H = check_attention("decode", query, key, value, out, kv_cache, layout)
    R = len(seq_lens) if num_reqs is None else num_reqs
    cap = cuda_capability(query.device)
    kernel = kernel or default_kernel(layout, HQ // H, cap)
    if kernel not in ("fma", "mma", "tc"):
        raise ValueError(f"KIVI decode: kernel must be 'fma', 'mma' or 'tc', got {kernel!r}")
    if kernel == "tc":
        if cap is None or cap < (8, 0):
            raise ValueError("KIVI decode: the 'tc' kernel (Gluon, mma.sync.m16n8k16, inline PTX) runs on NVIDIA "
                             f"GPUs of compute capability 8.0 or newer only, not on {query.device}")
        reason = tc_supports(layout, HQ // H)
        if reason:
            raise ValueError(f"KIVI decode: the 'tc' kernel does not support {reason}")
        if num_warps not in (None, 1):
            raise ValueError(f"KIVI decode: the 'tc' kernel runs one warp per program, got num_warps={num_warps}")
        from . import decode_tc
    if lane_rows is None:
        lane_rows = default_lane_rows(HQ // H, layout.group_size, layout.v_bits)
    if lane_rows < 1 or lane_rows & (lane_rows - 1) or layout.group_size % lane_rows:
        raise ValueError(f"KIVI decode: lane_rows must be a power of two dividing the group size "
                         f"{layout.group_size}, got {lane_rows}")
    if work is not None:
        items, counts = work
        if kernel == "mma":
            raise ValueError("KIVI decode: a work list needs the 'fma' or 'tc' kernel, not 'mma'")
        if (items.dtype != torch.int32 or counts.dtype != torch.int32 or items.dim() != 2 or items.shape[1] != 4
                or items.shape[0] < R or counts.numel() < R or items.device != query.device
                or counts.device != query.device or not items.is_contiguous()):
            raise ValueError(f"KIVI decode: work must be (int32 [>= {R}, 4] contiguous, int32 [>= {R}]) on "
                             f"{query.device}, got {items.dtype} {tuple(items.shape)} on {items.device}, "
                             f"{counts.dtype} {tuple(counts.shape)} on {counts.device}")
    else:
        items = counts = seq_lens  # placeholders, not read (WORK_LIST False)
    if R == 0:
        return out
    S = num_splits or default_num_splits(kernel, R, H)
    if S & (S - 1):
        raise ValueError(f"KIVI decode: num_splits ({S}) must be a power of 2")
    qpk = HQ // H
    pad = triton.next_power_of_2(layout.head_size)
    part_m = torch.empty(R * HQ * S, dtype=torch.float32, device=query.device)  # a slot per split or work item
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(R * HQ * S * pad, dtype=torch.float32, device=query.device)
    grid = (R, H, S) if work is None else (items.shape[0], H, 1)
    args = (query, key, value, kv_cache, block_table, seq_lens, query_start_loc, part_m, part_l, part_acc, scale,
            query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
            kv_cache.stride(0), kv_cache.stride(1), block_table.stride(0))
    out_args = (out, counts, out.stride(0), out.stride(1))
    mma = mma_constexprs(layout, qpk, num_stages, dot_args(query))
    if kernel in ("fma", "tc"):
        # the open group's launch below starts while this kernel runs (the interpreter ignores launch_pdl)
        pdl = pdl_for(query.device)
        if kernel == "fma":
            _decode_fma_kernel[grid](*args[:11], ONE_F32_BITS, *args[11:], items, num_warps=num_warps or 1,
                                     maxnreg=maxnreg, WORK_LIST=work is not None, PDL=pdl,
                                     **fma_constexprs(layout, qpk, S, num_stages, lane_rows))
        else:
            decode_tc.tc_kernel()[grid](
                query, kv_cache, block_table, seq_lens, query_start_loc, part_m, part_l, part_acc, scale,
                query.stride(0), query.stride(1), kv_cache.stride(0), kv_cache.stride(1),
                block_table.stride(0), items, num_warps=num_warps or 1, maxnreg=maxnreg, WORK_LIST=work is not None,
                PDL=pdl, **decode_tc.tc_constexprs(layout, qpk, S,
                                          decode_tc.RESCALE_SLACK if rescale_slack is None else rescale_slack,
                                          decode_tc.PREFETCH))
        # the open group (stage rows and this step's token), merged with the slots above into ``out``
        kind, warps = open_launch(qpk)
        if kind == "light":
            _open_group_kernel[(R, H)](*args, *out_args, QPK=qpk, NUM_SPLITS=S, WORK_LIST=work is not None,
                                       STAGE_DTYPE=stage_dtype(layout), PDL=pdl, num_warps=warps, launch_pdl=pdl,
                                       **layout_args(layout))
        else:
            _decode_split_kernel[(R, H, 1)](*args, *out_args, NUM_SPLITS=S, DO_GROUPS=False, COMBINE=True,
                                            WORK_LIST=work is not None, PDL=pdl, num_warps=warps, launch_pdl=pdl,
                                            **mma)
        return out
    _decode_split_kernel[(R, H, S)](*args, *out_args, NUM_SPLITS=S, DO_GROUPS=True,
                                    num_warps=num_warps or 2, **mma)
    _reduce_kernel[(R, HQ)](out, part_m, part_l, part_acc, seq_lens, query_start_loc, out.stride(0), out.stride(1),
                            SLOTS=S, SLOTS_PAD=triton.next_power_of_2(S), HEAD_SIZE=layout.head_size, HEAD_PAD=pad,
                            num_warps=4)
    return out
