"""Why the CPU tests run KIVI-2's self-invariance checks with a float32 model: bf16 against float32 on this CPU.

Prints (1) the GFLOP/s of one SmolLM2-135M-sized linear (1024 tokens x 576 -> 1536, the MLP's up projection) in
bf16 and float32 through ``torch.matmul``, and (2) the start and generation seconds of one offline vLLM engine
(KIVI-2, SmolLM2-135M, block size 64, 8 long prompts x 64 greedy tokens, in this process) with each model dtype.
On CPUs without AVX512-BF16/AMX, torch's bf16 GEMM has no fast kernel and vLLM's CPU backend falls back to it.

    .venv/bin/python scripts/cpu_dtype_speed.py              # both parts (about 5 minutes on 2 cores)
    .venv/bin/python scripts/cpu_dtype_speed.py --gemm-only  # part 1 (seconds)

Used by tests/test_engine.py (``INVARIANCE_DTYPE``) and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def gemm_gflops(dtype: torch.dtype, m: int = 1024, k: int = 576, n: int = 1536, reps: int = 20) -> float:
    """Median GFLOP/s of ``[m, k] @ [k, n]`` in ``dtype`` on the CPU (2 m k n flops per product)."""
    a = torch.randn(m, k, dtype=dtype)
    b = torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * m * k * n / sorted(times)[reps // 2] / 1e9


def engine_seconds(dtype: str) -> tuple[float, float]:
    """(start, generation) seconds of one KIVI-2 engine on the default model with model dtype ``dtype``."""
    from vllm import LLM, SamplingParams

    from kivi_vllm.models import default_model_path
    from kivi_vllm.prompts import long_prompts
    from kivi_vllm.runtime import shutdown_engine

    t0 = time.perf_counter()
    llm = LLM(model=str(default_model_path()), dtype=dtype, max_model_len=2048, enforce_eager=True, seed=0,
              max_num_batched_tokens=1024, max_num_seqs=16, block_size=64, attention_backend="CUSTOM",
              additional_config={"kivi": {"bits": 2}})
    t1 = time.perf_counter()
    llm.generate(long_prompts(8), SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True), use_tqdm=False)
    t2 = time.perf_counter()
    shutdown_engine(llm)
    return t1 - t0, t2 - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gemm-only", action="store_true")
    a = ap.parse_args()
    for dtype in (torch.bfloat16, torch.float32):
        print(f"GEMM 1024 x 576 x 1536 {str(dtype).replace('torch.', '')}: {gemm_gflops(dtype):.1f} GFLOP/s",
              flush=True)
    if a.gemm_only:
        return
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process, as tests/conftest.py runs engines
    from kivi_vllm.runtime import apply_env_defaults

    apply_env_defaults()
    for dtype in ("float32", "bfloat16"):
        start, gen = engine_seconds(dtype)
        print(f"KIVI-2 engine, {dtype} model: start {start:.1f} s, 8 prompts x 64 tokens {gen:.1f} s", flush=True)


if __name__ == "__main__":
    main()
