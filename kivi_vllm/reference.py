"""PyTorch implementation of the KIVI paged cache: store, read and attention over the pages of :mod:`layout`.

This is both the CPU serving path and the oracle the Triton kernels are tested against, so it favours plain,
vectorised tensor code over speed.

Semantics of one layer step (:func:`forward`), identical for a prefill chunk, a continuation chunk and a decode
token: the step's tokens are stored first (every group that completes is quantized: keys per channel over its G
tokens, values per token; the rest wait exactly in their page's stage), then each query at position p attends
causally to key j dequantized if j's group was complete before p, exactly otherwise. That is what a decode step
at position p reads from the cache, so outputs do not depend on chunking, prefix-cache hits, preemption or batch
composition. Nothing lives outside the pages, so the same holds for vLLM's block sharing and recompute.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .layout import PageLayout
from .quant import dequantize_keys, dequantize_values, quantize_keys, quantize_values


# ---------------------------------------------------------------------------------------------------- store
def store(
    kv_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    layout: PageLayout,
) -> None:
    """Write one step's new tokens into KIVI pages (quantize-on-write for completed groups).

    Args:
        kv_cache: [num_blocks, num_kv_heads, layout.page_bytes] uint8, modified in place.
        key, value: [T, num_kv_heads, head_size] in the model dtype.
        slot_mapping: [T] int64, ``block_id * block_size + offset``; -1 marks padding (skipped). Tokens of one
            request arrive in position order, and earlier tokens of an open group were stored by earlier steps
            (vLLM's scheduler guarantees both; a partial page is private to one request).
    """
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        slot_mapping, key, value = slot_mapping[valid], key[valid], value[valid]
    if slot_mapping.numel() == 0:
        return
    B, G, m = layout.block_size, layout.group_size, layout.num_groups
    blk = slot_mapping // B
    grp = (slot_mapping % B) // G
    pos = slot_mapping % G
    gid = blk * m + grp  # global id of each token's group

    done_gid = torch.unique(gid[pos == G - 1])  # groups whose last token arrives now (sorted)
    in_done = torch.isin(gid, done_gid)
    stage_vals = layout.residual == "kv"

    if done_gid.numel():
        d_blk, d_grp = done_gid // m, done_gid % m
        j = torch.searchsorted(done_gid, gid[in_done])
        p = pos[in_done]
        # gathers copy: the stage is read in full before any record (the last one shares its bytes) is written
        k_tile = layout.k_stage(kv_cache)[d_blk]  # [n, H, G, D]: earlier tokens of each group
        k_tile[j, :, p] = key[in_done].to(k_tile.dtype)
        kq, ks, km = quantize_keys(k_tile, layout.k_bits)
        layout.k_codes(kv_cache)[d_blk, :, d_grp] = kq
        layout.k_scale(kv_cache)[d_blk, :, d_grp] = ks
        layout.k_min(kv_cache)[d_blk, :, d_grp] = km
        if stage_vals:
            v_tile = layout.v_stage(kv_cache)[d_blk]
            v_tile[j, :, p] = value[in_done].to(v_tile.dtype)
            vq, vs, vm = quantize_values(v_tile, layout.v_bits, layout.v_group_size)
            layout.v_codes(kv_cache)[d_blk, :, d_grp] = vq
            layout.v_scale(kv_cache)[d_blk, :, d_grp] = vs
            layout.v_min(kv_cache)[d_blk, :, d_grp] = vm

    if not stage_vals:  # residual="k": every value is quantized per token on arrival
        vq, vs, vm = quantize_values(value, layout.v_bits, layout.v_group_size)
        layout.v_codes(kv_cache)[blk, :, grp, pos] = vq
        layout.v_scale(kv_cache)[blk, :, grp, pos] = vs
        layout.v_min(kv_cache)[blk, :, grp, pos] = vm

    open_ = ~in_done
    if bool(open_.any()):
        b, p = blk[open_], pos[open_]
        k_stage = layout.k_stage(kv_cache)
        k_stage[b, :, p] = key[open_].to(k_stage.dtype)
        if stage_vals:
            v_stage = layout.v_stage(kv_cache)
            v_stage[b, :, p] = value[open_].to(v_stage.dtype)


# ---------------------------------------------------------------------------------------------------- read
def dequantize_pages(pages: torch.Tensor, layout: PageLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantize every group record of some pages (the stage is not consulted).

    Args:
        pages: [N, num_kv_heads, page_bytes] uint8.

    Returns:
        (keys, values), float32 [N * block_size, num_kv_heads, head_size] in token order. Rows of groups that are
        not complete hold meaningless numbers (possibly inf/NaN); callers keep only complete groups.
    """
    n, h = pages.shape[:2]
    k = dequantize_keys(layout.k_codes(pages), layout.k_scale(pages), layout.k_min(pages), layout.k_bits)
    v = dequantize_values(layout.v_codes(pages), layout.v_scale(pages), layout.v_min(pages), layout.v_bits)
    # [N, H, m, G, D] -> [N, m, G, H, D] -> [N*B, H, D]
    k = k.permute(0, 2, 3, 1, 4).reshape(n * layout.block_size, h, layout.head_size)
    v = v.permute(0, 2, 3, 1, 4).reshape(n * layout.block_size, h, layout.head_size)
    return k, v


def read_context(
    kv_cache: torch.Tensor, block_ids: torch.Tensor, num_tokens: int, layout: PageLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``num_tokens`` cached tokens of one sequence, as the attention sees them.

    Args:
        kv_cache: [num_blocks, num_kv_heads, page_bytes] uint8.
        block_ids: [>= ceil(num_tokens / block_size)] int, the sequence's block table row.
        num_tokens: n, cached tokens to read.

    Returns:
        (keys, values) float32 [n, num_kv_heads, head_size]: dequantized complete groups, then the open group's
        tokens exactly as staged (residual="k": values of every token dequantized).
    """
    n, B, G = num_tokens, layout.block_size, layout.group_size
    pages = kv_cache[block_ids[: -(-n // B)].long()]
    k, v = dequantize_pages(pages, layout)
    k, v = k[:n], v[:n]
    nq = n // G * G  # tokens in complete groups
    if nq < n:
        k_st, v_st = staged_tokens(pages[nq // B], n - nq, layout)
        k = torch.cat([k[:nq], k_st])
        v = torch.cat([v[:nq], v_st]) if v_st is not None else v
    return k, v


def staged_tokens(page: torch.Tensor, count: int, layout: PageLayout) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first ``count`` exact tokens of a page's open group, float32 [count, num_kv_heads, head_size] keys and
    values (values None with residual="k"). ``page``: [num_kv_heads, page_bytes] uint8."""
    k = layout.k_stage(page)[:, :count].transpose(0, 1).float()
    v = layout.v_stage(page)[:, :count].transpose(0, 1).float() if layout.residual == "kv" else None
    return k, v


# ---------------------------------------------------------------------------------------------------- attention
def forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: Sequence[int],
    seq_lens: Sequence[int],
    slot_mapping: torch.Tensor,
    layout: PageLayout,
    scale: float,
    out: torch.Tensor | None = None,
    query_tile: int = 256,
    streaming: bool = True,
) -> torch.Tensor:
    """One layer step: store this step's tokens, then causal attention with KIVI's streaming visibility.

    Visibility rule (the same for prefill, continuation chunks and decode): a query at position p sees key j
    (j <= p) dequantized when j's group ends at or before p, i.e. ``(j // G + 1) * G <= p``, and exact otherwise
    (its own open group, itself included). Values follow the same rule with residual="kv"; with residual="k" a
    query sees every earlier value dequantized and its own exactly. This is precisely what a decode step reads from
    the cache, so a request's output does not depend on how its prompt was chunked, on prefix-cache hits or on
    preemption (see docs/design.md).

    Args:
        query: [T, num_heads, head_size]; key, value: [T, num_kv_heads, head_size] (this step's tokens).
        kv_cache: [num_blocks, num_kv_heads, page_bytes] uint8, modified in place by the store.
        block_table: [num_reqs, max_blocks] int physical block ids.
        query_start_loc: num_reqs + 1 host ints; request r owns rows [qsl[r], qsl[r+1]).
        seq_lens: num_reqs host ints, context length after this step (cached = seq_len - query_len).
            Requests with an empty query (CUDA-graph padding) are skipped.
        slot_mapping: [T] int64 cache slots of this step's tokens (-1 = padding).
        layout: the page layout.
        scale: softmax scale (1/sqrt(head_size) for Llama).
        out: optional [T, num_heads, head_size] output, written in place.
        query_tile: most queries per score tile; fewer for long contexts, so that one tile's scores stay below
            2^24 elements (128 MiB in float64) whatever the context length.
        streaming: False selects prefill="exact": a chunk attends to its own tokens exactly and reads only the
            groups completed before the chunk from the cache (KIVI paper §3.3; outputs then depend on chunking).

    Returns:
        ``out`` (or a new tensor), computed in float64 (see :func:`_attend`) and cast to its dtype.
    """
    if out is None:
        out = torch.zeros_like(query)
    B, G = layout.block_size, layout.group_size
    reqs = []  # (r, qs, qe, n)
    for r in range(len(seq_lens)):
        qs, qe = query_start_loc[r], query_start_loc[r + 1]
        if qe > qs:
            reqs.append((r, qs, qe, seq_lens[r] - (qe - qs)))
    if not reqs:
        return out
    # 1. Snapshot the open group's staged tokens before the store may overwrite them (it quantizes completed groups,
    #    and the last record of a page shares bytes with the stage).
    staged = {}
    rows = [(r, n) for r, _, _, n in reqs if n % G]
    if rows:
        blocks = block_table[[r for r, _ in rows], [(n // G * G) // B for _, n in rows]].tolist()
        for b, (r, n) in zip(blocks, rows):  # copies of just the staged tokens
            staged[r] = tuple(x.clone() if x is not None else None for x in staged_tokens(kv_cache[b], n % G, layout))
    # 2. Store: quantize every group completed in this step, stage the rest.
    store(kv_cache, key, value, slot_mapping, layout)
    # 3. Dequantize every page the batch reads, in one call.
    spans, ids, cols = [], [], []
    for r, qs, qe, n in reqs:
        nblk = -(-(n + qe - qs) // B)
        spans.append(len(ids))
        ids += [r] * nblk
        cols += range(nblk)
    all_k, all_v = (x.double() for x in dequantize_pages(kv_cache[block_table[ids, cols].long()], layout))
    # 4. Attention per request.
    for (r, qs, qe, n), start in zip(reqs, spans):
        total = n + qe - qs
        base = start * B
        k_new, v_new = key[qs:qe].double(), value[qs:qe].double()
        k_st, v_st = staged.get(r, (None, None))  # the open group's earlier tokens, if any
        k_exact = k_new if k_st is None else torch.cat([k_st.double(), k_new])  # positions [n // G * G, total)
        v_exact = v_new if v_st is None else torch.cat([v_st.double(), v_new])  # same, or [n, total) for "k"
        nq_end = total // G * G  # keys of positions below this exist quantized
        v_q_end = nq_end if layout.residual == "kv" else total
        k_q, v_q = all_k[base : base + nq_end], all_v[base : base + v_q_end]
        tile = max(1, min(query_tile, 2**24 // (query.shape[1] * total)))
        for t0 in range(qs, qe, tile):
            t1 = min(qe, t0 + tile)
            p0 = n + t0 - qs
            out[t0:t1] = _attend(
                query[t0:t1], p0, k_q, v_q, k_exact, v_exact, total - k_exact.shape[0],
                total - v_exact.shape[0], G, layout.residual, scale, streaming, n,
            ).to(out.dtype)
    return out


def _attend(q, p0, k_q, v_q, k_e, v_e, k_e0, v_e0, G, residual, scale, streaming, chunk_start):
    """Attention of queries at positions p0 + i over keys [0, p0 + len(q)) with the visibility rule of :func:`forward`.

    k_q, v_q: dequantized keys/values from position 0; k_e, v_e: exact ones from positions k_e0 / v_e0.
    All float64 [*, Hkv, D]; q [nq, Hq, D] in the model dtype. Returns float64 [nq, Hq, D].

    Keys below ``a`` (the start of the first query's group, or of the chunk's first group with prefill="exact") are
    dequantized for every query here; only [a, p0 + nq) needs the per-query choice between the two versions.

    Computed in float64 on purpose: the reduction order of BLAS and softmax kernels depends on the row length, which
    depends on where a chunk ends; float32 rounding differences would then reach the bf16 output now and then, and a
    2-bit code flips on such a last-bit change of a key. In float64 the difference is below every later rounding, so
    a query's output is the same whatever chunk it was computed in.
    """
    nq, hq, d = q.shape
    hkv = k_e.shape[1]
    total = p0 + nq
    dev = q.device
    a = (p0 if streaming else chunk_start) // G * G  # a <= p0, and k_e0 <= a (k_e starts at the open group)
    p = torch.arange(p0, total, device=dev)[:, None]  # query positions
    j = torch.arange(a, total, device=dev)[None, :]  # key positions of the mixed range
    if streaming:  # the key's group was complete before the query (what decode at position p reads)
        k_quant = (j // G + 1) * G <= p
        v_quant = k_quant if residual == "kv" else j < p
    else:  # prefill="exact": only groups complete before the chunk are read quantized (KIVI paper §3.3)
        k_quant = torch.zeros_like(j, dtype=torch.bool)
        v_quant = k_quant if residual == "kv" else j < chunk_start
    causal = j <= p

    def rows(x, first):  # x covers positions [first, first + len(x)): its rows for [a, total), zeros where absent
        out = torch.zeros(total - a, hkv, d, dtype=torch.float64, device=dev)
        lo, hi = max(a, first), min(total, first + x.shape[0])
        if hi > lo:
            out[lo - a : hi - a] = x[lo - first : hi - first]
        return out

    kt = lambda x: x.permute(1, 2, 0).unsqueeze(1)  # noqa: E731  [n, Hkv, D] -> [Hkv, 1, D, n]
    vt = lambda x: x.transpose(0, 1).unsqueeze(1)  # noqa: E731  [n, Hkv, D] -> [Hkv, 1, n, D]
    qh = q.double().unflatten(1, (hkv, hq // hkv)).permute(1, 2, 0, 3) * scale  # [Hkv, rep, nq, D]
    s_mixed = torch.where(k_quant, qh @ kt(rows(k_q, 0)), qh @ kt(rows(k_e, k_e0))).masked_fill(~causal, float("-inf"))
    prob = torch.softmax(torch.cat([qh @ kt(k_q[:a]), s_mixed], dim=-1), dim=-1)
    p_all, p_mixed = prob[..., :a], prob[..., a:]
    o = p_all @ vt(v_q[:a]) + (p_mixed * v_quant) @ vt(rows(v_q, 0)) + (p_mixed * ~v_quant) @ vt(rows(v_e, v_e0))
    return o.permute(2, 0, 1, 3).reshape(nq, hq, d)
