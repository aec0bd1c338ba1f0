"""Decode step time at equal concurrency, from a kivi-bench results.json: the median time per output token (ms) of
the decode-only steps (every running request got a token, so no prefill chunk shared the step) whose number of
running requests falls in each bin, per workload and configuration. Answers issue 6's "TPOT at equal concurrency no
worse than bf16", which the per-request TPOT of the table cannot: there each cache runs at its own batch size.
Then, per run whose step trace is complete, how the wall time splits between steps in which some running request
got no token (a prompt chunk that does not finish the prompt shared the step: on `long`, with vLLM's 16,384-token
budget, steps full of prefill; a heuristic, since a prompt's last chunk is invisible in the trace and on other
workloads such steps can be light) and the others (decode, possibly with prompts' last chunks), seconds from one
step's timestamp to the next: where a cache loses time.

    python benchmarks/tpot_equal_concurrency.py docs/measurements/2026-11-30-h200-kivi-bench-all/results.json
    python benchmarks/tpot_equal_concurrency.py results.json --bins 20-24 55-63 200-219
"""

from __future__ import annotations

import argparse
import json
import statistics


def decode_only_steps(run: dict) -> list[tuple[int, float]]:
    """(requests given a token, step time in seconds) of the run's decode-only steps, from kivi-bench's per-step
    trace (``run["steps"]``: lists ``running``, ``generation_tokens``, ``itl_s``)."""
    s = run["steps"]
    return [(n, t) for n, r, t in zip(s["generation_tokens"], s["running"], s["itl_s"]) if t is not None and n == r > 0]


def time_split(run: dict) -> dict | None:
    """Seconds of the run in steps where a running request got no token (an unfinished prompt chunk ran: "partial
    prefill") and in the other steps (a step's time: from its timestamp ``t_s`` to the next one's), their counts
    and median step time in ms; None when kivi-bench kept only every k-th step of a long trace (``steps_recorded``
    above the trace's length: the gaps then span several steps)."""
    s = run["steps"]
    if run.get("steps_recorded", len(s["t_s"])) != len(s["t_s"]):
        return None
    split: dict[str, list[float]] = {"other": [], "partial prefill": []}
    for i in range(1, len(s["t_s"])):
        kind = "partial prefill" if s["generation_tokens"][i] < s["running"][i] else "other"
        split[kind].append(s["t_s"][i] - s["t_s"][i - 1])
    return {k: dict(steps=len(v), seconds=round(sum(v), 1),
                    median_ms=round(1000 * statistics.median(v), 1) if v else None) for k, v in split.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="results.json written by kivi-bench")
    ap.add_argument("--bins", nargs="+", default=["20-24", "55-63", "100-120", "200-219", "400-436"],
                    help="ranges of running requests, LO-HI inclusive")
    a = ap.parse_args()
    with open(a.results) as f:
        runs = json.load(f)["runs"]
    workloads = list(dict.fromkeys(r["workload"]["name"] for r in runs))
    for w in workloads:
        per_config = {r["config"]: decode_only_steps(r) for r in runs if r["workload"]["name"] == w}
        for b in a.bins:
            lo, hi = (int(x) for x in b.split("-"))
            cells = []
            for config, steps in per_config.items():
                times = [t for n, t in steps if lo <= n <= hi]
                cells.append(f"{config} {1000 * statistics.median(times):.1f} ms ({len(times)} steps)" if times
                             else f"{config} -")
            print(f"{w}, {lo}-{hi} running: " + "; ".join(cells))
    for r in runs:
        split = time_split(r)
        print(f"{r['workload']['name']} / {r['config']}, {r['elapsed_s']:.1f} s: " + (
            "; ".join(f"{k} steps {v['steps']}, {v['seconds']} s, median {v['median_ms']} ms" for k, v in split.items())
            if split else "trace strided (kivi-bench kept every k-th step), no split"))


if __name__ == "__main__":
    main()
