"""kivi-bench on the CPU with real SmolLM2-135M weights: two configurations (bf16, KIVI-2) x 6 requests x (64 prompt
+ 16 output tokens), each in its own subprocess, then the report checked against independent arithmetic.

Nothing here depends on how fast this machine is: counts are compared with the workload, capacities with the page
arithmetic, percentiles with numpy on the per-request lists the run recorded.
"""

from __future__ import annotations

import json
import math
import os
import statistics

import numpy as np
import pytest

from kivi_vllm.bench import cli, report
from kivi_vllm.bench.run import WORKLOADS, binding_limit, summary, token_prompts

N, P, O = 6, 64, 16


@pytest.fixture(scope="module")
def bench(model_path, tmp_path_factory):
    """One kivi-bench invocation: bf16 (``auto``) and KIVI-2, the custom workload, one warm-up request; steps of
    N x P tokens (all six prompts fit one step) keep the engines' start-up warm-up short on the CPU."""
    out = tmp_path_factory.mktemp("bench")
    cli.main(["--configs", "auto", "kivi2", "--prompt-len", str(P), "--output-len", str(O), "--num-requests", str(N),
              "--model", model_path, "--warmup-requests", "1", "--max-num-batched-tokens", str(N * P), "--out", str(out)])
    with open(out / "results.json") as f:
        results = json.load(f)
    return out, {r["config"]: r for r in results["runs"]}


def test_every_request_completes_with_the_requested_tokens(bench):
    _, runs = bench
    assert set(runs) == {"bf16", "kivi2"}
    for name, r in runs.items():
        assert r["status"] == "ok" and r["complete"], name
        assert r["completed_requests"] == N
        assert r["output_tokens"] == N * O  # vLLM's per-step counter
        assert r["completed_output_tokens"] == N * O  # the finished requests' token lists
        assert r["per_request"]["output_tokens"] == [O] * N
        assert r["prompt_tokens"] == N * P
        assert r["output_tokens_per_s"] == pytest.approx(N * O / r["elapsed_s"])
        assert r["total_tokens_per_s"] == pytest.approx(N * (P + O) / r["elapsed_s"])
        assert r["requests_per_s"] == pytest.approx(N / r["elapsed_s"])
        assert r["peak_gpu_memory_gib"] is None  # CPU


