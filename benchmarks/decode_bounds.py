"""What bounds the KIVI decode attention of a ``benchmarks/decode_attention.py`` run: bytes, instructions or neither.

For every KIVI cell of the run's JSON it prints the measured time against two floors of the "tc" kernel's group loop:

* bytes: the cell's bytes (packed pages, stage rows, query/key/value/output) at the run's measured copy bandwidth
  (the time of a kernel at 100% of the copy);
* instructions: the loop's SASS per group and warp (compiled offline for sm_90, ``kernel_resources.py``) times the
  step's groups x KV heads x requests (one warp per work item, every complete group once), issued at one warp
  instruction per cycle per scheduler (4 per SM) at ``--sm-clock-mhz`` on ``--sms`` SMs (H200: 132 SMs, 1,980 MHz
  maximum boost, ``nvidia-smi --query-gpu=clocks.max.sm``); at a lower clock the floor is higher.

Then, per shape, batch and cache, the line through its two longest contexts: its intercept at context 0 is the
step's fixed cost (the launches, the work items' prologue and epilogue, the open group and its merge), its slope
the loop's marginal rate, as shares of the copy bandwidth (added bytes / added time) and of the instruction issue
rate (added instructions / added time).

    python benchmarks/decode_bounds.py docs/measurements/2026-12-02-s15-h200-command-6/r/grid-pdl1.json

Nothing here runs on a GPU; the timings are the JSON's (docs/benchmarks.md cites the commands that made them).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from decode_attention import GROUP, SHAPES  # the run's group size and shapes (query heads, KV heads, head size)


@functools.cache
def loop_sass(bits: int, qpk: int, head_size: int) -> int:
    """SASS instructions per warp and group of the "tc" loop (sm_90 offline compile, ``kernel_resources.py``)."""
    import kernel_resources

    return kernel_resources.resources(bits, qpk, "tc", 1, group_size=GROUP, head_size=head_size)["loops"][0][
        "instructions"]


def bounds(run: dict, sms: int, clock_mhz: float) -> tuple[list[dict], list[dict]]:
    """Per KIVI cell of ``run`` (a decode_attention.py JSON): time, floors (µs), shares; and per (shape, batch,
    config) with two contexts or more: fixed cost (µs) and the marginal shares of the two longest contexts.

    Raises:
        ValueError: a cell of a shape this script does not know.
    """
    copy = run["copy_gbps"] * 1e3  # bytes per µs
    issue = sms * 4 * clock_mhz  # warp instructions per µs
    rows = [r for r in run["rows"] if r["config"] in ("kivi2", "kivi4") and r.get("status") == "ok"]
    cells, lines = [], []
    for r in rows:
        if r["shape"] not in SHAPES:
            raise ValueError(f"decode_bounds: unknown shape {r['shape']!r}")
        hq, h, d = SHAPES[r["shape"]]
        bits = 2 if r["config"] == "kivi2" else 4
        groups = r["batch"] * h * ((r["context"] - 1) // GROUP)  # every request at this context
        inst_us = groups * loop_sass(bits, hq // h, d) / issue
        bytes_us = r["bytes"] / copy
        t = r["time_us"]
        cells.append(dict(shape=r["shape"], batch=r["batch"], context=r["context"], config=r["config"], time_us=t,
                          bytes_us=bytes_us, inst_us=inst_us, pct_copy=bytes_us / t, pct_issue=inst_us / t))
    for key in dict.fromkeys((c["shape"], c["batch"], c["config"]) for c in cells):
        same = sorted((c for c in cells if (c["shape"], c["batch"], c["config"]) == key), key=lambda c: c["context"])
        if len(same) < 2:
            continue
        a, b = same[-2], same[-1]
        dt = b["time_us"] - a["time_us"]
        fixed = a["time_us"] - dt * a["context"] / (b["context"] - a["context"])
        lines.append(dict(shape=key[0], batch=key[1], config=key[2], contexts=(a["context"], b["context"]),
                          fixed_us=fixed, marginal_pct_copy=(b["bytes_us"] - a["bytes_us"]) / dt,
                          marginal_pct_issue=(b["inst_us"] - a["inst_us"]) / dt))
    return cells, lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="decode_attention.py JSON files")
    ap.add_argument("--sms", type=int, default=132, help="SMs of the GPU (H200: 132)")
    ap.add_argument("--sm-clock-mhz", type=float, default=1980.0, help="SM clock for the instruction floor "
                    "(H200 maximum boost: 1,980 MHz)")
    a = ap.parse_args()
    for path in a.runs:
        with open(path) as f:
            run = json.load(f)
        cells, lines = bounds(run, a.sms, a.sm_clock_mhz)
        print(f"{path}: copy {run['copy_gbps']:.0f} GB/s, issue {a.sms} SMs x 4 x {a.sm_clock_mhz:.0f} MHz")
        print(f"{'shape':<10}{'batch':>6}{'ctx':>7}{'config':>7}{'time us':>10}{'bytes us':>10}{'inst us':>9}"
              f"{'% copy':>8}{'% issue':>9}")
        for b in cells:
            print(f"{b['shape']:<10}{b['batch']:>6}{b['context']:>7}{b['config']:>7}{b['time_us']:>10.1f}"
                  f"{b['bytes_us']:>10.1f}{b['inst_us']:>9.1f}{100 * b['pct_copy']:>7.1f}%{100 * b['pct_issue']:>8.1f}%")
        print(f"{'shape':<10}{'batch':>6}{'config':>7}{'contexts':>14}{'fixed us':>10}{'marginal % copy':>17}"
              f"{'marginal % issue':>18}")
        for x in lines:
            print(f"{x['shape']:<10}{x['batch']:>6}{x['config']:>7}{'-'.join(map(str, x['contexts'])):>14}{x['fixed_us']:>10.1f}"
                  f"{100 * x['marginal_pct_copy']:>16.1f}%{100 * x['marginal_pct_issue']:>17.1f}%")


if __name__ == "__main__":
    main()
