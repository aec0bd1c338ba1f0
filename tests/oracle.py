"""Independent float64 oracle for the KIVI cache: the paper's formulas applied to dense tensors, no pages.

It does not import kivi_vllm: it restates the quantizer (KIVI §3.1, scale/min rounded to fp16 as stored) and the
attention visibility rule of docs/design.md on plain [T, H, D] tensors, so a bug in the page layout, the store
or the read path cannot hide in a shared helper.
"""

from __future__ import annotations

import math

import torch


def fake_quant(x: torch.Tensor, bits: int, dim: int, fp16_meta: bool = True) -> torch.Tensor:
    """Quantize-dequantize in float64 along ``dim`` (one group = all elements along dim).

    ``fp16_meta=False`` keeps scale and min in float32 instead of rounding them to fp16 as the cache stores them
    (for simulations that separate the fp16 rounding from the quantization).
    """
    x = x.double()
    qmax = 2**bits - 1
    mn, mx = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    # scale from float32 min/max, as the reference defines it (the float64 route can differ by one fp16 ulp)
    s = (mx.float() - mn.float()) / qmax
    if fp16_meta:
        s, m = s.clamp(-65504, 65504).half().double(), mn.clamp(-65504, 65504).half().double()
    else:
        s, m = s.double(), mn.float().double()
    # codes from (x - min) / scale in float32 as the reference defines it, one float32 reciprocal of the scale per
    # group then a multiply (KIVI computes in fp16; a division per element differs only at exact .5 ties)
    ratio = (x.float() - m.float()) * (1.0 / torch.where(s > 0, s, 1.0).float())
    q = torch.where(s > 0, ratio.clamp(0, qmax).round().double(), torch.zeros_like(x))
    return q * s + m


def dequantized_keys(k: torch.Tensor, bits: int, group: int, fp16_meta: bool = True) -> torch.Tensor:
    """[T, H, D] keys with every complete group of ``group`` tokens fake-quantized per channel."""
    out = k.double().clone()
    for g in range(0, k.shape[0] // group * group, group):
        out[g : g + group] = fake_quant(k[g : g + group], bits, dim=0, fp16_meta=fp16_meta)
    return out


def dequantized_values(v: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """[T, H, D] values fake-quantized per token over channel groups of gcd(group, D)."""
    t, h, d = v.shape
    vg = math.gcd(group, d)
    return fake_quant(v.reshape(t, h, d // vg, vg), bits, dim=-1).reshape(t, h, d)


def attention(q, k, v, *, k_bits, v_bits, group, residual="kv", prefill="streaming", chunk_starts=(0,), scale=None):
    """Float64 causal attention of all T positions of one sequence under the KIVI visibility rule.

    Args:
        q: [T, Hq, D]; k, v: [T, Hkv, D] exact (pre-quantization) tensors.
        chunk_starts: first position of each prefill chunk (only used with prefill="exact").

    Returns:
        [T, Hq, D] float64.
    """
    t, hq, d = q.shape
    hkv = k.shape[1]
    scale = scale or 1 / math.sqrt(d)
    kq, vq = dequantized_keys(k, k_bits, group), dequantized_values(v, v_bits, group)
    ke, ve = k.double(), v.double()
    out = torch.zeros(t, hq, d, dtype=torch.float64)
    starts = sorted(chunk_starts)
    for p in range(t):
        j = torch.arange(p + 1)
        if prefill == "streaming":
            k_quant = (j // group + 1) * group <= p
            v_quant = k_quant if residual == "kv" else j < p
        else:
            c = max(s for s in starts if s <= p)
            k_quant = j < c // group * group
            v_quant = k_quant if residual == "kv" else j < c
        for h in range(hq):
            g = h // (hq // hkv)
            keys = torch.where(k_quant[:, None], kq[: p + 1, g], ke[: p + 1, g])
            vals = torch.where(v_quant[:, None], vq[: p + 1, g], ve[: p + 1, g])
            out[p, h] = torch.softmax(keys @ q[p, h].double() * scale, 0) @ vals
    return out
