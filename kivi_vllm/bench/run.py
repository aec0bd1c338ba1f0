"""One benchmark run: one KV-cache configuration x one workload, in this process.

The run starts vLLM's offline engine (``LLMEngine``, the engine behind ``vllm.LLM``, with the offline
``LLM_CLASS`` scheduler defaults), adds every request at once (token-id prompts of fixed length, ``ignore_eos`` and
``max_tokens`` = the output length, greedy), and calls ``step()`` until all are finished. Every number comes from
the engine:

* KV capacity: ``cache_config.num_gpu_blocks x cache_config.block_size`` after the engine profiled its memory (for
  KIVI the plugin's page size sets ``num_gpu_blocks``). vLLM's own ``kv_cache_size_tokens`` is kept too; it counts
  only the tokens that requests of ``max_model_len`` can use, so it is lower when ``max_model_len`` is not a
  multiple of the block size.
* Concurrency, KV-cache usage, preemptions, tokens per step: vLLM's ``SchedulerStats`` and ``IterationStats``,
  received every step by a stat logger registered with the engine (``stat_loggers=``).
* TTFT and TPOT per request: vLLM's ``RequestOutput.metrics``. TTFT = ``first_token_latency`` (from the request's
  arrival to the step that produced its first token); TPOT = ``(last_token_ts - first_token_ts) / (output tokens -
  1)``, vLLM's ``mean_time_per_output_token``. All requests arrive at the start, so TTFT includes the time a request
  waits for KV-cache space: it is where capacity shows.

Throughput: requests, output tokens and prompt + output tokens over the wall time from the first ``add_request`` to
the last finished request (as ``vllm bench throughput`` counts it). A short warm-up (``warmup_requests`` requests
of the same prompt length, 4 output tokens) runs first and is not counted, so kernel compilation on first use does
not land in the timed run.

``python -m kivi_vllm.bench.run --spec JSON --out FILE [--progress-fd N]`` is what :mod:`kivi_vllm.bench.cli` starts
in a subprocess per run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable

#: Steps kept in a run file's trace (evenly strided when a run has more).
MAX_TRACE_STEPS = 2000
#: Output tokens of each warm-up request.
WARMUP_OUTPUT_TOKENS = 4


@dataclass(frozen=True)
class Workload:
    """``num_requests`` requests, each a prompt of ``prompt_len`` random token ids and exactly ``output_len``
    generated tokens (``ignore_eos``), all arriving at once."""

    name: str
    prompt_len: int
    output_len: int
    num_requests: int

    @property
    def key(self) -> str:
        """File-name-safe id: ``decode_512x1024+1024``."""
        return f"{self.name}_{self.num_requests}x{self.prompt_len}+{self.output_len}"

    @property
    def label(self) -> str:
        """Table label: ``decode 512x(1024+1024)``."""
        return f"{self.name} {self.num_requests}x({self.prompt_len}+{self.output_len})"

    @property
    def tokens_per_request(self) -> int:
        return self.prompt_len + self.output_len


#: The issue's workloads. Request counts are sized for Llama-2-7B on one H200 at gpu_memory_utilization 0.9
#: (228,496 bf16 KV tokens in blocks of 16): bf16 is KV-bound in all of them, and each configuration's timed run is
#: meant to stay under about 4 minutes there.
WORKLOADS: dict[str, Workload] = {
    "paper": Workload("paper", 161, 338, 2048),  # the KIVI paper's lengths; bf16 fits ~446 at full length
    "long": Workload("long", 3584, 512, 256),  # bf16 fits ~55 requests of 4,096 tokens
    "decode": Workload("decode", 1024, 1024, 512),  # bf16 fits ~111 requests of 2,048 tokens
    "baseline": Workload("baseline", 1024, 256, 1024),  # the reference run (bf16 75.3 s, fp8 64.5 s)
}


@dataclass(frozen=True)
class EngineSettings:
    """What every configuration of one invocation shares.

    Attributes:
        model: Hugging Face folder (a folder with only ``config.json`` runs with dummy weights).
        load_format: vLLM ``load_format``; None picks ``dummy`` for a folder without weight files, else ``auto``.
        max_model_len: tokens; at least the workload's prompt + output length.
        gpu_memory_utilization: fraction of GPU memory vLLM may use (ignored by vLLM's CPU build, whose KV cache is
            ``VLLM_CPU_KVCACHE_SPACE`` GiB).
        seed: engine seed and the seed of the random prompt token ids.
        max_num_seqs: scheduler cap on running requests; None = the workload's request count, so the KV cache
            and not the cap limits concurrency.
        max_num_batched_tokens: tokens per step; None = vLLM's offline default (16,384 on an H200, 4,096 on CPU).
        enforce_eager: None = eager on CPU, torch.compile + CUDA graphs elsewhere.
        warmup_requests: untimed requests before the run (0 = none).
        time_limit_s: abort the timed run after this many seconds (None = no limit); the run is then reported
            with ``complete: false``.
    """

    model: str
    load_format: str | None = None
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.9
    seed: int = 0
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enforce_eager: bool | None = None
    warmup_requests: int = 2
    time_limit_s: float | None = None


def pick_load_format(model: str) -> str:
    """``dummy`` for a model folder without weight files (``*.safetensors``, ``*.bin``, ``*.pt``), else ``auto``."""
    if os.path.isdir(model) and not any(f.endswith((".safetensors", ".bin", ".pt")) for f in os.listdir(model)):
        return "dummy"
    return "auto"


def token_prompts(num: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """``num`` prompts of ``length`` token ids drawn uniformly from [100, vocab_size) (no special tokens), the same
    for every configuration with the same seed."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(100, vocab_size, size=(num, length)).tolist()


