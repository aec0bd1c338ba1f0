"""``kivi-bench``: KV capacity and throughput of KV-cache configurations on vLLM's offline engine.

    kivi-bench                                            # paper workload, bf16 fp8 kivi4 kivi2 (+ TurboQuant on GPU)
    kivi-bench --workloads decode --configs bf16 kivi2    # one chunk; results merge in --out
    kivi-bench --baseline                                 # 1024 x (1024+256), bf16 and fp8: ratios vs the issue's run
    kivi-bench --prompt-len 64 --output-len 16 --num-requests 6 --model ~/.cache/kivi-vllm/smollm2-135m-instruct
    kivi-bench --report-only --merge run1/ gpu/results.json --out all/   # one table from several invocations

Every (workload, configuration) runs in its own subprocess with the same model, max_model_len,
gpu_memory_utilization, seed and prompts, so one engine's GPU memory is freed before the next starts. Per run:
KV capacity (tokens, from the engine's blocks), the most running requests and what bound them, requests/s,
output and total tokens/s, TPOT and TTFT (mean, p50, p99), peak GPU memory (CUDA only). The output folder gets
``runs/*.json`` (one per run), ``logs/*.log`` (each run's vLLM log), ``results.json``, ``results.md`` (the table)
and PNG plots; every invocation rebuilds them from all run files in the folder. Method: :mod:`kivi_vllm.bench.run`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import select
import shutil
import subprocess
import sys
from pathlib import Path

from ..eval.perplexity import CONFIGS
from . import report
from .run import WORKLOADS, EngineSettings, Workload

PROG = "kivi-bench"
#: The Llama-2-7B shape (``config.json`` only, dummy weights), the default model.
LLAMA2_7B = str(Path(__file__).resolve().parents[2] / "benchmarks" / "llama2-7b")
DEFAULT_CONFIGS = ["bf16", "fp8", "kivi4", "kivi2", "turboquant"]
ALIASES = {"auto": "bf16"}
TURBOQUANT = "turboquant"


def turboquant_presets() -> list[str]:
    """vLLM's TurboQuant ``kv_cache_dtype`` presets (empty when this vLLM has none)."""
    try:
        from vllm.model_executor.layers.quantization.turboquant.config import TQ_PRESETS
    except ImportError:
        return []
    return list(TQ_PRESETS)


def resolve_configs(names: list[str], cpu_build: bool) -> tuple[list[tuple[str, object]], list[tuple[str, str]]]:
    """Configuration names to (runnable ``(name, setting)`` pairs, skipped ``(name, reason)`` pairs), in order.

    Names: those of :data:`kivi_vllm.eval.perplexity.CONFIGS`, ``auto`` (= ``bf16``), a TurboQuant preset of vLLM
    (``turboquant_k8v4``, ...) or ``turboquant`` for all of them. TurboQuant is skipped on vLLM's CPU build, which
    has no TurboQuant attention backend.

    Raises:
        ValueError: an unknown name.
    """
    runnable, skipped, seen = [], [], set()
    presets = turboquant_presets() if any(n.startswith(TURBOQUANT) for n in names) else []
    for raw in names:
        name = ALIASES.get(raw, raw)
        expanded = presets if name == TURBOQUANT else [name]
        if name == TURBOQUANT and not presets:
            skipped.append((TURBOQUANT, "this vLLM offers no TurboQuant presets"))
        for n in expanded:
            if n in seen:
                continue
            seen.add(n)
            if n in CONFIGS:
                runnable.append((n, CONFIGS[n]))
            elif n in presets or (n.startswith(TURBOQUANT + "_") and n in turboquant_presets()):
                if cpu_build:
                    skipped.append((n, "vLLM's CPU platform has no TurboQuant attention backend (CUDA, ROCm and "
                                       "XPU only)"))
                else:
                    runnable.append((n, n))
            else:
                known = sorted(set(CONFIGS) | set(ALIASES) | {TURBOQUANT} | set(presets))
                raise ValueError(f"unknown configuration {raw!r}; known: {', '.join(known)}")
    return runnable, skipped


def workloads_from_args(a: argparse.Namespace) -> list[Workload]:
    """The named workloads (``--num-requests`` overrides their request counts), then a ``custom`` one when
    ``--prompt-len``/``--output-len`` are given, then ``baseline`` with ``--baseline``.

    Raises:
        ValueError: a custom workload without all of prompt length, output length and request count.
    """
    custom = a.prompt_len is not None or a.output_len is not None
    names = a.workloads if a.workloads is not None else ([] if custom or a.baseline else ["paper"])
    out = []
    for name in names:
        w = WORKLOADS[name]
        out.append(dataclasses.replace(w, num_requests=a.num_requests) if a.num_requests else w)
    if custom:
        if a.prompt_len is None or a.output_len is None or a.num_requests is None:
            raise ValueError("a custom workload needs --prompt-len, --output-len and --num-requests")
        if a.prompt_len < 1 or a.output_len < 1 or a.num_requests < 1:
            raise ValueError("--prompt-len, --output-len and --num-requests must be >= 1")
        out.append(Workload("custom", a.prompt_len, a.output_len, a.num_requests))
    if a.baseline and "baseline" not in names:
        out.append(WORKLOADS["baseline"])
    return out


