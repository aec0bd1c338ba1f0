"""The decode kernels ("fma": CUDA cores, "mma": tensor cores, "tc": tensor cores with register operands, Gluon)
against the float64 reference on one decode batch per shape, at several query heads per KV head. Needs a CUDA device
(the CPU tests cover small shapes of "fma" and "mma"; "tc" has no interpreter run, this is its test).

    python scripts/decode_kernels_check.py                    # the 2026-11-30 H200 runs (shapes of SHAPES)
    python scripts/decode_kernels_check.py --kernels tc --wide  # every shape "tc" supports
    python scripts/decode_kernels_check.py --kernels tc fma --wide --q-scale 8  # sharper attention (logit std ~37)

``--q-scale`` multiplies the queries (the default data already has logits of standard deviation ~4.7: the top
key takes ~42% of a row's weight; 8 gives ~94%; ``benchmarks/tc_rounding.py``), which widens the score ranges and exercises "tc"'s conditional
rescaling; ``--rescale-slack`` and ``--maxnreg`` pass decode()'s options of those names; ``--work-target`` the
decode work list's target (the engine's by default).

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
# --wide: (query heads, KV heads, bits, residual, head size, group size)
WIDE = [(hq, 2, bits, res, d, g) for hq in (2, 4, 8, 16, 32) for bits in ((2, 2), (4, 4), (4, 2), (2, 4))
        for res, d, g in (("kv", 128, 32), ("k", 64, 32))]
WIDE += [(8, 2, (2, 2), "kv", 128, g) for g in (16, 64, 128)] + [(8, 2, (4, 4), "kv", 32, 32)]
# GQA ratios that are not powers of two, 4-bit codes at other group sizes, head 64 at other group sizes
WIDE += [(hq, 2, (2, 2), "kv", 128, 32) for hq in (6, 12, 14)] + [(8, 2, (4, 4), "kv", 128, g) for g in (64, 128)]
WIDE += [(8, 2, (2, 2), "kv", 64, g) for g in (16, 64)]
# head 64 with 4-bit values at group 16: staged by "tc" (decode_tc.STAGES) with more copy lanes than key-code words
WIDE += [(8, 2, (4, 4), "kv", 64, 16), (8, 2, (2, 4), "k", 64, 16)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1043, 2048, 31, 4095, 0, 777],
                    help="context of each request before its one decode token")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--kernels", nargs="+", choices=["fma", "mma", "tc"], default=["fma", "mma", "tc"])
    ap.add_argument("--wide", action="store_true", help="more GQA ratios, bits, head and group sizes (WIDE)")
    ap.add_argument("--q-scale", type=float, default=1.0,
                    help="multiply the queries (sharper attention, wider score ranges: exercises the rescaling)")
    ap.add_argument("--rescale-slack", type=float, default=None, help="tc: decode()'s rescale_slack")
    ap.add_argument("--maxnreg", type=int, default=None, help="fma/tc: decode()'s maxnreg")
    ap.add_argument("--work-target", type=int, default=None,
                    help="fma/tc: a work list (decode.decode_work) in waves of this many programs; default "
                         "decode.wave_programs of the kernel, as the engine runs it; 0: the split grid")
    ap.add_argument("--tc-prefetch", type=int, choices=[0, 1], default=None, help="tc: decode_tc.PREFETCH")
    ap.add_argument("--tc-stages", type=int, default=None, help="tc: decode_tc.STAGES")
    ap.add_argument("--tc-transposed", type=int, choices=[0, 1], default=None, help="tc: decode_tc.TRANSPOSED")
    ap.add_argument("--open-kernel", choices=["light", "dot"], default=None,
                    help="fma/tc: decode.OPEN_KERNEL (the open group's launch)")
    ap.add_argument("--pdl", type=int, choices=[0, 1], default=None,
                    help="fma/tc: decode.PDL (the open group's launch as a programmatic dependent)")
    a = ap.parse_args()
    from kivi_vllm.kernels.decode import set_options

    set_options(a.open_kernel, pdl=a.pdl, prefetch=a.tc_prefetch, stages=a.tc_stages, transposed=a.tc_transposed)
    if DEV != "cuda":
        raise SystemExit("decode_kernels_check.py needs a CUDA device (the CPU tests cover small shapes)")
    from kivi_vllm.kernels.decode import wave_programs
    from kivi_vllm.kernels.decode import tc_supports as supports

    reqs = [(c, 1) for c in a.contexts]
    shapes = WIDE if a.wide else [(*s, 128, 32) for s in SHAPES]
    worst = 0.0
    for hq, hkv, bits, residual, head, group in shapes:
        lay = PageLayout(512, head, *bits, group, residual, torch.bfloat16)
        b = Batch(lay, reqs, hq, hkv, torch.bfloat16, a.seed, out_dtype=torch.float32)
        b.q *= a.q_scale
        ref, _ = b.reference()
        for kernel in a.kernels:
            if kernel == "tc" and supports(lay, hq // hkv):
                print(f"{hq // hkv} {bits} {residual} D={head} G={group} tc: not supported ({supports(lay, hq // hkv)})")
                continue
            target = wave_programs(kernel, torch.device(DEV)) if a.work_target is None else a.work_target
            target = target if kernel != "mma" else None
            out, _ = b.kernels(decode_kernel=kernel, decode_maxnreg=a.maxnreg, decode_rescale_slack=a.rescale_slack,
                               decode_work_target=target or None)
            err = rel_err(out, ref)
            worst = max(worst, err if not out.isnan().any() else float("inf"))
            print(f"{hq // hkv} {bits} {residual} D={head} G={group} {kernel} work {target or '-'} rel err {err:.2e} "
                  f"nan {bool(out.isnan().any())}", flush=True)
    print(f"worst rel err {worst:.2e} ({'ok' if worst < 1e-2 else 'FAIL'}: bound 1e-2)")
    sys.exit(0 if worst < 1e-2 else 1)


if __name__ == "__main__":
    main()
