"""On a GPU: the prefill step with ``unpack="bytes"`` and ``unpack="words"`` on the same random-byte cache and inputs
(4 shapes: MHA head 128 KIVI-2 with a cached prefix, GQA 4-bit first chunks, head 64 with 3 query heads per KV
head, head 80 whose words are padded). Prints whether the caches after the step are byte-identical, whether the
outputs are finite, and their relative difference (float32 rounding only: the two unpackings give the same
dequantized values before one rounding).

    python scripts/prefill_unpack_check.py        # H200, 2026-11-30: caches equal, differences <= 2.2e-7
"""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, ROOT)
from prefill_attention import kivi_inputs

from kivi_vllm.kernels import forward
from kivi_vllm.kernels.prefill import block_q_for

CASES = [  # bits, query heads, KV heads, head size, (requests, chunk, cached before the chunk)
    (2, 32, 32, 128, (3, 700, 320)),
    (4, 32, 8, 128, (2, 1000, 0)),
    (2, 12, 4, 64, (3, 333, 96)),
    (2, 8, 8, 80, (2, 200, 64)),
]


def main() -> None:
    for bits, hq, h, D, (B, C, P) in CASES:
        qslh = torch.arange(B + 1, dtype=torch.int32) * C
        bq = block_q_for(hq, h)
        lay, base, bt, slot, tiles = kivi_inputs(bits, B, C, P, h, D, qslh, "cuda", bq)
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(B * C, hq, D, generator=g, device="cuda").bfloat16()
        k = torch.randn(B * C, h, D, generator=g, device="cuda").bfloat16()
        v = torch.randn_like(k)
        qsl, sl = qslh.cuda(), torch.full((B,), P + C, dtype=torch.int32, device="cuda")
        outs = {}
        for u in ("bytes", "words"):
            cache = base.clone()
            out = torch.empty(B * C, hq, D, device="cuda", dtype=torch.float32)
            forward(q, k, v, cache, bt, qsl, sl, slot, lay, D ** -0.5, out, tiles, block_q=bq, prefill_unpack=u)
            outs[u] = (out, cache)
        (ob, cb), (ow, cw) = outs["bytes"], outs["words"]
        print(bits, hq, h, D, B, C, P, "cache equal", torch.equal(cb, cw), "finite", bool(ow.isfinite().all()),
              "max rel diff", ((ow - ob).norm() / ob.norm()).item(), flush=True)


if __name__ == "__main__":
    main()