def summary(values: list[float]) -> dict[str, float | None]:
    """Mean, median (p50) and 99th percentile (numpy's linear interpolation) of ``values``; None when empty."""
    import numpy as np

    if not values:
        return {"mean": None, "p50": None, "p99": None}
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))}


def binding_limit(max_running: int, num_requests: int, max_num_seqs: int) -> str:
    """What capped the number of running requests.

    Returns:
        ``"all requests"`` when every request ran at once (neither limit was reached), ``"max_num_seqs"`` when the
        scheduler cap was reached, else ``"KV cache"`` (the scheduler could not admit more: no free KV blocks, or
        requests finished before the prefill token budget admitted more; compare with the run's
        ``requests_fit_full_length``).
    """
    if max_running >= num_requests:
        return "all requests"
    if max_running >= max_num_seqs:
        return "max_num_seqs"
    return "KV cache"


def kv_cache_arguments(config: object) -> dict:
    """Engine arguments that select a KV-cache configuration of :data:`kivi_vllm.eval.perplexity.CONFIGS`
    (None = model dtype, a str = vLLM ``kv_cache_dtype``, a dict = KIVI settings) plus this benchmark's scheduler
    choices: vLLM's defaults for the step token budget, no prefix caching (random prompts share nothing)."""
    from ..eval.perplexity import engine_args

    kw = engine_args("", config, chunk=None, window=0)
    keep = ("kv_cache_dtype", "attention_backend", "additional_config", "enable_prefix_caching",
            "enable_chunked_prefill")
    return {k: v for k, v in kw.items() if k in keep}


