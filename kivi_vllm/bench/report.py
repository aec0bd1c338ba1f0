"""Merge the run files of a ``kivi-bench`` output folder into ``results.json``, a Markdown table and PNG plots.

An output folder holds one file per (workload, configuration) in ``runs/`` (written by the run's subprocess, or by
``kivi-bench`` itself for a skipped or failed configuration). Every invocation rebuilds the report from all run files
in the folder, so several invocations with different ``--configs``/``--workloads`` (or run files copied in with
``--merge``) build one table. Ratios compare runs of the same workload whose engine settings match.
"""

from __future__ import annotations

import datetime
import glob
import json
import os

#: Table order of known configurations; others follow in name order.
CONFIG_ORDER = ["bf16", "fp8", "fp8_e5m2", "kivi4", "kivi2"]
#: The issue's reference run (Llama-2-7B shape, dummy weights, one H200, 1024 requests x (1024 + 256) tokens).
ISSUE_BASELINE = {"bf16_s": 75.3, "fp8_s": 64.5, "bf16_output_tokens_per_s": 3480.0}
#: Settings that must match for two runs of a workload to be compared.
COMPARABLE_SETTINGS = ("model", "load_format", "max_model_len", "gpu_memory_utilization", "seed",
                       "max_num_batched_tokens", "max_num_seqs")


def run_file(out_dir: str, workload_key: str, config: str) -> str:
    """Path of one run's JSON file in an output folder."""
    return os.path.join(out_dir, "runs", f"{workload_key}__{config}.json")


def load_runs(out_dir: str) -> list[dict]:
    """Every run file of ``out_dir/runs`` (sorted by workload, then configuration order)."""
    runs = []
    for path in sorted(glob.glob(os.path.join(out_dir, "runs", "*.json"))):
        with open(path) as f:
            runs.append(json.load(f))
    return sorted(runs, key=_order)


def _order(run: dict) -> tuple:
    from .run import WORKLOADS

    names = list(WORKLOADS)
    w = run["workload"]
    c = run["config"]
    return (names.index(w["name"]) if w["name"] in names else len(names), w["name"], run["workload_key"],
            CONFIG_ORDER.index(c) if c in CONFIG_ORDER else len(CONFIG_ORDER), c)


def _settings(run: dict) -> tuple:
    s = run.get("settings", {})
    return tuple(s.get(k) for k in COMPARABLE_SETTINGS) + (run.get("platform", {}).get("device"),)


def reference(runs: list[dict], run: dict, config: str) -> dict | None:
    """The successful run of ``config`` on the same workload with the same engine settings as ``run``, if any."""
    for r in runs:
        if (r["config"] == config and r["status"] == "ok" and r["workload_key"] == run["workload_key"]
                and _settings(r) == _settings(run)):
            return r
    return None


def ratio(runs: list[dict], run: dict, config: str, field: str) -> float | None:
    """``run[field] / reference[field]`` against ``config`` on the same workload and settings (None if absent)."""
    ref = reference(runs, run, config)
    if ref is None or run.get("status") != "ok" or not ref.get(field):
        return None
    return run[field] / ref[field]


