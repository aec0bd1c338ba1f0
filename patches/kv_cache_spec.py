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

Exact layers (``KiviConfig.is_exact``, ``--kivi-layer 0,29=exact``): the patch returns vLLM's own spec for the layer
(a ``FullAttentionSpec`` in the model dtype, same block size) and gives the layer the backend vLLM picks when no
backend is forced (``selector._cached_get_attn_backend`` with ``backend=None``: CPU_ATTN on the CPU platform,
FlashAttention on CUDA for these models), checked against the block size by the backend's own
``validate_configuration``, and a new impl of that backend built with the arguments ``Attention.__init__`` gave the
KIVI impl (``KiviAttentionImpl.init_args``). ``Attention.forward`` reads ``attn_backend`` at call time
(``forward_includes_kv_cache_update``) and the attention ops call ``layer.impl``, so the swap before the runners
build their groups is enough; the patch fingerprints ``Attention.__init__``, ``Attention.forward`` and
``_cached_get_attn_backend`` for that.
"""

from __future__ import annotations

from . import require_source

#: SHA-256 prefix of ``Attention.get_kv_cache_spec``'s source in vLLM 0.26.0.
EXPECTED = "85ce33893a9443e8"
#: ``Attention.get_attn_backend`` (returns ``self.attn_backend``) and ``extract_layer_index`` in vLLM 0.26.0.
EXPECTED_GET_BACKEND = "949ff9e648a80925"
EXPECTED_LAYER_INDEX = "9c3d39998bd1cbb7"
#: What the exact-layer swap relies on in vLLM 0.26.0: ``Attention.__init__`` (the impl's arguments, the attributes it
#: sets), ``Attention.forward`` (reads ``attn_backend`` per call) and ``selector._cached_get_attn_backend``.
EXPECTED_ATTN_INIT = "ef20cafc9b6cc7fc"
EXPECTED_ATTN_FORWARD = "213499b2acb41ace"
EXPECTED_SELECT_BACKEND = "d9c61951ebce73c5"


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


def use_vllm_backend(layer, vllm_config) -> None:
    """Serve ``layer`` (an ``Attention`` built with the KIVI backend) with vLLM's own backend for it, unquantized:
    sets ``layer.attn_backend``, ``layer.impl`` (constructed as ``Attention.__init__`` does, from the KIVI impl's
    ``init_args``/``init_kwargs``), ``layer.backend`` and ``layer.kivi_exact = True``. ``Attention.__init__``'s
    backend-specific extras other than ``use_alibi_sqrt`` (FlexAttention's block_m/block_n, Triton's chunk lookback)
    are not replicated: the selector picks CPU_ATTN or FlashAttention for the models KIVI serves.

    Raises:
        KiviConfigError: vLLM's backend refuses this layer's configuration, e.g. the block size (the exact layers
            share the KIVI layers' block table, so they use the same block size).
    """
    from vllm.config import set_current_vllm_config
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.selector import AttentionSelectorConfig, _cached_get_attn_backend

    from ..config import FLAG, KiviConfigError

    block_size = vllm_config.cache_config.block_size
    kivi_impl = layer.impl
    # the fields vllm.v1.attention.selector.get_attn_backend fills, with the block size always set so that the
    # backend's own checks see the KIVI block size
    selector = AttentionSelectorConfig(
        head_size=layer.head_size, dtype=layer.dtype, kv_cache_dtype=layer.kv_cache_dtype, block_size=block_size,
        has_sink=layer.has_sink, use_mm_prefix=layer.use_mm_prefix, attn_type=layer.attn_type,
        has_sliding_window=layer.sliding_window is not None,
        use_non_causal=vllm_config.attention_config.use_non_causal,
        use_pcp=vllm_config.parallel_config.prefill_context_parallel_size > 1,
    )
    with set_current_vllm_config(vllm_config):
        backend = _cached_get_attn_backend(None, selector, num_heads=layer.num_heads)
        reasons = backend.validate_configuration(device_capability=current_platform.get_device_capability(),
                                                 **selector._asdict())
        if reasons:
            raise KiviConfigError(
                f"KIVI: {FLAG['layers']}: exact layer {layer.layer_name}: vLLM's {backend.get_name()} attention "
                f"backend cannot serve it at block size {block_size} ({'; '.join(map(str, reasons))}); exact layers "
                f"share the KIVI layers' block size ({FLAG['block_size']})"
            )
        kwargs = dict(kivi_impl.init_kwargs)
        if backend.supports_alibi_sqrt():
            kwargs["use_alibi_sqrt"] = layer.use_alibi_sqrt
        impl = backend.get_impl_cls()(*kivi_impl.init_args, **kwargs)
        impl.process_weights_after_loading(layer.dtype)
    layer.attn_backend = backend
    layer.impl = impl
    layer.backend = AttentionBackendEnum[backend.get_name()]
    layer.kivi_exact = True


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
    from vllm.v1.attention.selector import _cached_get_attn_backend

    require_source(Attention.__init__, EXPECTED_ATTN_INIT, "Attention.__init__")
    require_source(Attention.forward, EXPECTED_ATTN_FORWARD, "Attention.forward")
    require_source(_cached_get_attn_backend, EXPECTED_SELECT_BACKEND,
                   "vllm.v1.attention.selector._cached_get_attn_backend")

    def get_kv_cache_spec(self, vllm_config):
        spec = original(self, vllm_config)
        if type(spec) is FullAttentionSpec and getattr(self.attn_backend, "IS_KIVI", False):
            from ..backend.backend import KiviAttentionBackend, backend_for_bits
            from ..config import KiviConfig
            from ..spec import KiviAttentionSpec

            cfg = KiviConfig.from_vllm_config(vllm_config)
            if cfg.layers:
                index = layer_index(self.layer_name)
                if cfg.is_exact(index):
                    use_vllm_backend(self, vllm_config)
                    return spec  # vLLM's own: the model dtype, the same block size
                layer_cfg = cfg.for_layer(index)
                bits = (layer_cfg.k_bits, layer_cfg.v_bits)
                default = bits == (cfg.k_bits, cfg.v_bits)
                self.attn_backend = KiviAttentionBackend if default else backend_for_bits(*bits)
                cfg = layer_cfg
            return KiviAttentionSpec.from_full_spec(spec, cfg, residual_dtype=vllm_config.model_config.dtype)
        return spec

    get_kv_cache_spec._kivi_patched = True
    get_kv_cache_spec.__wrapped__ = original
    Attention.get_kv_cache_spec = get_kv_cache_spec