def _step_recorder_class():
    """A vLLM stat logger class that keeps the per-step stats the benchmark reports (vLLM imported lazily)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class StepRecorder(StatLoggerBase):
        """Receives vLLM's ``SchedulerStats`` and ``IterationStats`` after every engine step with outputs."""

        instances: list["StepRecorder"] = []

        def __init__(self, vllm_config, engine_index: int = 0):
            self.reset()
            StepRecorder.instances.append(self)

        def reset(self) -> None:
            self.steps: list[tuple] = []  # (time s, running, waiting, KV usage, generated tokens, mean ITL s)
            self.max_running = 0
            self.max_kv_cache_usage = 0.0
            self.preemptions = 0
            self.generation_tokens = 0
            self.prompt_tokens = 0

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            running = waiting = usage = None
            if scheduler_stats is not None:
                running, waiting = scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs
                usage = scheduler_stats.kv_cache_usage
                self.max_running = max(self.max_running, running)
                self.max_kv_cache_usage = max(self.max_kv_cache_usage, usage)
            if iteration_stats is None:
                return
            self.generation_tokens += iteration_stats.num_generation_tokens
            self.prompt_tokens += iteration_stats.num_prompt_tokens
            self.preemptions += iteration_stats.num_preempted_reqs
            itl = iteration_stats.inter_token_latencies_iter
            self.steps.append((iteration_stats.iteration_timestamp, running, waiting, usage,
                               iteration_stats.num_generation_tokens, sum(itl) / len(itl) if itl else None))

        def log_engine_initialized(self):
            pass

    return StepRecorder


