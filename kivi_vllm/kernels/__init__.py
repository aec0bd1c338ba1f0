"""Triton kernels for the KIVI pages, one launcher per file, and :func:`forward`, the order they run in.

* :mod:`.store` - quantize-on-write of one step's tokens (bit-exact with :func:`kivi_vllm.reference.store`).
* :mod:`.decode` - split-KV decode attention over packed pages, then the exact open group merged with the splits.
* :mod:`.prefill` - prefill / continuation-chunk attention with the streaming visibility rule.

They read and write exactly the bytes of :class:`kivi_vllm.layout.PageLayout` and reproduce
:func:`kivi_vllm.reference.forward` (the tests' oracle). On a machine without a GPU they run under
``TRITON_INTERPRET=1`` (the tests do that on small shapes).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from ..layout import PageLayout
from . import flash
from .decode import decode, pdl_for
from .prefill import prefill
from .store import store

__all__ = ["decode", "flash", "forward", "prefill", "store"]


def forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    slot_mapping: torch.Tensor,
    layout: PageLayout,
    scale: float,
    out: torch.Tensor,
    tiles: tuple[torch.Tensor, torch.Tensor] | None,
    num_reqs: int | None = None,
    streaming: bool = True,
    block_q: int | None = None,
    num_splits: int | None = None,
    decode_stages: int = 1,
    decode_warps: int | None = None,
    decode_kernel: str | None = None,
    decode_lane_rows: int | None = None,
    decode_maxnreg: int | None = None,
    decode_rescale_slack: float | None = None,
    decode_work: tuple[torch.Tensor, torch.Tensor] | None = None,
    prefill_unpack: str = "words",
    prefill_warps: int = 4,
    prefill_bulk_groups: int | None = None,
    prefill_bulk_dot: str = "fp32",
    first_chunk_attention: Callable | None = None,
    max_query_len: int | None = None,
    store_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """One layer step on the GPU: the same result as :func:`kivi_vllm.reference.forward` (store, then attention
    with the streaming visibility rule), as a fixed sequence of launches::

        decode(one-token requests)      reads the stage and this step's token      (before any store)
        prefill(phase 0 rows)           rows in each request's first group          (residual "kv": before the store)
        store(phase 0)                  tokens of each request's first group       (the only reader of the stage)
        prefill(phase 0 rows)           (residual "k": after it, the rows need this step's quantized values)
        store(phase 1)                  every later group of multi-token requests
        prefill(phase 1 rows)           rows after the first group (read the groups this step completed)

    With prefill="exact" (``streaming`` False) and a ``first_chunk_attention``, a step with multi-token requests
    first has it compute every request's rows as causal attention over the request's own chunk (exact K/V, which
    is prefill="exact" for a request with nothing cached before the step: a first chunk); the launches above then
    overwrite the rows of every other request (decode rows, and continuation chunks, whose prefill tiles run as
    before) and skip the first chunks' rows.

    A pure-decode step (``tiles`` None) is two launches of decode (FMA or TC kernel: splits or work items, then the
    open group, which merges them into the output; MMA kernel: splits, reduction) plus one of store: the shape
    captured in CUDA graphs. Where :func:`.decode.pdl_for` allows it, that store is a programmatic dependent of the
    decode's last launch (it loads and quantizes while the attention runs and writes after it).

    Args:
        query: [T, num_heads, head_size]; key, value: [T, num_kv_heads, head_size] (T may include padding rows).
        kv_cache: [num_blocks, num_kv_heads, page_bytes] uint8, modified in place.
        block_table: [num_reqs, max_blocks] int32; query_start_loc: [num_reqs + 1] int32; seq_lens: [num_reqs]
            int32 (context after this step); slot_mapping: [T] int64, -1 for padding. All on the device.
        layout, scale: page layout and softmax scale.
        out: [T, num_heads, head_size], written for the rows of real requests.
        tiles: (tile_req, tile_start) int32 device tensors from :func:`.prefill.prefill_tiles` for the
            multi-token requests, or None when every request has one query token.
        num_reqs: requests of the batch, CUDA-graph padding requests included (default ``len(seq_lens)``).
        streaming: False selects prefill="exact" (every prefill row in phase 0: before the store with residual
            "kv", after store phase 0 with "k", before store phase 1 either way).
        block_q: the ``block_q`` the tiles were made with; num_splits, decode_stages (``num_stages``), decode_warps (``num_warps``),
            decode_kernel (``kernel``), decode_lane_rows (``lane_rows``), decode_maxnreg (``maxnreg``),
            decode_rescale_slack (``rescale_slack``), decode_work (``work``): see
            :func:`.decode.decode`;
            prefill_unpack (``unpack``), prefill_warps (``num_warps``), prefill_bulk_groups (``bulk_groups``),
            prefill_bulk_dot (``bulk_dot``): see :func:`.prefill.prefill`.
        first_chunk_attention: with ``streaming`` False only, a function ``(query, key, value, cu_seqlens,
            max_seqlen, scale, out)`` writing causal attention of every request's rows over its own rows into
            ``out`` (:func:`.flash.first_chunk_attention`: vLLM's FlashAttention varlen); None: the prefill kernel
            computes first chunks too (pass None for a step without first chunks: the result is the same, the
            FlashAttention launch is saved).
        max_query_len: the longest query of the batch (host int; needed with ``first_chunk_attention``).
        store_rows: residual="kv" only: the rows the stores have work for (:func:`.store.store_rows`, int32 on the
            device), for steps with ``tiles``; None: one store program per row.

    Returns:
        ``out``.

    Raises:
        ValueError: ``first_chunk_attention`` with ``streaming`` or without ``max_query_len``.
    """
    n = len(seq_lens) if num_reqs is None else num_reqs
    by_flash = first_chunk_attention is not None and tiles is not None
    if first_chunk_attention is not None and (streaming or max_query_len is None):
        raise ValueError("KIVI: first_chunk_attention needs prefill='exact' (streaming=False) and max_query_len")
    if by_flash:  # every request's own chunk, causal; rows that are not first chunks are overwritten below
        first_chunk_attention(query, key, value, query_start_loc[: n + 1], max_query_len, scale, out)
    args = (query, key, value, kv_cache, block_table, query_start_loc, seq_lens)
    decode(*args, layout, scale, out, num_reqs=n, num_splits=num_splits, num_stages=decode_stages,
           num_warps=decode_warps, kernel=decode_kernel, lane_rows=decode_lane_rows, maxnreg=decode_maxnreg,
           rescale_slack=decode_rescale_slack, work=decode_work)
    store_phase = partial(store, kv_cache, key, value, slot_mapping, query_start_loc, seq_lens, layout, num_reqs=n,
                          rows=store_rows)
    if tiles is None:
        # a programmatic dependent of the decode's last launch (its early loads are safe: the decode's first launch
        # is a plain one, so no kernel before it still runs)
        store_phase(0, pdl=pdl_for(query.device))
        return out
    prefill_phase = partial(prefill, *args, *tiles, layout, scale, out, block_q=block_q, exact=not streaming,
                            unpack=prefill_unpack, num_warps=prefill_warps, bulk_groups=prefill_bulk_groups,
                            bulk_dot=prefill_bulk_dot, skip_first_chunks=by_flash)
    if layout.residual == "kv":
        prefill_phase(0)
        store_phase(0)
    else:
        store_phase(0)
        prefill_phase(0)
    store_phase(1)
    prefill_phase(1)
    return out
