"""Prefill / continuation-chunk attention over KIVI pages with KIVI's streaming visibility rule (Triton).

Rule (docs/design.md §4-5, :func:`kivi_vllm.reference.forward`): a query at position p sees key j <= p
dequantized when j's group was complete before p (``j // G < p // G``) and exactly otherwise; with
prefill="exact" only the groups complete before the chunk (``j // G < ctx // G``) are dequantized. Values follow
keys (residual="kv"), or are dequantized for every j < p (j < ctx with prefill="exact") with residual="k".

Where the bytes come from: dequantized groups from their records; exact keys/values of this step from
``key``/``value``; exact keys/values of the group that was open before the step from the page's stage. A query
in a later group than the request's first group (``ctx // G``) sees that first group, and every group the chunk
completes before it, dequantized, so it must run *after* this step's store; a query in the first group reads the
stage, so it must run before store phase 1 and, with residual="kv" (whose last record shares bytes with the
stage), before store phase 0 too (``kivi_vllm.kernels.store``; the order is in :func:`kivi_vllm.kernels.forward`).
Hence ``phase``: 0 = rows in each request's first group, 1 = the other rows (after both store phases).

One program per (query tile, KV head): ``BLOCK_Q`` query tokens x all query heads of the KV head (GQA) form the
rows of one tile. The groups below every row's own group (all of a continuation chunk's cached prefix, and the
chunk's groups before the tile) are read dequantized by every row and are all causal: a branch-free "bulk" loop
takes them ``bulk_groups`` groups (one page's consecutive records) per step. A second loop walks the rest one group
(``G`` keys) at a time: groups around the rows' own groups compute both versions (dequantized, exact) and pick per
element. No scratch memory: everything stays in registers.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from ..layout import PageLayout
from .common import (LOG2E, ONE_F32_BITS, check_attention, dot_args, gather_codes, layout_args, load_value_scales,
                     stage_dtype, unit_codes, unit_codes_at, value_scales_at)


@triton.jit
def _prefill_kernel(
    q_ptr, key_ptr, value_ptr, out_ptr, kv_ptr, block_table_ptr, seq_lens_ptr, qsl_ptr, tile_req_ptr,
    tile_start_ptr, sm_scale, one_bits,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_cache_block, stride_cache_head, stride_bt,
    QPK: tl.constexpr, QPK_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, PHASE: tl.constexpr, EXACT: tl.constexpr,
    STAGE_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, GROUP_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, V_GROUP: tl.constexpr, RECORD_BYTES: tl.constexpr,
    OFF_KC: tl.constexpr, OFF_KS: tl.constexpr, OFF_KM: tl.constexpr, OFF_VC: tl.constexpr,
    OFF_VS: tl.constexpr, OFF_VM: tl.constexpr, OFF_KSTAGE: tl.constexpr, OFF_VSTAGE: tl.constexpr,
    RESIDUAL_KV: tl.constexpr, UNPACK_WORDS: tl.constexpr = False, BULK_GROUPS: tl.constexpr = 0,
    BULK_16: tl.constexpr = False, BULK_F16: tl.constexpr = False, SKIP_FIRST_CHUNKS: tl.constexpr = False,
):
    G: tl.constexpr = GROUP_SIZE
    M: tl.constexpr = BLOCK_Q * QPK_PAD
    GROUPS_PER_PAGE: tl.constexpr = BLOCK_SIZE // GROUP_SIZE
    tile = tl.program_id(0)
    h = tl.program_id(1)
    r = tl.load(tile_req_ptr + tile)
    a = tl.load(tile_start_ptr + tile)  # first query of the tile, relative to the request's chunk
    q_start = tl.load(qsl_ptr + r).to(tl.int64)
    q_len = (tl.load(qsl_ptr + r + 1) - q_start).to(tl.int32)
    ctx = tl.load(seq_lens_ptr + r) - q_len  # tokens cached before this step
    g0 = ctx // G  # the request's first group in this step

    row = tl.arange(0, M)
    tok = a + row // QPK_PAD  # query token within the chunk
    head = h * QPK + row % QPK_PAD
    pos = ctx + tok  # absolute positions of the rows
    if EXACT:
        rvalid = (tok < q_len) & (row % QPK_PAD < QPK)
        if SKIP_FIRST_CHUNKS:  # another launch (FlashAttention) wrote the rows of requests with nothing cached
            rvalid = rvalid & (ctx > 0)
        k_lim = tl.zeros((M,), tl.int32) + g0  # groups below this are read dequantized
        v_lim = tl.zeros((M,), tl.int32) + ctx  # residual="k": values below this position dequantized
    else:
        rvalid = (tok < q_len) & (row % QPK_PAD < QPK) & (((pos // G) == g0) == (PHASE == 0))
        k_lim = pos // G
        v_lim = pos
    if RESIDUAL_KV:
        v_lim = k_lim * G  # values follow keys
    any_row = tl.max(rvalid.to(tl.int32), axis=0) > 0
    if any_row:
        d = tl.arange(0, HEAD_PAD)
        dmask = d < HEAD_SIZE
        i = tl.arange(0, G)
        q_raw = tl.load(q_ptr + (q_start + tok[:, None]) * stride_qt + head[:, None] * stride_qh + d[None, :],
                        mask=rvalid[:, None] & dmask[None, :], other=0.0)
        q = q_raw.to(tl.float32) * (sm_scale * LOG2E)
        big = 1 << 30
        p_max = tl.max(tl.where(rvalid, pos, -1), axis=0)
        k_lim_min = tl.min(tl.where(rvalid, k_lim, big), axis=0)
        k_lim_max = tl.max(tl.where(rvalid, k_lim, -1), axis=0)
        v_lim_max = tl.max(tl.where(rvalid, v_lim, -1), axis=0)
        m_i = tl.full((M,), float("-inf"), tl.float32)
        l_i = tl.zeros((M,), tl.float32)
        acc = tl.zeros((M, HEAD_PAD), tl.float32)
        bt_row = block_table_ptr + r * stride_bt
        m2 = dmask[None, :]
        g_first = 0
        if BULK_GROUPS > 0:
            # Groups below every row's own group: all rows read their keys and values dequantized and every key
            # is causal for every row, so BULK_GROUPS groups (one page's consecutive records) go through one
            # branch-free step with BULK_GROUPS * G keys.
            NB: tl.constexpr = BULK_GROUPS * G
            nb = tl.arange(0, NB)
            nb_rec = (nb // G) * RECORD_BYTES
            nb_tok = nb % G
            gi = tl.arange(0, BULK_GROUPS)
            all_n = nb < NB
            n_bulk = k_lim_min // BULK_GROUPS
            if BULK_16:
                if BULK_F16:  # fp16 operands whatever the model dtype (a bf16 query clamped to fp16's range)
                    q16 = tl.clamp(q_raw.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
                else:  # the model's own 16-bit query
                    q16 = q_raw
            for gb in range(n_bulk):
                gf = gb * BULK_GROUPS
                blk = tl.load(bt_row + gf // GROUPS_PER_PAGE).to(tl.int64)
                recs0 = (kv_ptr + blk * stride_cache_block + h * stride_cache_head
                         + (gf % GROUPS_PER_PAGE) * RECORD_BYTES)
                ks_ptr = (recs0 + gi * RECORD_BYTES)[:, None]
                k_scale = tl.load((ks_ptr + OFF_KS).to(tl.pointer_type(tl.float16)) + d[None, :], mask=m2,
                                  other=0.0).to(tl.float32) * (1 << K_BITS)
                k_min = tl.load((ks_ptr + OFF_KM).to(tl.pointer_type(tl.float16)) + d[None, :], mask=m2,
                                other=0.0).to(tl.float32) - k_scale
                k_s = tl.reshape(tl.broadcast_to(k_scale[:, None, :], (BULK_GROUPS, G, HEAD_PAD)), (NB, HEAD_PAD))
                k_m = tl.reshape(tl.broadcast_to(k_min[:, None, :], (BULK_GROUPS, G, HEAD_PAD)), (NB, HEAD_PAD))
                recs = recs0 + nb_rec
                k_deq = unit_codes_at(recs + OFF_KC + nb_tok * (HEAD_SIZE * K_BITS // 8), all_n, one_bits, NB,
                                      K_BITS, HEAD_SIZE, HEAD_PAD) * k_s + k_m
                if BULK_16:  # 16-bit query and keys, the scores scaled in float32
                    s = tl.dot(q16, tl.trans(k_deq.to(q16.dtype))) * (sm_scale * LOG2E)
                else:
                    s = tl.dot(q.to(DOT_DTYPE), tl.trans(k_deq.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                alpha = tl.exp2(m_i - m_new)
                prob = tl.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(prob, axis=1)
                acc = acc * alpha[:, None]
                v_s = value_scales_at((recs + OFF_VS).to(tl.pointer_type(tl.float16)) + nb_tok * (HEAD_SIZE // V_GROUP),
                                      all_n, NB, HEAD_PAD, HEAD_SIZE, V_GROUP) * (1 << V_BITS)
                v_m = value_scales_at((recs + OFF_VM).to(tl.pointer_type(tl.float16)) + nb_tok * (HEAD_SIZE // V_GROUP),
                                      all_n, NB, HEAD_PAD, HEAD_SIZE, V_GROUP) - v_s
                v_deq = unit_codes_at(recs + OFF_VC + nb_tok * (HEAD_SIZE * V_BITS // 8), all_n, one_bits, NB,
                                      V_BITS, HEAD_SIZE, HEAD_PAD) * v_s + v_m
                if BULK_16:
                    acc += tl.dot(prob.to(q16.dtype), v_deq.to(q16.dtype))
                else:
                    acc += tl.dot(prob.to(DOT_DTYPE), v_deq.to(DOT_DTYPE), input_precision=DOT_PRECISION)
                m_i = m_new
            g_first = n_bulk * BULK_GROUPS
        for g in range(g_first, p_max // G + 1):
            blk = tl.load(bt_row + g // GROUPS_PER_PAGE).to(tl.int64)
            page = kv_ptr + blk * stride_cache_block + h * stride_cache_head
            rec = page + (g % GROUPS_PER_PAGE) * RECORD_BYTES
            j = g * G + i  # key positions
            # dequantized version, where some row reads it
            s_q = tl.zeros((M, G), tl.float32)
            if g < k_lim_max:
                k_scale = tl.load((rec + OFF_KS).to(tl.pointer_type(tl.float16)) + d, mask=dmask, other=0.0)
                k_min = tl.load((rec + OFF_KM).to(tl.pointer_type(tl.float16)) + d, mask=dmask, other=0.0)
                if UNPACK_WORDS:  # f = 1 + code / 2^K_BITS: code * s + m = f * (s 2^K_BITS) + (m - s 2^K_BITS)
                    k_f = unit_codes(rec + OFF_KC, i, i < G, one_bits, G, HEAD_SIZE * K_BITS // 8, K_BITS,
                                     HEAD_SIZE, HEAD_PAD)
                    k_s = k_scale.to(tl.float32) * (1 << K_BITS)
                    k_deq = k_f * k_s[None, :] + (k_min.to(tl.float32) - k_s)[None, :]
                else:
                    k_codes = gather_codes(rec + OFF_KC, i[:, None], (i < G)[:, None], d[None, :],
                                           HEAD_SIZE * K_BITS // 8, K_BITS, HEAD_SIZE).to(tl.float32)
                    k_deq = k_codes * k_scale.to(tl.float32)[None, :] + k_min.to(tl.float32)[None, :]
                s_q = tl.dot(q.to(DOT_DTYPE), tl.trans(k_deq.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
            # exact version, for rows whose own group this is: earlier steps' tokens from the stage
            s_e = tl.zeros((M, G), tl.float32)
            from_step = j >= ctx
            if g >= k_lim_min:
                ex = (j <= p_max)[:, None] & m2
                k_new = tl.load(key_ptr + (q_start + j - ctx)[:, None] * stride_kt + h * stride_kh + d[None, :],
                                mask=ex & from_step[:, None], other=0.0).to(STAGE_DTYPE).to(tl.float32)
                k_old = tl.load((page + OFF_KSTAGE).to(tl.pointer_type(STAGE_DTYPE)) + (j % G)[:, None] * HEAD_SIZE
                                + d[None, :], mask=ex & (~from_step[:, None]), other=0.0).to(tl.float32)
                s_e = tl.dot(q.to(DOT_DTYPE), tl.trans(tl.where(from_step[:, None], k_new, k_old).to(DOT_DTYPE)),
                             input_precision=DOT_PRECISION)
            k_quant = g < k_lim[:, None]
            causal = j[None, :] <= pos[:, None]
            s = tl.where(k_quant, s_q, tl.where(causal, s_e, float("-inf")))
            s = tl.where(rvalid[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
            alpha = tl.exp2(m_i - m_new)
            prob = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(prob, axis=1)
            acc = acc * alpha[:, None]
            v_quant = j[None, :] < v_lim[:, None]
            if g * G < v_lim_max:
                v_scale = load_value_scales(rec + OFF_VS, i, j < v_lim_max, G, HEAD_PAD, HEAD_SIZE, V_GROUP)
                v_min = load_value_scales(rec + OFF_VM, i, j < v_lim_max, G, HEAD_PAD, HEAD_SIZE, V_GROUP)
                if UNPACK_WORDS:
                    v_f = unit_codes(rec + OFF_VC, i, j < v_lim_max, one_bits, G, HEAD_SIZE * V_BITS // 8, V_BITS,
                                     HEAD_SIZE, HEAD_PAD)
                    v_s = v_scale * (1 << V_BITS)
                    v_deq = v_f * v_s + (v_min - v_s)
                else:
                    v_codes = gather_codes(rec + OFF_VC, i[:, None], (j < v_lim_max)[:, None], d[None, :],
                                           HEAD_SIZE * V_BITS // 8, V_BITS, HEAD_SIZE).to(tl.float32)
                    v_deq = v_codes * v_scale + v_min
                acc += tl.dot(tl.where(v_quant, prob, 0.0).to(DOT_DTYPE), v_deq.to(DOT_DTYPE), input_precision=DOT_PRECISION)
            if g * G + G > tl.min(tl.where(rvalid, v_lim, big), axis=0):
                ex = (j <= p_max)[:, None] & m2
                v_new = tl.load(value_ptr + (q_start + j - ctx)[:, None] * stride_vt + h * stride_vh + d[None, :],
                                mask=ex & from_step[:, None], other=0.0).to(STAGE_DTYPE).to(tl.float32)
                if RESIDUAL_KV:
                    v_old = tl.load((page + OFF_VSTAGE).to(tl.pointer_type(STAGE_DTYPE)) + (j % G)[:, None]
                                    * HEAD_SIZE + d[None, :], mask=ex & (~from_step[:, None]), other=0.0)
                    v_new = tl.where(from_step[:, None], v_new, v_old.to(tl.float32))
                acc += tl.dot(tl.where(v_quant, 0.0, prob).to(DOT_DTYPE), v_new.to(DOT_DTYPE), input_precision=DOT_PRECISION)
            m_i = m_new
        o = acc / l_i[:, None]
        tl.store(out_ptr + (q_start + tok[:, None]) * stride_ot + head[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=rvalid[:, None] & dmask[None, :])


def prefill_constexprs(layout: PageLayout, qpk: int, block_q: int, phase: int, exact: bool, dot: dict,
                       unpack: str, bulk_groups: int = 0, bulk_dot: str = "fp32",
                       skip_first_chunks: bool = False) -> dict:
    """The constexprs :func:`prefill` launches :func:`_prefill_kernel` with; ``dot``: :func:`.common.dot_args` of the
    query; ``bulk_groups``, ``bulk_dot``: the bulk loop's groups per step (0: none) and operands (:func:`prefill`;
    the caller turns "16" and "f16" into "fp32" for float32 models); ``skip_first_chunks``: see :func:`prefill`.
    ``benchmarks/kernel_resources.py --prefill`` compiles the kernel with the same. The caller validates the bulk
    arguments (:func:`check_bulk`; :func:`prefill` does once per call).
    """
    return dict(QPK=qpk, QPK_PAD=triton.next_power_of_2(qpk), BLOCK_Q=block_q, PHASE=phase, EXACT=exact,
                STAGE_DTYPE=stage_dtype(layout), UNPACK_WORDS=unpack == "words", BULK_GROUPS=bulk_groups,
                BULK_16=bulk_dot in ("16", "f16"), BULK_F16=bulk_dot == "f16", SKIP_FIRST_CHUNKS=skip_first_chunks,
                **dot, **layout_args(layout))


#: Groups per step of the bulk loop when the page allows it (:func:`default_bulk_groups`). Measured on the H200
#: (2026-11-30, ``benchmarks/prefill_attention.py --configs kivi2 --shapes llama2-7b gqa --cases 4x4096
#: 4x2048+2048 --bulk-groups N``, docs/measurements/2026-11-30-h200-prefill-bulk.json), ms per layer, stores
#: included: 0 (no bulk loop) 8.59 / 6.52 (MHA first / continuation chunks), 7.13 / 5.58 (GQA); 1: 7.06 / 5.28,
#: 5.57 / 4.30; 2: 7.07 / 5.11, 5.89 / 4.46; 4: 6.43 / 4.53, 5.32 / 3.95.
BULK_GROUPS = 4


#: Most key x channel elements of one bulk step: the measured default's tile (4 groups of 32 keys x head 128, about
#: 106 KB of shared memory on sm_90). 4 groups of 128 keys at head 128 asked for 364,548 bytes (H200 limit 232,448)
#: and failed to launch (kernel_sweep.py, 2026-11-30), so larger groups and heads take fewer groups per step.
BULK_ELEMENTS = 128 * 128


def default_bulk_groups(layout: PageLayout) -> int:
    """The largest power of two of at most :data:`BULK_GROUPS` that divides the groups of a ``layout`` page (1 when
    the page holds an odd number of groups) and keeps a step within :data:`BULK_ELEMENTS` keys x padded channels,
    but at least 1 (at head 128: 4 at group 32, 2 at group 64, 1 at group 128; at head 64 twice that, at head 256
    half, and 1 group at group 128 / head 256, twice the elements: 231,428 bytes of shared memory at 4 bits,
    ``tests/test_sm90_compile.py``)."""
    per_page = layout.block_size // layout.group_size
    fit = BULK_ELEMENTS // (layout.group_size * triton.next_power_of_2(layout.head_size))
    n = BULK_GROUPS
    while n > 1 and (per_page % n or n > fit):
        n //= 2
    return n


def resolve_bulk_groups(layout: PageLayout, bulk_groups: int | None, unpack: str) -> int:
    """``bulk_groups`` as :func:`prefill` launches it: None is :func:`default_bulk_groups` with ``unpack="words"``
    and 0 (no bulk loop) with "bytes"; a number is returned as given (:func:`check_bulk` judges it)."""
    if bulk_groups is not None:
        return bulk_groups
    return default_bulk_groups(layout) if unpack == "words" else 0


def check_bulk(layout: PageLayout, bulk_groups: int, bulk_dot: str, unpack: str) -> None:
    """Raise ValueError unless ``bulk_groups`` is 0 or a power of two dividing the groups of a page, ``bulk_dot``
    is "fp32", "16" or "f16", and a bulk loop comes with ``unpack="words"`` (the only unpacking it has)."""
    per_page = layout.block_size // layout.group_size
    if bulk_groups < 0 or (bulk_groups and (bulk_groups & (bulk_groups - 1) or per_page % bulk_groups)):
        raise ValueError(f"KIVI prefill: bulk_groups must be 0 or a power of two dividing the {per_page} groups of "
                         f"a page, got {bulk_groups}")
    if bulk_dot not in ("fp32", "16", "f16"):
        raise ValueError(f"KIVI prefill: bulk_dot must be 'fp32', '16' or 'f16', got {bulk_dot!r}")
    if bulk_groups and unpack != "words":
        raise ValueError("KIVI prefill: bulk_groups > 0 needs unpack='words'")


def block_q_for(num_heads: int, num_kv_heads: int, rows: int = 64) -> int:
    """Query tokens per tile: ``rows`` tile rows shared by the query heads of one KV head (at least 1)."""
    return max(1, rows // triton.next_power_of_2(num_heads // num_kv_heads))


def prefill_tiles(query_start_loc_host: np.ndarray, block_q: int) -> tuple[np.ndarray, np.ndarray]:
    """Tiles of the requests with more than one query token: (request index, first query of the tile relative to
    the request), int32 arrays. One-token requests are left to :func:`kivi_vllm.kernels.decode.decode`."""
    qsl = np.asarray(query_start_loc_host, dtype=np.int64)
    lens = np.diff(qsl)
    reqs = np.nonzero(lens > 1)[0]
    counts = -(-lens[reqs] // block_q)
    tile_req = np.repeat(reqs, counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    tile_start = (np.arange(len(tile_req)) - first) * block_q
    return tile_req.astype(np.int32), tile_start.astype(np.int32)


def prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    tile_req: torch.Tensor,
    tile_start: torch.Tensor,
    layout: PageLayout,
    scale: float,
    out: torch.Tensor,
    phase: int,
    exact: bool = False,
    block_q: int | None = None,
    num_warps: int = 4,
    unpack: str = "words",
    bulk_groups: int | None = None,
    bulk_dot: str = "fp32",
    skip_first_chunks: bool = False,
) -> torch.Tensor:
    """Attention of the multi-token requests' query rows of one phase (module docstring) over their KIVI pages.

    Args:
        query: [T, num_heads, head_size]; key, value: [T, num_kv_heads, head_size] (model dtype).
        kv_cache: [num_blocks, num_kv_heads, layout.page_bytes] uint8 (read only).
        block_table: [num_reqs, max_blocks] int32; query_start_loc [num_reqs + 1], seq_lens [num_reqs] int32.
        tile_req, tile_start: int32 [num_tiles] on the device, from :func:`prefill_tiles` with the same ``block_q``.
        layout, scale: page layout and softmax scale.
        out: [T, num_heads, head_size], rows of this phase written.
        phase: 0 = rows in each request's first group, 1 = the rest (order: :func:`kivi_vllm.kernels.forward`).
            With ``exact`` (prefill="exact") every row is phase 0.
        block_q: query tokens per tile (default :func:`block_q_for`).
        num_warps: warps per program (``benchmarks/prefill_attention.py --prefill-warps`` times others).
        unpack: how a group's codes become floats: "words" (the default: one 32-bit load per word, exponent trick,
            :func:`.common.unit_codes`) or "bytes" (one byte load per code, shift, integer-to-float). On the H200
            (2026-11-30, ``benchmarks/prefill_attention.py --prefill-unpack``, 4 x 4096-token first chunks) "words"
            took 31% less time than "bytes" at the Llama-2-7B shape (8.6 vs 12.5 ms per layer) and 37% less at 4
            query heads per KV head, with the same cache bytes and outputs within 2.2e-7
            (``scripts/prefill_unpack_check.py``); its loop issues 137 instead of 197 global loads
            (``benchmarks/kernel_resources.py --prefill``).
        bulk_groups: the groups every row of a tile reads dequantized (below the tile's first own group) are
            walked ``bulk_groups`` groups (one page's consecutive records) per step in a branch-free loop; 0 walks
            them one group at a time in the general loop, as the kernel did before. Default
            (None): :func:`resolve_bulk_groups`.
        bulk_dot: operands of that loop's two dots: "fp32" (the default; :func:`.common.dot_args`: TF32 on the GPU for
            16-bit models), "16" (the model's 16-bit query, keys and values dequantized to the model dtype, the
            probabilities in it too, float32 accumulation: FlashAttention's operands) or "f16" (the same with fp16
            whatever the model dtype: a bf16 query converted to fp16, clamped to its range; dequantized keys and values
            keep 10 mantissa bits, as TF32 does, instead of bf16's 7). Float32 models keep "fp32". On the H200 (MHA, 4 x
            4096, stores included) "16" took 18% (4 groups) to 30% (2 groups) less time than "fp32" at the same group
            count; its best, 4.92 ms per layer at 2 groups, is 23% below "fp32"'s best (6.43 at 4). But with bf16 it
            broke the issue's 1e-2 bound on 1 of the 48 cases ``scripts/kernel_sweep.py --prefill-bulk-groups 2
            --prefill-bulk-dot 16 --batch 4`` reached in its time limit (1.37e-2 at head size 128, 8 query heads per KV
            head, KIVI-4; docs/measurements/2026-11-30-h200-kernel-sweep-bulk16.log): that batch was not re-run with
            "fp32" operands (earlier sweeps with them stayed at or below 6.1e-3 on other random batches); a likely cause
            is that a dequantized key is not a bf16 number and its 8-bit rounding moves sharp scores (not analysed
            further). Hence not the default. "f16" is tested under the interpreter only (its speed on the GPU should be
            "16"'s, the same MMAs, but is not measured). The default ("fp32", 4 groups) has the old loop's arithmetic
            per element; tested under the interpreter (tests/test_kernels.py) and swept on the H200 (45 of 45 cases
            within 6.13e-3, docs/benchmarks.md).
        skip_first_chunks: with ``exact`` only: leave the rows of requests that had nothing cached before this step
            (first chunks) unwritten, because :func:`kivi_vllm.kernels.forward` had FlashAttention compute them
            (under prefill="exact" they attend exactly to their own chunk, causally).

    Returns:
        ``out``.

    Raises:
        ValueError: shapes that do not match the layout, tensors not contiguous in head_size, an unknown
            ``unpack`` or ``bulk_dot``, a ``bulk_groups`` :func:`check_bulk` refuses, or ``skip_first_chunks``
            without ``exact``.
    """
    HQ, H = check_attention("prefill", query, key, value, out, kv_cache, layout)
    if skip_first_chunks and not exact:
        raise ValueError("KIVI prefill: skip_first_chunks needs exact=True (under the streaming rule a first chunk "
                         "reads its own completed groups dequantized, which FlashAttention cannot)")
    if unpack not in ("bytes", "words"):
        raise ValueError(f"KIVI prefill: unpack must be 'bytes' or 'words', got {unpack!r}")
    bulk_groups = resolve_bulk_groups(layout, bulk_groups, unpack)
    check_bulk(layout, bulk_groups, bulk_dot, unpack)
    n = tile_req.numel()
    if n == 0 or (exact and phase == 1):
        return out
    qpk = HQ // H
    bq = block_q or block_q_for(HQ, H)
    _prefill_kernel[(n, H)](
        query, key, value, out, kv_cache, block_table, seq_lens, query_start_loc, tile_req, tile_start, scale,
        ONE_F32_BITS, query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        out.stride(0), out.stride(1), kv_cache.stride(0), kv_cache.stride(1), block_table.stride(0),
        num_warps=num_warps, **prefill_constexprs(layout, qpk, bq, phase, exact, dot_args(query), unpack,
                                                  bulk_groups, "fp32" if query.dtype == torch.float32 else bulk_dot,
                                                  skip_first_chunks),
    )
    return out
