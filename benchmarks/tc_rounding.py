"""Which rounding bounds the "tc" decode kernel's accuracy: an emulation of its numerics on the CPU.

The "tc" kernel (``kivi_vllm/kernels/decode_tc.py``) rounds three things to fp16 that the float64 reference keeps
exact: each dequantized key ``(c / 2**b) * (2**b s) + m`` (one rounding, HFMA2), each probability
``exp2(s - max)`` before ``P . V``, and each dequantized value. The query enters as the model gave it (a bf16 query
is exact in fp16) and the softmax scale multiplies the float32 scores; the former kernel (until the seventh
session) folded the scale and log2(e) into the query first, a fourth rounding, kept here as a variant. Its MMAs
accumulate in float32, emulated here as exact (float64). This script recomputes one decode step of a KV head (``--tokens`` keys, ``--qpk``
query heads, keys per channel over groups of 32 tokens and values per token over groups of 32 channels with
:mod:`kivi_vllm.quant`) with each rounding switched off in turn, and, for scale, FlashAttention's roundings on a
bf16 cache holding the same keys and values (query, keys, values and probabilities in bf16, float32 accumulation:
what vLLM's own bf16 attention does), and prints the relative error against the float64 attention over the
dequantized cache (max abs error / max abs reference, the measure of ``scripts/decode_kernels_check.py``). Data as
in ``tests/test_kernels.py``: ``randn x (0.5 + 3 u)`` per channel, queries times ``--q-scales`` (1 already gives
logits of standard deviation about 5).

    python benchmarks/tc_rounding.py                    # q-scales 1 4 8, bits 2 and 4, 4 seeds
"""

from __future__ import annotations

import argparse
import math

import torch

from kivi_vllm.quant import dequantize, quantize

#: name -> (query: "fp16" as the model gave it, "scaled" times the softmax scale then fp16, or "exact"; then whether
#: the keys, the probabilities and the values are rounded to fp16); "bf16": FlashAttention's roundings
VARIANTS = {
    "tc": ("fp16", 1, 1, 1),
    "former tc (query x scale in fp16)": ("scaled", 1, 1, 1),
    "keys exact": ("fp16", 0, 1, 1),
    "P exact": ("fp16", 1, 0, 1),
    "values exact": ("fp16", 1, 1, 0),
    "bf16 attention (FlashAttention)": "bf16",
}


def f16(x: torch.Tensor) -> torch.Tensor:
    """Round to fp16 and back to float64."""
    return x.to(torch.float16).to(torch.float64)


def bf16(x: torch.Tensor) -> torch.Tensor:
    """Round to bf16 and back to float64."""
    return x.to(torch.bfloat16).to(torch.float64)


def draw(q_scale: float, seed: int, tokens: int, qpk: int, head: int = 128) -> tuple[torch.Tensor, ...]:
    """Query [qpk, head] (bf16 values, times ``q_scale``), keys and values [tokens, head], float64, as
    ``tests/test_kernels.py`` draws them: ``randn x (0.5 + 3 u)`` with one magnitude per channel."""
    g = torch.Generator().manual_seed(seed)

    def rnd(t: int) -> torch.Tensor:
        return torch.randn(t, head, generator=g, dtype=torch.float64) * (
            0.5 + 3 * torch.rand(head, generator=g, dtype=torch.float64))

    q = (rnd(qpk) * q_scale).to(torch.bfloat16).to(torch.float64)  # the model's query is bf16
    return q, rnd(tokens), rnd(tokens)


def sharpness(q_scale: float, seed: int, tokens: int, qpk: int, head: int = 128) -> tuple[float, float]:
    """(standard deviation of the logits ``q.k / sqrt(head)``, mean weight of each row's top key) of :func:`draw`."""
    q, k, _ = draw(q_scale, seed, tokens, qpk, head)
    s = q @ k.T / math.sqrt(head)
    return s.std().item(), s.softmax(1).amax(1).mean().item()


def one_step(q_scale: float, bits: int, seed: int, tokens: int, qpk: int, head: int = 128, group: int = 32) -> dict:
    """Relative error of each variant of :data:`VARIANTS` for one random KV head (float64 throughout)."""
    q, k, v = draw(q_scale, seed, tokens, qpk, head)
    kc, ks, km = quantize(k.view(-1, group, head), bits, dim=1)  # per channel over 32 tokens
    vc, vs, vm = quantize(v.view(tokens, -1, group), bits, dim=2)  # per token over 32 channels
    kd = dequantize(kc, ks, km).double().view(tokens, head)
    vd = dequantize(vc, vs, vm).double().view(tokens, head)
    ref = torch.softmax(q @ kd.T / math.sqrt(head), 1) @ vd
    lg2 = 1 / (math.sqrt(head) * math.log(2))  # the kernel's scores are in log2 units
    n = 1 << bits
    k16 = f16((kc.double() / n) * (n * ks.double()) + km.double()).view(tokens, head)
    v16 = f16((vc.double() / n) * (n * vs.double()) + vm.double()).view(tokens, head)
    out = {}
    for name, rounding in VARIANTS.items():
        if rounding == "bf16":  # FlashAttention on a bf16 cache: scores from bf16 q and k, P and V in bf16
            s = bf16(q) @ bf16(kd).T * (lg2 * math.log(2))
            p = torch.exp(s - s.max(1, keepdim=True).values)
            o = bf16(p) @ bf16(vd) / p.sum(1, keepdim=True)
            out[name] = ((o - ref).abs().max() / ref.abs().max()).item()
            continue
        rq, rk, rp, rv = rounding
        qq = {"fp16": f16(q) * lg2, "scaled": f16(q * lg2), "exact": q * lg2}[rq]
        s = qq @ (k16 if rk else kd).T
        p = torch.exp2(s - s.max(1, keepdim=True).values)
        o = (f16(p) if rp else p) @ (v16 if rv else vd) / p.sum(1, keepdim=True)  # l sums the float32 P
        out[name] = ((o - ref).abs().max() / ref.abs().max()).item()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--q-scales", type=float, nargs="+", default=[1, 4, 8])
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--qpk", type=int, default=16, help="query heads per KV head")
    a = ap.parse_args()
    print("| q-scale | bits | " + " | ".join(VARIANTS) + " |")
    print("|---:|---:|" + "---:|" * len(VARIANTS))
    for qs in a.q_scales:
        for bits in a.bits:
            worst = dict.fromkeys(VARIANTS, 0.0)
            for seed in range(a.seeds):
                for name, err in one_step(qs, bits, seed, a.tokens, a.qpk).items():
                    worst[name] = max(worst[name], err)
            print(f"| {qs:g} | {bits} | " + " | ".join(f"{worst[n]:.2e}" for n in VARIANTS) + " |", flush=True)
    print("\n| q-scale | logit standard deviation | mean weight of a row's top key |\n|---:|---:|---:|")
    for qs in a.q_scales:
        st = [sharpness(qs, seed, a.tokens, a.qpk) for seed in range(a.seeds)]
        print(f"| {qs:g} | {sum(x for x, _ in st) / len(st):.1f} | {sum(y for _, y in st) / len(st):.0%} |")


if __name__ == "__main__":
    main()
