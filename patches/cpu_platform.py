"""Patch vLLM's CPU platform (``vllm/platforms/cpu.py``) to honour ``--attention-backend CUSTOM`` for KIVI.

``CpuPlatform.get_attn_backend_cls`` logs "Cannot use ... backend on CPU" and always returns CPU_ATTN; the patch
returns the CUSTOM backend when it is selected, after the same ``validate_configuration`` check the CUDA platform
runs (so unsupported head sizes, dtypes or sliding windows are refused with the same message). And
``CpuPlatform.update_block_size_for_backend`` skips the backend's preferred block size that the CUDA platform
applies; the patch applies it for the KIVI backend when the user did not pass ``--block-size``.
Other backends and platforms are untouched.
"""

from __future__ import annotations

from . import require_source

#: SHA-256 prefixes of the two wrapped methods' sources in vLLM 0.26.0.
EXPECTED_SELECT = "aeca3a581a88d5d7"
EXPECTED_BLOCK = "c2893d29fb44c15a"


def apply() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    select = CpuPlatform.get_attn_backend_cls.__func__
    if getattr(select, "_kivi_patched", False):
        return
    block = CpuPlatform.update_block_size_for_backend.__func__
    require_source(select, EXPECTED_SELECT, "CpuPlatform.get_attn_backend_cls")
    require_source(block, EXPECTED_BLOCK, "CpuPlatform.update_block_size_for_backend")

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if selected_backend == AttentionBackendEnum.CUSTOM:
            backend_cls = AttentionBackendEnum.CUSTOM.get_class()
            reasons = backend_cls.validate_configuration(
                device_capability=cls.get_device_capability(), **attn_selector_config._asdict()
            )
            if reasons:
                raise ValueError(
                    f"Selected backend {selected_backend} is not valid for this configuration. Reason: {reasons}"
                )
            return AttentionBackendEnum.CUSTOM.get_path()
        return select(cls, selected_backend, attn_selector_config, num_heads)

    def update_block_size_for_backend(cls, vllm_config):
        backend_cls = cls._find_non_ssm_backend(vllm_config) if vllm_config.model_config else None
        cache_config = vllm_config.cache_config
        if getattr(backend_cls, "IS_KIVI", False) and not cache_config.user_specified_block_size:
            from vllm.config.cache import CacheConfig

            cache_config.block_size = backend_cls.get_preferred_block_size(CacheConfig.DEFAULT_BLOCK_SIZE)
        return block(cls, vllm_config)

    for fn, orig in ((get_attn_backend_cls, select), (update_block_size_for_backend, block)):
        fn._kivi_patched = True
        fn.__wrapped__ = orig
    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    CpuPlatform.update_block_size_for_backend = classmethod(update_block_size_for_backend)