def gpu_memory_probe() -> tuple[Callable[[], int], int] | None:
    """(function returning the bytes in use on the engine's GPU, the GPU's total bytes) through NVML, which
    creates no CUDA context in this process; None off CUDA. NVML counts every process on the device (the engine
    core and its worker live in other processes)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        return None
    from vllm.utils.import_utils import import_pynvml

    pynvml = import_pynvml()
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(current_platform.device_id_to_physical_device_id(0))
    return (lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)), int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)


def _platform_info() -> dict:
    import torch
    import vllm
    from vllm.platforms import current_platform

    try:
        device = current_platform.get_device_name()
    except Exception:  # the CPU platform has no device name
        device = platform.processor() or platform.machine()
    return dict(platform=str(current_platform.device_type), device=device, vllm=vllm.__version__,
                torch=torch.__version__, python=sys.version.split()[0], cpu_count=os.cpu_count(),
                kivi_attention_path=os.environ.get("KIVI_ATTENTION_PATH", "auto"))


def _strided(rows: list[tuple], limit: int) -> list[tuple]:
    if len(rows) <= limit:
        return rows
    step = math.ceil(len(rows) / limit)
    return rows[::step]


def run(config_name: str, config: object, workload: Workload, settings: EngineSettings,
        progress: Callable[[dict], None] | None = None) -> dict:
    """Start an engine for one KV-cache configuration, run the workload, shut the engine down.

    Args:
        config_name: name in the results (``bf16``, ``kivi2``, ...).
        config: None, a vLLM ``kv_cache_dtype`` string or a KIVI settings dict (as in
            :data:`kivi_vllm.eval.perplexity.CONFIGS`).
        progress: called with small dicts (``{"phase": ...}``; during the timed run also ``done`` and ``total``
            output tokens and ``running`` requests), at most every half second.

    Returns:
        A JSON-ready dict; keys are described in docs/benchmarks.md. Times in seconds, memory in GiB.

    Raises:
        ValueError: the workload does not fit ``max_model_len``.
    """
    if workload.tokens_per_request > settings.max_model_len:
        raise ValueError(f"{workload.label} needs max_model_len >= {workload.tokens_per_request}, "
                         f"got {settings.max_model_len}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    from ..runtime import apply_env_defaults, is_vllm_cpu_build, shutdown_engine

    apply_env_defaults()
    report = progress or (lambda _: None)
    from vllm import SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.llm_engine import LLMEngine

    cpu = is_vllm_cpu_build()
    max_num_seqs = settings.max_num_seqs or workload.num_requests
    load_format = settings.load_format or pick_load_format(settings.model)
    eager = cpu if settings.enforce_eager is None else settings.enforce_eager
    kw = dict(model=settings.model, dtype="bfloat16", load_format=load_format, skip_tokenizer_init=True,
              max_model_len=settings.max_model_len, gpu_memory_utilization=settings.gpu_memory_utilization,
              seed=settings.seed, max_num_seqs=max_num_seqs, max_num_batched_tokens=settings.max_num_batched_tokens,
              enforce_eager=eager, disable_log_stats=False, **kv_cache_arguments(config))
    recorder_cls = _step_recorder_class()
    report({"phase": "engine"})
    t0 = time.perf_counter()
    engine = LLMEngine.from_engine_args(EngineArgs(**kw), usage_context=UsageContext.LLM_CLASS,
                                        stat_loggers=[recorder_cls])
    init_s = time.perf_counter() - t0
    try:
        recorder = recorder_cls.instances[-1]
        cfg = engine.vllm_config
        cc, sc = cfg.cache_config, cfg.scheduler_config
        blocks, block_size = cc.num_gpu_blocks, cc.block_size
        try:
            probe, probe_error = gpu_memory_probe(), None
        except Exception as e:  # NVML missing or refusing: the run goes on, without peak memory
            probe, probe_error = None, f"{type(e).__name__}: {e}"
        result = dict(
            status="ok", config=config_name, kv_cache_setting=config, workload=dataclasses.asdict(workload),
            workload_key=workload.key, workload_label=workload.label, settings=dataclasses.asdict(settings),
            platform=_platform_info(),
            engine=dict(load_format=load_format, enforce_eager=eager, max_num_seqs=sc.max_num_seqs,
                        max_num_batched_tokens=sc.max_num_batched_tokens, kv_cache_dtype=cc.cache_dtype,
                        cudagraph_mode=str(cfg.compilation_config.cudagraph_mode), block_size=block_size,
                        num_gpu_blocks=blocks, vllm_kv_cache_size_tokens=cc.kv_cache_size_tokens,
                        vllm_kv_cache_max_concurrency=cc.kv_cache_max_concurrency, init_s=round(init_s, 2)),
            kv_capacity_tokens=blocks * block_size,
            requests_fit_full_length=blocks // math.ceil(workload.tokens_per_request / block_size),
        )
        report({"phase": "ready", "kv_capacity_tokens": result["kv_capacity_tokens"]})
        vocab = cfg.model_config.get_vocab_size()
        sp = SamplingParams(temperature=0.0, max_tokens=workload.output_len, ignore_eos=True, detokenize=False,
                            output_kind=RequestOutputKind.FINAL_ONLY)
        if settings.warmup_requests:
            report({"phase": "warmup"})
            warm = SamplingParams(temperature=0.0, max_tokens=min(WARMUP_OUTPUT_TOKENS, workload.output_len),
                                  ignore_eos=True, detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY)
            for i, ids in enumerate(token_prompts(settings.warmup_requests, workload.prompt_len, vocab,
                                                  settings.seed + 1)):
                engine.add_request(f"warmup-{i}", TokensPrompt(prompt_token_ids=ids), warm)
            while engine.has_unfinished_requests():
                engine.step()
        prompts = token_prompts(workload.num_requests, workload.prompt_len, vocab, settings.seed)
        result.update(_timed_run(engine, recorder, prompts, sp, workload, settings, probe, report))
        result["bound"] = binding_limit(result["max_running"], workload.num_requests, sc.max_num_seqs)
        if probe is not None:
            result["gpu_memory_total_gib"] = round(probe[1] / 2**30, 2)
        if probe_error:
            result["peak_gpu_memory_error"] = probe_error
        return result
    finally:
        shutdown_engine(engine)


def _timed_run(engine, recorder, prompts, sp, workload: Workload, settings: EngineSettings, probe, report) -> dict:
    """Add every request, step until all finish (or the time limit), and collect the numbers of the run."""
    from vllm.inputs import TokensPrompt

    recorder.reset()
    total = workload.num_requests * workload.output_len
    peak_mem = probe[0]() if probe else None
    finished: dict[str, tuple[float, object]] = {}
    t0 = time.perf_counter()
    wall0 = time.time()
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), TokensPrompt(prompt_token_ids=ids), sp)
    add_s = time.perf_counter() - t0
    report({"phase": "run", "done": 0, "total": total, "running": 0})
    last_report = truncated = 0.0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        for o in outputs:
            if o.finished:
                finished[o.request_id] = (now - t0, o)
        if now - last_report >= 0.5:
            last_report = now
            if probe:
                peak_mem = max(peak_mem, probe[0]())
            report({"phase": "run", "done": recorder.generation_tokens, "total": total,
                    "running": recorder.steps[-1][1] if recorder.steps else 0})
        if settings.time_limit_s is not None and now - t0 > settings.time_limit_s:
            engine.abort_request([str(i) for i in range(len(prompts)) if str(i) not in finished])
            truncated = now - t0
            break
    elapsed = truncated or max((t for t, _ in finished.values()), default=time.perf_counter() - t0)
    if probe:
        peak_mem = max(peak_mem, probe[0]())
    report({"phase": "run", "done": recorder.generation_tokens, "total": total, "running": 0})

    ttft, tpot, e2e, out_lens = [], [], [], []
    for rid in sorted(finished, key=int):
        t, o = finished[rid]
        m = o.metrics
        n = len(o.outputs[0].token_ids)
        out_lens.append(n)
        e2e.append(t)
        ttft.append(m.first_token_latency)
        if n > 1:
            tpot.append((m.last_token_ts - m.first_token_ts) / (n - 1))
    output_tokens, prompt_tokens = recorder.generation_tokens, recorder.prompt_tokens
    steps = _strided(recorder.steps, MAX_TRACE_STEPS)
    t_first = recorder.steps[0][0] if recorder.steps else wall0
    return dict(
        complete=not truncated and len(finished) == workload.num_requests,
        completed_requests=len(finished), elapsed_s=elapsed, add_requests_s=add_s,
        output_tokens=output_tokens, prompt_tokens=prompt_tokens, completed_output_tokens=sum(out_lens),
        requests_per_s=len(finished) / elapsed, output_tokens_per_s=output_tokens / elapsed,
        total_tokens_per_s=(prompt_tokens + output_tokens) / elapsed,
        max_running=recorder.max_running, peak_kv_cache_usage=recorder.max_kv_cache_usage,
        preemptions=recorder.preemptions, steps_recorded=len(recorder.steps),
        tpot_s=summary(tpot), ttft_s=summary(ttft),
        peak_gpu_memory_gib=None if peak_mem is None else round(peak_mem / 2**30, 2),
        per_request=dict(ttft_s=ttft, tpot_s=tpot, e2e_s=e2e, output_tokens=out_lens),
        steps=dict(t_s=[s[0] - t_first for s in steps], running=[s[1] for s in steps],
                   waiting=[s[2] for s in steps], kv_cache_usage=[s[3] for s in steps],
                   generation_tokens=[s[4] for s in steps], itl_s=[s[5] for s in steps]),
    )


def main(argv: list[str] | None = None) -> None:
    """Subprocess entry: run one spec (JSON: config_name, config, workload, settings) and write the result to
    ``--out``; progress as JSON lines on ``--progress-fd``."""
    ap = argparse.ArgumentParser(prog="python -m kivi_vllm.bench.run")
    ap.add_argument("--spec", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--progress-fd", type=int)
    a = ap.parse_args(argv)
    spec = json.loads(a.spec)
    pipe = None
    if a.progress_fd is not None:
        os.set_inheritable(a.progress_fd, False)  # engine processes must not hold the pipe open
        pipe = os.fdopen(a.progress_fd, "w", buffering=1)

    def progress(event: dict) -> None:
        if pipe is not None:
            try:
                pipe.write(json.dumps(event) + "\n")
            except OSError:  # the parent stopped listening; the run goes on
                pass

    result = run(spec["config_name"], spec["config"], Workload(**spec["workload"]),
                 EngineSettings(**spec["settings"]), progress)
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, a.out)


if __name__ == "__main__":
    main()