def _placeholder(status: str, reason: str, name: str, config: object, w: Workload, s: EngineSettings) -> dict:
    return dict(status=status, reason=reason, config=name, kv_cache_setting=config, workload=dataclasses.asdict(w),
                workload_key=w.key, workload_label=w.label, settings=dataclasses.asdict(s))


def _write(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def _progress_lines(fd: int, proc: subprocess.Popen):
    """Yield the JSON lines the run process writes on ``fd`` until the pipe closes or the process has exited (an
    engine process it leaves behind may still hold the pipe open: a plain read would then block forever). Closes
    ``fd``."""
    buf = b""
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                *lines, buf = (buf + chunk).split(b"\n")
                yield from (line.decode(errors="replace") for line in lines)
            elif proc.poll() is not None:
                break
    finally:
        os.close(fd)


def run_in_subprocess(name: str, config: object, w: Workload, s: EngineSettings, out_dir: str,
                      verbose: bool = False) -> dict:
    """Run one (workload, configuration) in a fresh Python process with a progress bar; write and return its run
    dict (status ``failed`` with the last log line as reason when the process fails)."""
    from tqdm import tqdm

    path = report.run_file(out_dir, w.key, name)
    log_path = os.path.join(out_dir, "logs", f"{w.key}__{name}.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        os.remove(path)
    spec = json.dumps(dict(config_name=name, config=config, workload=dataclasses.asdict(w),
                           settings=dataclasses.asdict(s)))
    r_fd, w_fd = os.pipe()
    cmd = [sys.executable, "-m", "kivi_vllm.bench.run", "--spec", spec, "--out", path, "--progress-fd", str(w_fd)]
    total = w.num_requests * w.output_len
    bar = tqdm(total=total, desc=f"{w.name}/{name}", unit="tok", dynamic_ncols=True, file=sys.stderr)
    bar.set_postfix_str("starting engine")
    with open(log_path, "w") as log:
        out = None if verbose else log
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None, pass_fds=(w_fd,))
        os.close(w_fd)
        for line in _progress_lines(r_fd, proc):
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("phase") == "ready":
                bar.set_postfix_str(f"KV cache {ev['kv_capacity_tokens']:,} tokens")
            elif ev.get("phase") == "warmup":
                bar.set_postfix_str("warm-up")
            elif ev.get("phase") == "run":
                bar.n = min(ev["done"], total)
                bar.set_postfix_str(f"{ev['running']} running")
        rc = proc.wait()
    bar.close()
    if rc == 0 and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    tail = _log_tail(log_path)
    reason = f"exit status {rc}: {tail[-1] if tail else 'no output'}"
    print(f"{w.label} / {name}: FAILED ({reason}); log: {log_path}", file=sys.stderr)
    if tail and not verbose:
        print("\n".join(tail[-15:]), file=sys.stderr)
    failed = _placeholder("failed", reason, name, config, w, s)
    failed["log"] = log_path
    _write(path, failed)
    return failed


def _log_tail(path: str) -> list[str]:
    try:
        with open(path, errors="replace") as f:
            lines = [x.rstrip() for x in f.read().splitlines() if x.strip()]
    except OSError:
        return []
    return lines[-40:]


def merge(out_dir: str, sources: list[str]) -> int:
    """Bring the runs of other output folders, or of their ``results.json`` files (all that a GPU machine may send
    back), into ``out_dir/runs``; a run of the same workload and configuration is replaced. Returns the count.

    Raises:
        FileNotFoundError: a source is neither a ``results.json`` file nor a folder with ``runs/`` or
            ``results.json``.
    """
    os.makedirs(os.path.join(out_dir, "runs"), exist_ok=True)
    n = 0
    for src in sources:
        runs_dir = os.path.join(src, "runs")
        results = src if os.path.isfile(src) else os.path.join(src, "results.json")
        if os.path.isdir(runs_dir):
            for name in sorted(os.listdir(runs_dir)):
                if name.endswith(".json"):
                    shutil.copyfile(os.path.join(runs_dir, name), os.path.join(out_dir, "runs", name))
                    n += 1
        elif os.path.isfile(results):
            with open(results) as f:
                for r in json.load(f)["runs"]:
                    _write(report.run_file(out_dir, r["workload_key"], r["config"]), r)
                    n += 1
        else:
            raise FileNotFoundError(f"{src}: not a kivi-bench output folder (runs/ or results.json) nor a "
                                    "results.json file")
    return n


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                                 epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", metavar="NAME",
                    help=f"KV-cache configurations, in order (default: {' '.join(DEFAULT_CONFIGS)}): "
                         f"{', '.join(sorted(CONFIGS))}, auto (= bf16), turboquant (all of vLLM's presets) or one "
                         "preset (turboquant_k8v4, ...)")
    ap.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), metavar="NAME",
                    help="; ".join(f"{w.name}: {w.num_requests} x ({w.prompt_len} + {w.output_len})"
                                   for w in WORKLOADS.values()) + " (default: paper)")
    ap.add_argument("--prompt-len", type=int, help="custom workload: prompt tokens per request")
    ap.add_argument("--output-len", type=int, help="custom workload: generated tokens per request")
    ap.add_argument("--num-requests", type=int,
                    help="requests of the custom workload; with --workloads, overrides their request counts")
    ap.add_argument("--baseline", action="store_true",
                    help="add the issue's reference workload (1024 x (1024 + 256)) and bf16 + fp8, print ratios")
    ap.add_argument("--model", default=LLAMA2_7B,
                    help="Hugging Face folder (default: the Llama-2-7B shape with dummy weights, "
                         "benchmarks/llama2-7b)")
    ap.add_argument("--load-format", help="vLLM load_format (default: dummy for a folder without weights, else auto)")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-num-seqs", type=int, help="scheduler cap (default: the workload's request count)")
    ap.add_argument("--max-num-batched-tokens", type=int, help="tokens per step (default: vLLM's offline default)")
    ap.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                    help="default: eager on CPU, CUDA graphs on GPU")
    ap.add_argument("--warmup-requests", type=int, default=2, help="untimed requests before each run (0 = none)")
    ap.add_argument("--time-limit", type=float, metavar="S",
                    help="abort a run's timed part after S seconds (reported as truncated)")
    ap.add_argument("--out", default="out/bench", help="output folder (results merge with what is there)")
    ap.add_argument("--merge", nargs="+", metavar="PATH", default=[],
                    help="first bring in the runs of other output folders or results.json files")
    ap.add_argument("--report-only", action="store_true", help="run nothing; rebuild the report of --out")
    ap.add_argument("--verbose", action="store_true", help="vLLM's log on the terminal instead of logs/")
    return ap


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run every (workload, configuration) in turn, write and print the report.

    Exits with status 1 when a run failed, 2 on bad arguments."""
    ap = build_parser()
    a = ap.parse_args(argv)
    from ..runtime import apply_env_defaults, is_vllm_cpu_build

    try:
        workloads = [] if a.report_only else workloads_from_args(a)
        names = a.configs or (["bf16", "fp8"] if a.baseline else DEFAULT_CONFIGS)
        if a.baseline:
            names = ["bf16", "fp8"] + [n for n in names if ALIASES.get(n, n) not in ("bf16", "fp8")]
        runnable, skipped = ([], []) if a.report_only else resolve_configs(names, is_vllm_cpu_build())
    except ValueError as e:
        ap.error(str(e))
    for w in workloads:
        if w.tokens_per_request > a.max_model_len:
            ap.error(f"{w.label} needs --max-model-len >= {w.tokens_per_request}")
    if workloads and a.model == LLAMA2_7B and not os.path.isdir(LLAMA2_7B):
        ap.error(f"the default model {LLAMA2_7B} (config.json of the Llama-2-7B shape) ships with the repository, "
                 "not with an installed wheel; pass --model")
    os.makedirs(a.out, exist_ok=True)
    if a.merge:
        try:
            print(f"merged {merge(a.out, a.merge)} run files into {a.out}")
        except FileNotFoundError as e:
            ap.error(str(e))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    apply_env_defaults()
    settings = EngineSettings(model=os.path.expanduser(a.model), load_format=a.load_format,
                              max_model_len=a.max_model_len, gpu_memory_utilization=a.gpu_memory_utilization,
                              seed=a.seed, max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
                              enforce_eager=a.enforce_eager, warmup_requests=a.warmup_requests,
                              time_limit_s=a.time_limit)
    failed = 0
    for w in workloads:
        for name, reason in skipped:
            print(f"{w.label} / {name}: skipped: {reason}", flush=True)
            _write(report.run_file(a.out, w.key, name), _placeholder("skipped", reason, name, name, w, settings))
        for name, config in runnable:
            r = run_in_subprocess(name, config, w, settings, a.out, a.verbose)
            if r["status"] == "ok":
                print(f"{w.label} / {name}: KV {r['kv_capacity_tokens']:,} tokens, max running {r['max_running']} "
                      f"({r['bound']}), {r['output_tokens_per_s']:,.0f} output tok/s, {r['elapsed_s']:.1f} s"
                      + ("" if r["complete"] else " (truncated)"), flush=True)
            else:
                failed += 1
    rep = report.write_report(a.out)
    print("\n" + rep["text"])
    if rep["baseline"]:
        print("\n" + "\n".join(rep["baseline"]))
    print(f"\nwrote {rep['results']}, {rep['table']}" + "".join(f", {p}" for p in rep["plots"]))
    if rep["plots_skipped"]:
        print(f"plots skipped: {rep['plots_skipped']}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
