"""Decode step time at equal concurrency, from a kivi-bench results.json: the median time per output token (ms) of
the decode-only steps (every running request got a token, so no prefill chunk shared the step) whose number of
running requests falls in each bin, per workload and configuration. Answers issue 6's "TPOT at equal concurrency no
worse than bf16", which the per-request TPOT of the table cannot: there each cache runs at its own batch size.

    python benchmarks/tpot_equal_concurrency.py docs/measurements/2026-11-30-h200-kivi-bench-fma/results.json
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


if __name__ == "__main__":
    main()