def _fmt(x, spec: str = ",.0f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def _x(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _triple(s: dict, scale: float, spec: str) -> str:
    if s.get("mean") is None:
        return "-"
    return " / ".join(format(s[k] * scale, spec) for k in ("mean", "p50", "p99"))


COLUMNS = 17


def table(runs: list[dict]) -> str:
    """Markdown table of every run: capacity, concurrency and what bound it, throughput with ratios against bf16
    and fp8 of the same workload, TPOT (ms) and TTFT (s) as mean / p50 / p99, peak GPU memory."""
    head = ("| workload | config | KV tokens | x bf16 | fit at P+O | max running | bound | preempt. | req/s | "
            "out tok/s | x bf16 | x fp8 | total tok/s | TPOT ms mean/p50/p99 | TTFT s mean/p50/p99 | "
            "peak GPU GiB | run s |")
    lines = [head, "|" + "---|" * 2 + "---:|" * (COLUMNS - 2)]
    for r in runs:
        if r["status"] != "ok":
            lines.append(f"| {r['workload_label']} | {r['config']} | {r['status']}: {r.get('reason', '')} |"
                         + " |" * (COLUMNS - 3))
            continue
        run_s = f"{r['elapsed_s']:.1f}" + ("" if r["complete"] else " (truncated)")
        lines.append(
            f"| {r['workload_label']} | {r['config']} | {r['kv_capacity_tokens']:,} | "
            f"{_x(ratio(runs, r, 'bf16', 'kv_capacity_tokens'))} | {r['requests_fit_full_length']:,} | "
            f"{r['max_running']:,} | {r['bound']} | {r['preemptions']:,} | {r['requests_per_s']:.2f} | "
            f"{r['output_tokens_per_s']:,.0f} | {_x(ratio(runs, r, 'bf16', 'output_tokens_per_s'))} | "
            f"{_x(ratio(runs, r, 'fp8', 'output_tokens_per_s'))} | {r['total_tokens_per_s']:,.0f} | "
            f"{_triple(r['tpot_s'], 1e3, '.1f')} | {_triple(r['ttft_s'], 1, '.2f')} | "
            f"{_fmt(r.get('peak_gpu_memory_gib'), '.1f')} | {run_s} |")
    notes = []
    seen: dict[str, tuple] = {}
    for r in runs:
        first = seen.setdefault(r["workload_key"], _settings(r))
        if first != _settings(r) and r["status"] == "ok":
            notes.append(f"* {r['workload_label']} / {r['config']}: engine settings differ from the first run of "
                         "this workload; no ratios against runs with other settings.")
    return "\n".join(lines + ([""] + notes if notes else []))


def baseline_check(runs: list[dict]) -> list[str]:
    """Lines comparing the ``baseline`` workload's runs with the issue's reference figures (H200: bf16 75.3 s,
    3,480 output tokens/s; fp8 64.5 s). Ratios within one run are what to compare; absolute figures move with the
    machine."""
    lines = []
    ref = ISSUE_BASELINE
    for r in runs:
        if r["workload"]["name"] != "baseline" or r["status"] != "ok":
            continue
        vs = []
        for base in ("bf16", "fp8"):
            b = reference(runs, r, base)
            if b is not None and b is not r:
                vs.append(f"time x{r['elapsed_s'] / b['elapsed_s']:.3f} of {base}, "
                          f"output tok/s x{r['output_tokens_per_s'] / b['output_tokens_per_s']:.3f} of {base}")
        issue = ""
        if r["config"] == "fp8":
            issue = f"; the issue's fp8/bf16 time ratio: {ref['fp8_s'] / ref['bf16_s']:.3f}"
        if r["config"] == "bf16":
            issue = (f"; the issue's bf16 on an H200: {ref['bf16_s']} s, {ref['bf16_output_tokens_per_s']:,.0f} "
                     f"output tok/s (this run: x{r['output_tokens_per_s'] / ref['bf16_output_tokens_per_s']:.2f})")
        lines.append(f"baseline {r['config']}: {r['elapsed_s']:.1f} s, {r['output_tokens_per_s']:,.0f} output tok/s"
                     + (", " + "; ".join(vs) if vs else "") + issue
                     + ("" if r["complete"] else " (truncated by --time-limit)"))
    return lines


def write_report(out_dir: str, runs: list[dict] | None = None) -> dict:
    """Write ``results.json`` (every run, full detail), ``results.md`` (the table and the baseline check) and the
    plots into ``out_dir``.

    Returns:
        ``{"results": path, "table": path, "plots": [paths], "plots_skipped": reason or None, "text": table}``.
    """
    runs = load_runs(out_dir) if runs is None else runs
    meta = dict(written=datetime.datetime.now().isoformat(timespec="seconds"), runs=len(runs))
    results = os.path.join(out_dir, "results.json")
    with open(results, "w") as f:
        json.dump(dict(meta=meta, runs=runs), f, indent=1)
    text = table(runs)
    check = baseline_check(runs)
    md = os.path.join(out_dir, "results.md")
    with open(md, "w") as f:
        f.write(text + "\n" + ("\n" + "\n".join(check) + "\n" if check else ""))
    plots, skipped = [], None
    try:
        plots = write_plots(out_dir, runs)
    except ImportError as e:
        skipped = f"matplotlib is not installed ({e}); scripts/install.sh installs it"
    return dict(results=results, table=md, plots=plots, plots_skipped=skipped, text=text, baseline=check)


def _colors(configs: list[str]) -> dict[str, object]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {c: cmap(i % 10) for i, c in enumerate(configs)}


def write_plots(out_dir: str, runs: list[dict]) -> list[str]:
    """``capacity.png`` (KV tokens per configuration), ``throughput.png`` (output tokens/s per configuration and
    workload) and ``tpot_vs_concurrency.png`` (vLLM's inter-token latency averaged over a step's requests, against
    the number of requests that got a token in that step, one point per recorded step). Only successful runs are
    drawn.

    Raises:
        ImportError: matplotlib is missing.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in runs if r["status"] == "ok"]
    if not ok:
        return []
    workloads = list(dict.fromkeys(r["workload_key"] for r in ok))
    labels = {r["workload_key"]: r["workload_label"] for r in ok}
    configs = list(dict.fromkeys(r["config"] for r in ok))
    colors = _colors(configs)
    by = {(r["workload_key"], r["config"]): r for r in ok}
    paths = []

    def bars(field: str, ylabel: str, title: str, name: str, ratio_field: str) -> None:
        fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(configs) * len(workloads)), 4.5))
        width = 0.8 / len(workloads)
        for j, w in enumerate(workloads):
            for i, c in enumerate(configs):
                r = by.get((w, c))
                if r is None:
                    continue
                x = i + (j - (len(workloads) - 1) / 2) * width
                ax.bar(x, r[field], width * 0.95, color=colors[c], alpha=1 - 0.5 * j / max(1, len(workloads)))
                rel = ratio(runs, r, "bf16", ratio_field)
                ax.annotate(f"{r[field]:,.0f}" + (f"\n{rel:.2f}x bf16" if rel is not None and c != "bf16" else ""),
                            (x, r[field]), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(configs)), configs)
        ax.set_ylabel(ylabel)
        ax.set_title(title + ("" if len(workloads) == 1 else "\nbars left to right: "
                              + ", ".join(labels[w] for w in workloads)), fontsize=9)
        ax.margins(y=0.2)
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)

    device = ok[0].get("platform", {}).get("device", "")
    model = os.path.basename(os.path.normpath(ok[0]["settings"]["model"]))
    bars("kv_capacity_tokens", "KV-cache capacity (tokens)", f"KV capacity, {model}, {device}", "capacity.png",
         "kv_capacity_tokens")
    bars("output_tokens_per_s", "output tokens / s", f"Throughput, {model}, {device}", "throughput.png",
         "output_tokens_per_s")

    cols = min(3, len(workloads))
    rows = -(-len(workloads) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    for k, w in enumerate(workloads):
        ax = axes[k // cols][k % cols]
        ys: list[float] = []
        for c in configs:
            r = by.get((w, c))
            if r is None:
                continue
            pts = [(n, itl * 1e3) for n, itl in zip(r["steps"]["generation_tokens"], r["steps"]["itl_s"])
                   if n and itl is not None]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=4, color=colors[c], label=c, alpha=0.6)
                ys.extend(p[1] for p in pts)
        ax.set_title(labels[w], fontsize=9)
        ax.set_xlabel("requests given a token in the step")
        ax.set_ylabel("time per output token in the step (ms)")
        if ys and max(ys) > 10 * min(ys):
            ax.set_yscale("log")
        ax.legend(fontsize=7, markerscale=3)
    for k in range(len(workloads), rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle(f"TPOT vs concurrency, {model}, {device}", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, "tpot_vs_concurrency.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
    return paths
