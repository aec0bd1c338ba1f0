"""Per-step metadata: what one forward step of every KIVI layer needs, built once per step from vLLM's
``CommonAttentionMetadata`` (``vllm/v1/attention/backend.py``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.logger import init_logger
from vllm.v1.attention.backend import AttentionCGSupport, AttentionMetadataBuilder, CommonAttentionMetadata

from ..config import KiviConfig
from ..layout import PageLayout
from ..spec import KiviAttentionSpec

logger = init_logger("vllm.kivi")
_capacity_logged = False


def capacity_summary(spec: KiviAttentionSpec, num_blocks: int) -> dict:
    """KV-cache capacity of ``num_blocks`` KIVI pages and what an unquantized (model dtype) cache would hold in
    the same memory.

    Returns:
        dict with ``blocks``, ``block_size``, ``tokens`` (KIVI), ``bytes_per_layer``, ``dense_tokens`` (same bytes
        at 2 * head_size * itemsize bytes per token per KV head, before vLLM's block rounding) and ``ratio``.
    """
    layout = spec.layout
    itemsize = spec.residual_dtype.itemsize
    bytes_per_layer = num_blocks * spec.page_size_bytes
    dense_tokens = bytes_per_layer // (spec.num_kv_heads * 2 * spec.head_size * itemsize)
    tokens = num_blocks * spec.block_size
    return dict(blocks=num_blocks, block_size=spec.block_size, tokens=tokens, bytes_per_layer=bytes_per_layer,
                dense_tokens=dense_tokens, ratio=tokens / max(dense_tokens, 1),
                bytes_per_token_head=layout.bytes_per_token)


@dataclass
class KiviMetadata:
    """One step of the batch, shared by all KIVI layers of a KV-cache group.

    Attributes:
        num_actual_tokens: tokens in this step (rows of query/key/value to use).
        block_table: [num_reqs, max_blocks] int32 physical block ids.
        slot_mapping: [num_tokens] int64 cache slot of each new token, -1 for padding.
        query_start_loc_host: num_reqs + 1 ints, request r owns rows [qsl[r], qsl[r+1]).
        seq_lens_host: num_reqs ints, context length after this step.
        layout: the page layout of this group's layers.
    """

    num_actual_tokens: int
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    query_start_loc_host: list[int]
    seq_lens_host: list[int]
    layout: PageLayout


class KiviMetadataBuilder(AttentionMetadataBuilder[KiviMetadata]):
    """Builds :class:`KiviMetadata`. The PyTorch path cannot be captured in CUDA graphs (host loop)."""

    _cudagraph_support = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if not isinstance(kv_cache_spec, KiviAttentionSpec):
            raise TypeError(
                f"KIVI: expected a KiviAttentionSpec for layers {layer_names[:2]}..., got {type(kv_cache_spec).__name__}; "
                "the KV-cache spec patch (kivi_vllm.patches.kv_cache_spec) did not run in this process"
            )
        self.layout = kv_cache_spec.layout
        global _capacity_logged
        num_blocks = vllm_config.cache_config.num_gpu_blocks
        if num_blocks and not _capacity_logged:
            _capacity_logged = True
            c = capacity_summary(kv_cache_spec, num_blocks)
            logger.info(
                "%s: KV cache of %d blocks x %d tokens = %d tokens (%.1f B per token per KV head); an unquantized "
                "%s cache would hold %d tokens in the same memory: %.2fx",
                KiviConfig.from_vllm_config(vllm_config).describe(), c["blocks"], c["block_size"], c["tokens"],
                c["bytes_per_token_head"], str(kv_cache_spec.residual_dtype).replace("torch.", ""), c["dense_tokens"],
                c["ratio"],
            )

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> KiviMetadata:
        cm = common_attn_metadata
        n = cm.num_reqs
        return KiviMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            block_table=cm.block_table_tensor,
            slot_mapping=cm.slot_mapping,
            query_start_loc_host=cm.query_start_loc_cpu[: n + 1].tolist(),
            seq_lens_host=cm.seq_lens[:n].tolist(),
            layout=self.layout,
        )
