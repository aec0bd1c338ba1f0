"""Patch ``Attention.get_kv_cache_spec`` (``vllm/model_executor/layers/attention/attention.py``) so that layers
using the KIVI backend report a :class:`~kivi_vllm.spec.KiviAttentionSpec`: the page size vLLM allocates, counts
and admits requests by is then the KIVI page (``v1/core/kv_cache_utils.py`` sizes blocks from the spec alone).

Per-layer bits (``KiviConfig.layers``): the layer's index comes from its name (vLLM's ``extract_layer_index``:
``model.layers.0.self_attn.attn`` -> 0); a listed layer gets a spec with its own bits, and its ``attn_backend`` is
set to the backend class of those bits (:func:`kivi_vllm.backend.backend.backend_for_bits`), because the runners
view each layer's cache tensor with ``layer.get_attn_backend().get_kv_cache_shape(...)``. Both runners (V1
``gpu_model_runner.get_kv_cache_spec``, V2 ``worker/gpu/attn_utils.get_kv_cache_spec``) call this method before
they read the backend of any layer (attention groups, cache tensor views), and every layer keeps its impl. The
patch therefore also fingerprints ``Attention.get_attn_backend`` and ``extract_layer_index``, whose behaviour it
relies on.
"""

from __future__ import annotations

from . import require_source

#: SHA-256 prefix of ``Attention.get_kv_cache_spec``'s source in vLLM 0.26.0.
EXPECTED = "85ce33893a9443e8"
#: ``Attention.get_attn_backend`` (returns ``self.attn_backend``) and ``extract_layer_index`` in vLLM 0.26.0.
EXPECTED_GET_BACKEND = "949ff9e648a80925"
EXPECTED_LAYER_INDEX = "9c3d39998bd1cbb7"


def layer_index(layer_name: str) -> int:
    """The decoder layer index of an attention layer's name (``model.layers.7.self_attn.attn`` -> 7).

    Raises:
        KiviConfigError: the name does not hold exactly one integer (per-layer bits cannot be placed).
    """
    from vllm.model_executor.models.utils import extract_layer_index

    from ..config import FLAG, KiviConfigError

    try:
        return extract_layer_index(layer_name)
    except (AssertionError, ValueError):
        raise KiviConfigError(
            f"KIVI: {FLAG['layers']}: cannot tell the layer index of attention layer {layer_name!r}; per-layer bits "
            "need layer names with one index (model.layers.N...)"
        ) from None


def apply() -> None:
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.model_executor.models.utils import extract_layer_index
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    original = Attention.get_kv_cache_spec
    if getattr(original, "_kivi_patched", False):
        return
    require_source(original, EXPECTED, "Attention.get_kv_cache_spec")
    require_source(Attention.get_attn_backend, EXPECTED_GET_BACKEND, "Attention.get_attn_backend")
    require_source(extract_layer_index, EXPECTED_LAYER_INDEX, "vllm.model_executor.models.utils.extract_layer_index")

    def get_kv_cache_spec(self, vllm_config):
        spec = original(self, vllm_config)
        if type(spec) is FullAttentionSpec and getattr(self.attn_backend, "IS_KIVI", False):
            from ..backend.backend import KiviAttentionBackend, backend_for_bits
            from ..config import KiviConfig
            from ..spec import KiviAttentionSpec

            cfg = KiviConfig.from_vllm_config(vllm_config)
            if cfg.layers:
                layer_cfg = cfg.for_layer(layer_index(self.layer_name))
                bits = (layer_cfg.k_bits, layer_cfg.v_bits)
                default = bits == (cfg.k_bits, cfg.v_bits)
                self.attn_backend = KiviAttentionBackend if default else backend_for_bits(*bits)
                cfg = layer_cfg
            return KiviAttentionSpec.from_full_spec(spec, cfg, residual_dtype=vllm_config.model_config.dtype)
        return spec

    get_kv_cache_spec._kivi_patched = True
    get_kv_cache_spec.__wrapped__ = original
    Attention.get_kv_cache_spec = get_kv_cache_spec
