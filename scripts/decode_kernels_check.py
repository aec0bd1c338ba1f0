"""Both decode kernels ("fma": CUDA cores, "mma": tensor cores) against the float64 reference on one decode batch
per shape, at several query heads per KV head. Needs a CUDA device (the CPU tests cover small shapes).

    python scripts/decode_kernels_check.py        # the 2026-11-30 H200 run

Prints one line per (shape, kernel): relative error of the attention output against
``kivi_vllm.reference.forward`` (float32 outputs) and whether any output is NaN.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_kernels import DEV, Batch, rel_err  # noqa: E402

from kivi_vllm.layout import PageLayout  # noqa: E402

# (query heads, KV heads, (k_bits, v_bits), residual)
SHAPES = [(8, 2, (2, 2), "kv"), (8, 2, (4, 2), "k"), (4, 2, (2, 2), "kv"), (16, 2, (2, 2), "kv")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1043, 2048, 31, 4095, 0, 777],
                    help="context of each request before its one decode token")
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    if DEV != "cuda":
        raise SystemExit("decode_kernels_check.py needs a CUDA device (the CPU tests cover small shapes)")
    reqs = [(c, 1) for c in a.contexts]
    for hq, hkv, bits, residual in SHAPES:
        lay = PageLayout(512, 128, *bits, 32, residual, torch.bfloat16)
        b = Batch(lay, reqs, hq, hkv, torch.bfloat16, a.seed, out_dtype=torch.float32)
        ref, _ = b.reference()
        for kernel in ("fma", "mma"):
            out, _ = b.kernels(decode_kernel=kernel)
            print(f"{hq // hkv} {bits} {residual} {kernel} rel err {rel_err(out, ref):.2e} "
                  f"nan {bool(out.isnan().any())}", flush=True)


if __name__ == "__main__":
    main()
