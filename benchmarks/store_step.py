"""Store (quantize-on-write) time of one decode step on one GPU, by batch state and kernel variant.

    python benchmarks/store_step.py                          # H200: GQA and Llama-2-7B shapes, batch 256
    python benchmarks/store_step.py --num-warps 4 8 --rows-per-program 0 1 4 --shapes gqa

One layer, one pure-decode step (phase 0, one token per request, what CUDA graphs capture): B requests of the
``PageLayout(512, 128, b, b, 32, "kv", bf16)`` cache, each writing its token through
``kivi_vllm.kernels.store.store``. States (positions and slots of the B tokens):

* steady: request r at position ``L - 1 - (r mod 32)``: 1 request in 32 completes its group and quantizes it (a
  running batch; what ``decode_attention.py`` reports as "steady"), the others write one stage row;
* worst: every request completes its group in this step (all quantize);
* heavy: the steady state with only the group-completing rows (the others' slot -1: their programs exit at once);
* light: the steady state with only the stage-writing rows;
* empty: every slot -1 (the launch and the programs' first load);
* one: batch 1, its request completing a group (one quantizing program per KV head, nothing else).

Variants: every pair of ``--num-warps`` and ``--rows-per-program`` (0: ``store()``'s default,
:func:`kivi_vllm.kernels.store.rows_per_program_for`). Timing as ``decode_attention.py`` (median of
``triton.testing.do_bench`` over a CUDA-graph replay of one call). The bytes the first call of each variant writes
into a fresh copy of the cache are compared with the first variant's (``same_bytes``; "DIFFERENT BYTES" in the
table would be a bug).
"""

from __future__ import annotations

import argparse
import functools
import json
import math

import torch
from decode_attention import bench, random_bytes  # this directory's: the same timing and cache bytes

SHAPES = {"gqa": (8, 128), "llama2-7b": (32, 128)}  # KV heads, head size
STATES = ("steady", "worst", "heavy", "light", "empty", "one")
GROUP, BLOCK = 32, 512


def state_inputs(state, B, L, h, d, block_table, device):
    """(key, value, slot, qsl, seq_lens) of one decode step in ``state`` (module docstring)."""
    n = 1 if state == "one" else B
    r = torch.arange(n, device=device)
    pos = torch.full((n,), L - 1, device=device) if state in ("worst", "one") else L - 1 - r % GROUP
    blk = block_table[:n].gather(1, (pos // BLOCK)[:, None]).squeeze(1).to(torch.int64)
    slot = blk * BLOCK + pos % BLOCK
    completes = pos % GROUP == GROUP - 1
    if state == "heavy":
        slot = torch.where(completes, slot, -1)
    elif state == "light":
        slot = torch.where(completes, -1, slot)
    elif state == "empty":
        slot = torch.full_like(slot, -1)
    g = torch.Generator(device=device).manual_seed(n * 7 + h)
    key = torch.randn(n, h, d, device=device, dtype=torch.bfloat16, generator=g)
    value = torch.randn(n, h, d, device=device, dtype=torch.bfloat16, generator=g)
    qsl = torch.arange(n + 1, device=device, dtype=torch.int32)
    return key, value, slot.contiguous(), qsl, (pos + 1).to(torch.int32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--bits", nargs="+", type=int, default=[2])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--context", type=int, default=1024, help="L: positions L - 32 .. L - 1 (L a multiple of 32)")
    ap.add_argument("--num-warps", nargs="+", type=int, default=[4], help="store()'s num_warps")
    ap.add_argument("--rows-per-program", nargs="+", type=int, default=[0],
                    help="store()'s rows_per_program (0: its default)")
    ap.add_argument("--states", nargs="+", default=list(STATES), choices=list(STATES))
    ap.add_argument("--out", default=None, help="JSON of the rows")
    a = ap.parse_args()
    from kivi_vllm.kernels.store import rows_per_program_for, store
    from kivi_vllm.layout import PageLayout

    dev = "cuda"
    print(f"{torch.cuda.get_device_name()}; batch {a.batch}, context {a.context}; µs per store call (graph replay)")
    rows = []
    for shape in a.shapes:
        h, d = SHAPES[shape]
        for bits in a.bits:
            lay = PageLayout(BLOCK, d, bits, bits, GROUP, "kv", torch.bfloat16)
            nblk = math.ceil(a.context / BLOCK)
            block_table = torch.randperm(a.batch * nblk, device=dev).to(torch.int32).view(a.batch, nblk)
            cache0 = random_bytes(a.batch * nblk * h * lay.page_bytes, dev).view(a.batch * nblk, h, lay.page_bytes)
            for state in a.states:
                io = state_inputs(state, a.batch, a.context, h, d, block_table, dev)
                ref = None
                line = f"{shape:>10} KIVI-{bits} {state:>7}:"
                for nw in a.num_warps:
                    for rpp in a.rows_per_program:
                        per = rpp or rows_per_program_for(len(io[2]), h, torch.device(dev))
                        cache = cache0.clone()
                        call = functools.partial(store, cache, *io, lay, 0, num_warps=nw, rows_per_program=per)
                        call()
                        same = True if ref is None else bool(torch.equal(cache, ref))
                        ref = cache.clone() if ref is None else ref
                        ms, _ = bench(call, dev, eager=False)
                        rows.append(dict(shape=shape, bits=bits, state=state, num_warps=nw, rows_per_program=per,
                                         batch=a.batch, context=a.context, store_us=ms * 1e3, same_bytes=same))
                        line += f"  w{nw}r{per} {ms * 1e3:6.1f}{'' if same else ' (DIFFERENT BYTES)'}"
                print(line, flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
