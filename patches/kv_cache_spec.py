"""Patch ``Attention.get_kv_cache_spec`` (``vllm/model_executor/layers/attention/attention.py``) so that layers
using the KIVI backend report a :class:`~kivi_vllm.spec.KiviAttentionSpec`: the page size vLLM allocates, counts
and admits requests by is then the KIVI page (``v1/core/kv_cache_utils.py`` sizes blocks from the spec alone).
"""

from __future__ import annotations

from . import require_source

#: SHA-256 prefix of ``Attention.get_kv_cache_spec``'s source in vLLM 0.26.0.
EXPECTED = "85ce33893a9443e8"


def apply() -> None:
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    original = Attention.get_kv_cache_spec
    if getattr(original, "_kivi_patched", False):
        return
    require_source(original, EXPECTED, "Attention.get_kv_cache_spec")

    def get_kv_cache_spec(self, vllm_config):
        spec = original(self, vllm_config)
        if type(spec) is FullAttentionSpec and getattr(self.attn_backend, "IS_KIVI", False):
            from ..config import KiviConfig
            from ..spec import KiviAttentionSpec

            cfg = KiviConfig.from_vllm_config(vllm_config)
            return KiviAttentionSpec.from_full_spec(spec, cfg, residual_dtype=vllm_config.model_config.dtype)
        return spec

    get_kv_cache_spec._kivi_patched = True
    get_kv_cache_spec.__wrapped__ = original
    Attention.get_kv_cache_spec = get_kv_cache_spec
