"""Decode attention over KIVI pages: split-KV (flash-decoding) with an online softmax, then a reduction (Triton).

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

so the kernel multiplies the query by the group's scale once ([QH, D]), takes one dot with the raw codes
([QH, D] x [D, G]) and adds one scalar per query head (q . m). Values are per token (scale per token and channel
group), so they are dequantized in registers (``c * s + m``) before the probability-weighted sum.

The grid is (num_reqs, num_kv_heads, num_splits) with a fixed ``num_splits`` per batch size, so the launch shape
does not depend on context lengths and the whole decode step can be captured in a CUDA graph. Split s handles a
contiguous range of groups; the last split also handles the open group. ``_reduce_kernel`` merges the splits'
(max, sum, accumulator) triples (FlashDecoding, Dao et al. 2023; vLLM ``triton_decode_attention.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import PageLayout
from .common import LOG2E, check_attention, dot_args, gather_codes, layout_args, load_value_scales, stage_dtype


@triton.jit
def _decode_split_kernel(
    q_ptr, key_ptr, value_ptr, kv_ptr, block_table_ptr, seq_lens_ptr, qsl_ptr,
    part_m_ptr, part_l_ptr, part_acc_ptr, sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cache_block, stride_cache_head, stride_bt,
    QPK: tl.constexpr, QPK_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr, STAGE_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, GROUP_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, V_GROUP: tl.constexpr, RECORD_BYTES: tl.constexpr,
    OFF_KC: tl.constexpr, OFF_KS: tl.constexpr, OFF_KM: tl.constexpr, OFF_VC: tl.constexpr,
    OFF_VS: tl.constexpr, OFF_VM: tl.constexpr, OFF_KSTAGE: tl.constexpr, OFF_VSTAGE: tl.constexpr,
    RESIDUAL_KV: tl.constexpr,
):
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
        if split == NUM_SPLITS - 1:
            # the open group, exact: positions n_full*G .. p; earlier ones staged, p itself is this step's token
            n_staged = p - n_full * G
            blk = tl.load(bt_row + n_full // GROUPS_PER_PAGE).to(tl.int64)
            page = kv_ptr + blk * stride_cache_block + h * stride_cache_head
            staged = i < n_staged
            new = i == n_staged
            m2 = dmask[None, :]
            k_st = tl.load((page + OFF_KSTAGE).to(tl.pointer_type(STAGE_DTYPE)) + i[:, None] * HEAD_SIZE + d[None, :],
                           mask=staged[:, None] & m2, other=0.0).to(tl.float32)
            k_new = tl.load(key_ptr + q_start * stride_kt + h * stride_kh + d, mask=dmask, other=0.0)
            k_new = k_new.to(STAGE_DTYPE).to(tl.float32)
            k_ex = tl.where(new[:, None], k_new[None, :], k_st)
            s = tl.dot(q.to(DOT_DTYPE), tl.trans(k_ex.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
            s = tl.where((i <= n_staged)[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            prob = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(prob, axis=1)
            v_new = tl.load(value_ptr + q_start * stride_vt + h * stride_vh + d, mask=dmask, other=0.0)
            v_new = v_new.to(STAGE_DTYPE).to(tl.float32)
            if RESIDUAL_KV:
                v_old = tl.load((page + OFF_VSTAGE).to(tl.pointer_type(STAGE_DTYPE)) + i[:, None] * HEAD_SIZE
                                + d[None, :], mask=staged[:, None] & m2, other=0.0).to(tl.float32)
            else:
                # residual="k": earlier values of the open group were quantized per token on arrival
                rec = page + (n_full % GROUPS_PER_PAGE) * RECORD_BYTES
                vc = gather_codes(rec + OFF_VC, i[:, None], staged[:, None], d[None, :], V_ROW, V_BITS,
                                  HEAD_SIZE).to(tl.float32)
                v_scale = load_value_scales(rec + OFF_VS, i, staged, G, HEAD_PAD, HEAD_SIZE, V_GROUP)
                v_min = load_value_scales(rec + OFF_VM, i, staged, G, HEAD_PAD, HEAD_SIZE, V_GROUP)
                v_old = vc * v_scale + v_min
            v_ex = tl.where(new[:, None], v_new[None, :], v_old)
            acc = acc * alpha[:, None] + tl.dot(prob.to(DOT_DTYPE), v_ex.to(DOT_DTYPE), input_precision=DOT_PRECISION)
            m_i = m_new

    base = (r * (QPK * tl.num_programs(1)) + h * QPK + rows) * NUM_SPLITS + split
    tl.store(part_m_ptr + base, m_i, mask=rmask)
    tl.store(part_l_ptr + base, l_i, mask=rmask)
    tl.store(part_acc_ptr + base[:, None] * HEAD_PAD + d[None, :], acc, mask=rmask[:, None])


@triton.jit
def _reduce_kernel(out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, seq_lens_ptr, qsl_ptr, stride_ot, stride_oh,
                   NUM_SPLITS: tl.constexpr, HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr):
    """out = sum_s exp2(m_s - M) acc_s / sum_s exp2(m_s - M) l_s, with M = max_s m_s (splits without keys have
    m_s = -inf and weigh 0)."""
    r = tl.program_id(0)
    hq = tl.program_id(1)
    q_start = tl.load(qsl_ptr + r).to(tl.int64)
    q_len = tl.load(qsl_ptr + r + 1) - q_start
    if (q_len == 1) & (tl.load(seq_lens_ptr + r) > 0):
        s = tl.arange(0, NUM_SPLITS)
        d = tl.arange(0, HEAD_PAD)
        base = (r * tl.num_programs(1) + hq) * NUM_SPLITS + s
        m = tl.load(part_m_ptr + base)
        l = tl.load(part_l_ptr + base)
        m_max = tl.max(m, axis=0)
        w = tl.exp2(m - m_max)
        acc = tl.load(part_acc_ptr + base[:, None] * HEAD_PAD + d[None, :])
        o = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
        tl.store(out_ptr + q_start * stride_ot + hq * stride_oh + d, o.to(out_ptr.dtype.element_ty),
                 mask=d < HEAD_SIZE)


def num_splits_for(num_reqs: int, num_kv_heads: int, target_programs: int = 4096, max_splits: int = 16) -> int:
    """Splits per (request, KV head): a power of two that brings the grid near ``target_programs`` programs
    (enough to fill an H200's 132 SMs several times), at least 1 and at most ``max_splits``. Depends only on
    the batch shape, so a CUDA graph captured for a batch size keeps its grid."""
    want = max(1, target_programs // max(1, num_reqs * num_kv_heads))
    return min(max_splits, triton.next_power_of_2(want))


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
    num_warps: int = 2,
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
        num_reqs: requests of the batch (default ``len(seq_lens)``); num_splits: default :func:`num_splits_for`.
        num_stages: Triton software-pipelining depth of the group loop: with more than 1, Triton stages the next
            groups' records in shared memory with ``cp.async`` while this one computes (docs/benchmarks.md).
        num_warps: warps per program.

    Returns:
        ``out``.

    Raises:
        ValueError: shapes that do not match the layout, num_heads not a multiple of num_kv_heads, tensors not
            contiguous in head_size, or num_splits not a power of 2.
    """
    HQ, H = check_attention("decode", query, key, value, out, kv_cache, layout)
    R = len(seq_lens) if num_reqs is None else num_reqs
    if R == 0:
        return out
    S = num_splits or num_splits_for(R, H)
    if S & (S - 1):
        raise ValueError(f"KIVI decode: num_splits ({S}) must be a power of 2")
    qpk = HQ // H
    pad = triton.next_power_of_2(layout.head_size)
    part_m = torch.empty(R * HQ * S, dtype=torch.float32, device=query.device)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(R * HQ * S * pad, dtype=torch.float32, device=query.device)
    _decode_split_kernel[(R, H, S)](
        query, key, value, kv_cache, block_table, seq_lens, query_start_loc, part_m, part_l, part_acc, scale,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), block_table.stride(0),
        QPK=qpk, QPK_PAD=max(16, triton.next_power_of_2(qpk)), NUM_SPLITS=S, STAGE_DTYPE=stage_dtype(layout),
        NUM_STAGES=num_stages, **dot_args(query), num_warps=num_warps, **layout_args(layout),
    )
    _reduce_kernel[(R, HQ)](out, part_m, part_l, part_acc, seq_lens, query_start_loc, out.stride(0), out.stride(1),
                            NUM_SPLITS=S, HEAD_SIZE=layout.head_size, HEAD_PAD=pad, num_warps=4)
    return out
