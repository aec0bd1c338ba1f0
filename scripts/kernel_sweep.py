"""GPU sweep of the KIVI Triton kernels against the PyTorch reference on realistic shapes (run on the H200).

Every case draws fresh random inputs, poisons the output (NaN) and the unwritten cache bytes (random), runs one
engine step through :func:`kivi_vllm.kernels.forward` and through :func:`kivi_vllm.reference.forward` (float64
attention), and checks: every byte of the cache equal (store bit-exact), no NaN in any real output row, relative
error below 1e-2 (bf16). Grid: head sizes 64 and 128; GQA ratios 1, 4, 8; KIVI-2 and KIVI-4; residual kv (and k
on two shapes); group 32; plus 8 shapes with groups 16, 64, 128 and head sizes 80, 96, 256 (decode: the kernel
decode() picks, "tc" where it applies, "fma"/"mma" otherwise; ``--decode-kernel``);
contexts that end exactly at, just before and just after group (32) and block (512) boundaries; per shape three
batches mixing first chunks, continuation chunks and decode tokens, and one of decode tokens only (the pure-decode
step, whose store is a programmatic dependent of the attention on Hopper).

    python scripts/kernel_sweep.py --out docs/measurements/kernel_sweep.json
    python scripts/kernel_sweep.py --prefill exact --flash-first-chunks   # prefill="exact" as the engine runs it
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_kernels import DEV, Batch, rel_err  # noqa: E402

from kivi_vllm.kernels.decode import tc_supports  # noqa: E402
from kivi_vllm.layout import PageLayout  # noqa: E402

EDGES = [31, 32, 33, 511, 512, 513, 1023, 1024, 1025, 2047, 2048, 2049]


def edge_end(rng: random.Random) -> int:
    """A sequence length at a group/block edge (EDGES), or up to 63 tokens after one (a third of the time)."""
    return rng.choice(EDGES) + rng.choice([0, 0, rng.randrange(0, 64)])


def mixed_batch(rng: random.Random, n: int) -> list[tuple[int, int]]:
    """n requests: decode tokens, first chunks and continuation chunks whose ends hit group/block edges."""
    reqs = []
    for _ in range(n):
        kind = rng.choice(["decode", "decode", "first", "continuation"])
        end = edge_end(rng)
        if kind == "decode":
            reqs.append((end - 1, 1))
        elif kind == "first":
            reqs.append((0, end))
        else:
            chunk = rng.choice([2, 31, 32, 33, 100, 600])
            reqs.append((max(0, end - chunk), min(chunk, end)))
    return reqs


def decode_batch(rng: random.Random, n: int) -> list[tuple[int, int]]:
    """n one-token requests whose contexts end at, just before and just after group/block edges: a pure-decode
    step (kernels.forward's CUDA-graph shape, its store a programmatic dependent of the attention on Hopper)."""
    return [(edge_end(rng) - 1, 1) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="kernel_sweep.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=8, help="requests per case")
    ap.add_argument("--prefill-bulk-groups", type=int, default=None, help="prefill's bulk_groups (default: its own)")
    ap.add_argument("--prefill-bulk-dot", choices=["fp32", "16", "f16"], default="fp32", help="prefill's bulk_dot")
    ap.add_argument("--decode-kernel", choices=["fma", "mma", "tc"], default=None,
                    help="decode kernel (default decode()'s default_kernel; 'tc' where decode.tc_supports the shape)")
    ap.add_argument("--first-shape", type=int, default=0, help="skip the grid's shapes before this index")
    ap.add_argument("--prefill", choices=["streaming", "exact"], default="streaming", help="the prefill rule")
    ap.add_argument("--flash-first-chunks", action="store_true",
                    help="with --prefill exact: first chunks through vLLM's FlashAttention, as the engine does")
    a = ap.parse_args()
    if DEV != "cuda":
        raise SystemExit("kernel_sweep.py needs a CUDA device (the CPU tests cover small shapes)")
    if a.flash_first_chunks and a.prefill != "exact":
        raise SystemExit("--flash-first-chunks needs --prefill exact")
    rng = random.Random(a.seed)
    rows, failures = [], 0
    grid = [(*c, "kv", 32) for c in itertools.product([64, 128], [1, 4, 8], [2, 4])]
    grid += [(128, 4, 2, "k", 32), (64, 1, 4, "k", 32)]  # residual "k": values quantized on arrival
    # other group and head sizes; decode() picks each shape's kernel (default_kernel) unless --decode-kernel
    grid += [(128, 1, 2, "kv", 16), (128, 2, 2, "kv", 64), (128, 1, 4, "k", 128), (128, 4, 2, "kv", 128),
             (80, 1, 2, "kv", 16), (96, 2, 4, "k", 32), (256, 1, 2, "kv", 32), (256, 2, 4, "kv", 64)]
    streaming = a.prefill == "streaming"
    t_start = time.time()
    for head, gqa, bits, residual, group in grid[a.first_shape:]:
        hkv = 2
        lay = PageLayout(512, head, bits, bits, group, residual, torch.bfloat16)
        flash, what = None, None
        if a.flash_first_chunks:
            from kivi_vllm.kernels.flash import first_chunk_attention

            flash, what = first_chunk_attention(torch.bfloat16, head)
            if flash is None:
                raise SystemExit(f"--flash-first-chunks: {what}")
        for case in range(4):  # three mixed steps, one pure-decode step
            reqs = mixed_batch(rng, a.batch) if case < 3 else decode_batch(rng, 2 * a.batch)
            seed = rng.randrange(2**31)
            b = Batch(lay, reqs, hkv * gqa, hkv, torch.bfloat16, seed, pad_tokens=2)
            out_ref, cache_ref = b.reference(streaming=streaming, device=DEV)
            kernel = a.decode_kernel
            if kernel == "tc" and tc_supports(lay, gqa):
                kernel = None
            out, cache = b.kernels(prefill_bulk_groups=a.prefill_bulk_groups, prefill_bulk_dot=a.prefill_bulk_dot,
                                   decode_kernel=kernel, streaming=streaming, first_chunk_attention=flash)
            n = b.qsl_host[-1]
            row = dict(head=head, gqa=gqa, bits=bits, residual=residual, group=group, case=case, reqs=reqs,
                       decode_kernel=kernel or "default", prefill=a.prefill,
                       flash_first_chunks=what if flash is not None else None,
                       cache_equal=bool(torch.equal(cache, cache_ref)),
                       nan=bool(out[:n].isnan().any()), rel_err=rel_err(out[:n], out_ref[:n]))
            row["ok"] = row["cache_equal"] and not row["nan"] and row["rel_err"] < 1e-2
            failures += not row["ok"]
            rows.append(row)
            print(f"{'ok  ' if row['ok'] else 'FAIL'} D={head} gqa={gqa} G={group} k{bits}v{bits} residual={residual} "
                  f"decode={kernel or 'default'} "
                  f"case {case}: cache equal {row['cache_equal']}, NaN {row['nan']}, rel err {row['rel_err']:.2e} "
                  f"reqs {reqs}", flush=True)
    summary = dict(cases=len(rows), failures=failures, max_rel_err=max(r["rel_err"] for r in rows),
                   seconds=round(time.time() - t_start, 1), gpu=torch.cuda.get_device_name())
    print("SUMMARY " + json.dumps(summary), flush=True)
    Path(a.out).write_text(json.dumps(dict(summary=summary, rows=rows), indent=1))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
