"""``KiviAttentionImpl.forward``: store this step's tokens into the KIVI pages, then attention over them.

No math here: on CUDA it calls :func:`kivi_vllm.kernels.forward` (Triton), elsewhere
:func:`kivi_vllm.reference.forward` (the PyTorch path); both write and read the same page bytes.
"""

from __future__ import annotations

import torch
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import AttentionImpl, AttentionType

from .. import kernels, reference
from ..config import KiviConfig
from ..kernels.decode import pdl_for
from ..kernels.store import warm_up
from .metadata import KiviMetadata

#: (layout, key dtype, device) whose store launches are compiled in this process
#: (:func:`kivi_vllm.kernels.store.warm_up`)
_WARM_STORES: set = set()


class KiviAttentionImpl(AttentionImpl):
    """Per-layer KIVI attention (vLLM calls it inside its opaque attention custom op).

    Raises (at model construction, before weights load):
        NotImplementedError: ALiBi, sliding window, logits soft-cap, attention sinks, non-decoder attention,
            layers that share another layer's KV cache, speculative decoding, decode context parallelism,
            micro-batching (``--enable-dbo``, ``ubatch_size`` > 1) or hybrid (attention + Mamba) models, none of which
            the KIVI path implements.
        KiviConfigError: invalid KIVI settings in ``additional_config``, or per-layer bits for a layer index the
            model does not have.
    """

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes=None, sliding_window: int | None = None, kv_cache_dtype: str = "auto",
                 logits_soft_cap: float | None = None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, **extra) -> None:
        vllm_config = get_current_vllm_config()
        model_config = vllm_config.model_config
        unsupported = {
            "ALiBi": alibi_slopes is not None,
            "sliding-window attention": sliding_window is not None,
            "logits soft-cap": bool(logits_soft_cap),
            "attention sinks": extra.get("sinks") is not None,
            f"attention type {attn_type}": attn_type != AttentionType.DECODER,
            # the sharing layer would read a stage its target layer already overwrote this step
            "layers sharing another layer's KV cache": kv_sharing_target_layer_name is not None,
            # a rejected draft could roll back across a group that was already quantized
            "speculative decoding": vllm_config.speculative_config is not None,
            "decode context parallelism": vllm_config.parallel_config.decode_context_parallel_size > 1,
            # one set of the metadata builder's per-step buffers (decode work list): two batches in flight would
            # read each other's
            "micro-batching (dual batch overlap)": vllm_config.parallel_config.use_ubatching,
            "hybrid attention/Mamba layers": bool(model_config is not None and model_config.is_hybrid),
        }
        bad = [name for name, present in unsupported.items() if present]
        if bad:
            raise NotImplementedError(f"KIVI: this configuration uses {', '.join(bad)}, which the KIVI cache does "
                                      "not support")
        #: The arguments ``Attention.__init__`` constructed this impl with (positional, then keyword): the KV-cache
        #: spec patch builds vLLM's own impl from them for an exact layer (``patches/kv_cache_spec.py``).
        self.init_args = (num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                          logits_soft_cap, attn_type, kv_sharing_target_layer_name)
        self.init_kwargs = dict(extra)
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_sharing_target_layer_name = None
        self.config = KiviConfig.from_vllm_config(vllm_config)
        KiviConfig.check_head_size(head_size)
        #: prefill="exact": vLLM's FlashAttention computes first chunks on the Triton path (looked up on its first
        #: step there: :func:`kivi_vllm.kernels.flash.first_chunk_attention`)
        self.first_chunk_dtype = (model_config.dtype if self.config.prefill == "exact" and model_config is not None
                                  else None)
        if model_config is not None:
            self.config.check_num_layers(model_config.get_total_num_hidden_layers())

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: KiviMetadata | None, output: torch.Tensor, output_scale=None,
                output_block_scale=None) -> torch.Tensor:
        """Store this step's tokens, then attend (see :func:`kivi_vllm.reference.forward`).

        Args:
            query: [T, num_heads, head_size]; key, value: [T, num_kv_heads, head_size] (T may include padding).
            kv_cache: [num_blocks, num_kv_heads, page_bytes] uint8 (this layer's pages).
            attn_metadata: None during vLLM's memory-profiling run (nothing to do).
            output: [T, num_heads, head_size], written in place for the first ``num_actual_tokens`` rows.
        """
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("KIVI: fused output quantization is not supported")
        if attn_metadata is None:
            return output
        m = attn_metadata
        n = m.num_actual_tokens
        if m.triton:
            warm = (m.layout, key.dtype, key.device)
            if n and warm not in _WARM_STORES and not torch.cuda.is_current_stream_capturing():
                # vLLM's warm-up steps (CUDA-graph capture's eager runs) are decode-only: compile the prompt steps'
                # store (and the decode steps' at every rows-per-program) now, not in a step of serving
                warm_up(kv_cache, key[:n], value[:n], m.query_start_loc, m.seq_lens, m.layout, num_reqs=m.num_reqs,
                        pdl=pdl_for(key.device))
                _WARM_STORES.add(warm)
            flash = None
            if self.first_chunk_dtype is not None and m.has_first_chunks:
                flash = kernels.flash.first_chunk_attention(self.first_chunk_dtype, self.head_size)[0]
            kernels.forward(
                query[:n], key[:n], value[:n], kv_cache, m.block_table, m.query_start_loc, m.seq_lens,
                m.slot_mapping[:n], m.layout, self.scale, output[:n], m.tiles, num_reqs=m.num_reqs,
                streaming=self.config.prefill == "streaming", block_q=m.block_q,
                first_chunk_attention=flash, max_query_len=m.max_query_len,
                decode_work=m.decode_work, store_rows=m.store_rows,
            )
            return output
        reference.forward(
            query[:n], key[:n], value[:n], kv_cache, m.block_table, m.query_start_loc_host, m.seq_lens_host,
            m.slot_mapping[:n], m.layout, self.scale, out=output[:n], streaming=self.config.prefill == "streaming",
        )
        return output
