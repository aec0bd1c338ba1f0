"""kivi-vllm: KIVI 2/4-bit KV-cache quantization as a vLLM 0.26 plugin.

``register`` is the ``vllm.general_plugins`` entry point: vLLM calls it once in every process it starts (API
server, engine core, workers) before any model is built.
"""

__version__ = "0.1.0"

#: Import path of the backend registered in vLLM's CUSTOM slot.
BACKEND_PATH = "kivi_vllm.backend.backend.KiviAttentionBackend"


def register() -> None:
    """Register the KIVI backend as vLLM's ``CUSTOM`` attention backend and apply the version-checked patches.

    Raises:
        kivi_vllm.patches.VllmVersionError: vLLM is not 0.26.x, or a patched function's source differs.
    """
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from .patches import apply_all

    apply_all()
    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