def kivi_page_bytes_per_head(block: int, d: int, bits: int = 2, g: int = 32, itemsize: int = 2) -> int:
    """docs/design.md section 2, written out: m = block / g group records, the last one shared with the stage
    (exact keys and values of one group in the model dtype)."""
    gv = math.gcd(g, d)
    record = g * d * bits // 8 + 2 * d * 2 + g * d * bits // 8 + 2 * g * (d // gv) * 2
    return (block // g - 1) * record + 2 * g * d * itemsize


def test_capacity_is_the_engines_blocks_and_matches_the_page_arithmetic(bench, model_path):
    _, runs = bench
    with open(os.path.join(model_path, "config.json")) as f:
        hf = json.load(f)
    layers, heads = hf["num_hidden_layers"], hf["num_key_value_heads"]
    d = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    kv_bytes = float(os.environ["VLLM_CPU_KVCACHE_SPACE"]) * 2**30
    bf16, kivi2 = runs["bf16"], runs["kivi2"]
    for r in (bf16, kivi2):
        assert r["kv_capacity_tokens"] == r["engine"]["num_gpu_blocks"] * r["engine"]["block_size"]
        tokens = P + O
        assert r["requests_fit_full_length"] == r["engine"]["num_gpu_blocks"] // -(-tokens // r["engine"]["block_size"])
    b = bf16["engine"]["block_size"]
    assert bf16["engine"]["num_gpu_blocks"] == int(kv_bytes // (layers * heads * b * 2 * d * 2))
    assert kivi2["engine"]["block_size"] == 512
    assert kivi2["engine"]["num_gpu_blocks"] == int(kv_bytes // (layers * heads * kivi_page_bytes_per_head(512, d)))
    assert kivi2["kv_capacity_tokens"] >= 4 * bf16["kv_capacity_tokens"]
    print(f"\nKV tokens: bf16 {bf16['kv_capacity_tokens']:,}, KIVI-2 {kivi2['kv_capacity_tokens']:,} "
          f"({kivi2['kv_capacity_tokens'] / bf16['kv_capacity_tokens']:.2f}x)")


def test_concurrency_and_what_bound_it(bench):
    _, runs = bench
    for r in runs.values():
        # max_num_seqs is raised to the request count, and 6 x 64 prompt tokens fit one step: all run at once
        assert r["engine"]["max_num_seqs"] == N
        assert r["max_running"] == N
        assert r["bound"] == "all requests"
        assert r["preemptions"] == 0
        assert max(r["steps"]["running"]) == N
        assert sum(r["steps"]["generation_tokens"]) == N * O


def test_latency_percentiles_match_the_per_request_lists(bench):
    _, runs = bench
    for r in runs.values():
        ttft, tpot, e2e = (r["per_request"][k] for k in ("ttft_s", "tpot_s", "e2e_s"))
        assert len(ttft) == len(tpot) == len(e2e) == N
        for values, s in ((ttft, r["ttft_s"]), (tpot, r["tpot_s"])):
            assert all(v > 0 for v in values)
            assert s["mean"] == pytest.approx(statistics.fmean(values))
            assert s["p50"] == pytest.approx(statistics.median(values))
            assert s["p99"] == pytest.approx(float(np.percentile(values, 99)))
            assert min(values) <= s["p50"] <= s["p99"] <= max(values)
        # the first token arrives before the request is seen finished (both from the request's arrival or later)
        assert all(a <= b for a, b in zip(ttft, e2e))


def test_report_files(bench):
    out, runs = bench
    table = (out / "results.md").read_text()
    for name in runs:
        assert f"| {name} |" in table
    ratio = runs["kivi2"]["kv_capacity_tokens"] / runs["bf16"]["kv_capacity_tokens"]
    assert f"| {ratio:.2f}x |" in table
    for name in ("capacity.png", "throughput.png", "tpot_vs_concurrency.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
        from PIL import Image

        with Image.open(out / name) as im:
            im.verify()
            assert im.size[0] > 100 and im.size[1] > 100
    assert sorted(os.listdir(out / "runs")) == [f"custom_{N}x{P}+{O}__bf16.json", f"custom_{N}x{P}+{O}__kivi2.json"]
    assert len(os.listdir(out / "logs")) == 2


@pytest.mark.parametrize("source", ["folder", "results.json"])
def test_report_only_merges_output_folders(bench, tmp_path, source):
    out, runs = bench
    cli.main(["--report-only", "--merge", str(out if source == "folder" else out / "results.json"),
              "--out", str(tmp_path)])
    with open(tmp_path / "results.json") as f:
        merged = {r["config"]: r for r in json.load(f)["runs"]}
    assert merged == runs
    assert (tmp_path / "throughput.png").is_file()


def test_resolve_configs():
    runnable, skipped = cli.resolve_configs(["auto", "kivi2", "turboquant"], cpu_build=True)
    assert runnable == [("bf16", None), ("kivi2", {"bits": 2})]
    assert [n for n, _ in skipped] == cli.turboquant_presets() and skipped
    assert all("CPU" in reason for _, reason in skipped)
    runnable, skipped = cli.resolve_configs(["fp8", "turboquant_k8v4"], cpu_build=False)
    assert runnable == [("fp8", "fp8"), ("turboquant_k8v4", "turboquant_k8v4")] and not skipped
    with pytest.raises(ValueError, match="unknown configuration"):
        cli.resolve_configs(["kivi3"], cpu_build=True)


def test_workload_arguments(tmp_path):
    ap = cli.build_parser()
    ws = cli.workloads_from_args(ap.parse_args(["--workloads", "decode", "long", "--num-requests", "8"]))
    assert [(w.name, w.prompt_len, w.output_len, w.num_requests) for w in ws] == [("decode", 1024, 1024, 8),
                                                                                  ("long", 3584, 512, 8)]
    ws = cli.workloads_from_args(ap.parse_args(["--baseline"]))
    assert ws == [WORKLOADS["baseline"]]
    assert (ws[0].prompt_len, ws[0].output_len, ws[0].num_requests) == (1024, 256, 1024)
    with pytest.raises(ValueError, match="--num-requests"):
        cli.workloads_from_args(ap.parse_args(["--prompt-len", "8", "--output-len", "8"]))
    with pytest.raises(SystemExit):
        cli.main(["--workloads", "long", "--max-model-len", "2048", "--out", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()


def test_helpers():
    assert binding_limit(6, 6, 6) == "all requests"
    assert binding_limit(256, 1024, 256) == "max_num_seqs"
    assert binding_limit(107, 512, 512) == "KV cache"
    s = summary([1.0, 2.0, 3.0, 10.0])
    assert s["mean"] == 4.0 and s["p50"] == 2.5 and s["p99"] == pytest.approx(np.percentile([1, 2, 3, 10], 99))
    assert summary([]) == {"mean": None, "p50": None, "p99": None}
    a, b = token_prompts(3, 5, 1000, seed=0), token_prompts(3, 5, 1000, seed=0)
    assert a == b and len(a) == 3 and all(len(x) == 5 and all(100 <= t < 1000 for t in x) for x in a)


def test_baseline_check_ratios():
    """Ratios against bf16 and fp8 of the same run, next to the issue's reference ratio (64.5 / 75.3 s)."""
    def fake(config, seconds):
        w = WORKLOADS["baseline"]
        return dict(status="ok", config=config, workload=dict(name="baseline"), workload_key=w.key, complete=True,
                    workload_label=w.label, settings={}, elapsed_s=seconds,
                    output_tokens_per_s=w.num_requests * w.output_len / seconds)

    runs = [fake("bf16", 10.0), fake("fp8", 8.0), fake("kivi2", 20.0)]
    lines = report.baseline_check(runs)
    assert len(lines) == 3
    assert "time x0.800 of bf16" in lines[1] and f"{64.5 / 75.3:.3f}" in lines[1]
    assert "time x2.000 of bf16" in lines[2] and "time x2.500 of fp8" in lines[2]
    assert "output tok/s x0.500 of bf16" in lines[2]


def test_progress_reader_stops_when_the_run_process_exits_while_a_child_holds_the_pipe():
    """kivi-bench's parent must not block on the progress pipe after the run process exits, even when a process it
    started (an engine core; here a child sleeping 300 s) still holds the pipe's write end. A blocking read would
    wait for that child: the reader runs in a thread that must have finished long before."""
    import signal
    import subprocess
    import sys
    import threading

    from kivi_vllm.bench.cli import _progress_lines

    r_fd, w_fd = os.pipe()
    code = ("import json, os, subprocess, sys; fd = int(sys.argv[1]); os.write(fd, b'{\"a\": 1}\\n'); "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], pass_fds=(fd,)); "
            "os.write(fd, (json.dumps({'child': c.pid}) + '\\n').encode())")
    proc = subprocess.Popen([sys.executable, "-c", code, str(w_fd)], pass_fds=(w_fd,))
    os.close(w_fd)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(_progress_lines(r_fd, proc)), daemon=True)
    reader.start()
    reader.join(60)  # a liveness bound far above the ~1 s it takes, far below the child's 300 s
    events = [json.loads(x) for x in lines]
    for ev in events:
        if "child" in ev:
            os.kill(ev["child"], signal.SIGKILL)
    assert not reader.is_alive(), "the reader still waits on the pipe held by the child"
    assert events[0] == {"a": 1} and "child" in events[1] and proc.poll() == 0
