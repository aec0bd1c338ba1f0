"""Reference KIVI quantizer in PyTorch: the ground truth every kernel must reproduce.

Asymmetric min/max quantization (KIVI paper §3.1; official implementation ``quant/new_pack.py``,
``triton_quantize_and_pack_along_last_dim``):

    min   = min(group)                     stored as fp16
    scale = (max(group) - min) / (2^bits - 1)   stored as fp16
    code  = round(clamp((x - min) / scale, 0, 2^bits - 1))     round half to even, like torch.round
    x'    = code * scale + min

Choices where the paper leaves room, fixed here so kernels can be bit-exact:

* min and max are taken in float32; scale is computed in float32 from them, then both are rounded to fp16
  (saturating at +-65504). Codes are computed in float32 from the *stored* fp16 min and scale, so dequantization
  uses exactly the numbers the codes were fitted to.
* A constant group (max == min) has scale 0; its codes are 0 (never 0/0) and it dequantizes to min exactly
  (exact whenever the value is representable in fp16, e.g. any bf16 value of magnitude 6.1e-5 to 65504).

Keys are quantized per channel over groups of G tokens; values per token over groups of Gv channels.
"""

from __future__ import annotations

import torch

_FP16_MAX = 65504.0


def _round_fp16(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)


def quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` in groups that span dimension ``dim``.

    Args:
        x: float tensor (fp16, bf16, fp32 or fp64) of any shape.
        bits: 2 or 4.
        dim: the dimension reduced by min/max (one group = all elements along ``dim`` with the other indices fixed).

    Returns:
        (codes, scale, min): codes uint8 with x's shape, values in [0, 2^bits - 1]; scale and min fp16 with
        ``dim`` kept as size 1.

    Raises:
        ValueError: bits not in (2, 4).
    """
    if bits not in (2, 4):
        raise ValueError(f"bits must be 2 or 4, got {bits}")
    qmax = (1 << bits) - 1
    xf = x.float()
    mn32 = xf.amin(dim, keepdim=True)
    mx32 = xf.amax(dim, keepdim=True)
    mn = _round_fp16(mn32)
    scale = _round_fp16((mx32 - mn32) / qmax)
    s32 = scale.float()
    # one IEEE reciprocal per group, then a multiply per element (as the store kernel does: a division per element
    # was a quarter of its instructions); 0 for a constant group, whose codes are then 0
    rcp = torch.where(s32 > 0, 1.0 / torch.where(s32 > 0, s32, torch.ones_like(s32)), torch.zeros_like(s32))
    q = ((xf - mn.float()) * rcp).clamp(0, qmax).round()
    return q.to(torch.uint8), scale, mn


def dequantize(codes: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """``codes * scale + min`` in float32 (scale and min broadcast against codes)."""
    return codes.float() * scale.float() + mn.float()


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes along the last dimension, ``8 // bits`` per byte, lowest bits first.

    Element c goes to byte ``c // (8 // bits)`` at bit offset ``(c % (8 // bits)) * bits`` (KIVI's order).

    Args:
        codes: uint8 [..., N], values < 2^bits; N a multiple of 8 // bits.
        bits: 2 or 4.

    Returns:
        uint8 [..., N * bits / 8].
    """
    per_byte = 8 // bits
    c = codes.to(torch.uint8).unflatten(-1, (-1, per_byte))
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (c << shifts).sum(-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 [..., M] -> uint8 codes [..., M * 8 / bits]."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    return ((packed.unsqueeze(-1) >> shifts) & mask).flatten(-2)


def quantize_keys(k: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel key quantization of whole groups (KIVI §3.2: keys grouped along tokens).

    Args:
        k: [..., G, D] one group of G tokens per leading index.

    Returns:
        (packed [..., G, D*bits/8] uint8, scale [..., D] fp16, min [..., D] fp16).
    """
    codes, scale, mn = quantize(k, bits, dim=-2)
    return pack(codes, bits), scale.squeeze(-2), mn.squeeze(-2)


def quantize_values(v: torch.Tensor, bits: int, v_group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token value quantization over groups of ``v_group_size`` channels (KIVI §3.2).

    Args:
        v: [..., D] with D a multiple of ``v_group_size``.

    Returns:
        (packed [..., D*bits/8] uint8, scale [..., D/Gv] fp16, min [..., D/Gv] fp16).
    """
    codes, scale, mn = quantize(v.unflatten(-1, (-1, v_group_size)), bits, dim=-1)
    return pack(codes.flatten(-2), bits), scale.squeeze(-1), mn.squeeze(-1)


def dequantize_keys(packed: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., G, D*bits/8], [..., D], [..., D] -> float32 keys [..., G, D]."""
    return dequantize(unpack(packed, bits), scale.unsqueeze(-2), mn.unsqueeze(-2))


def dequantize_values(packed: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., D*bits/8], [..., D/Gv], [..., D/Gv] -> float32 values [..., D]."""
    codes = unpack(packed, bits).unflatten(-1, (scale.shape[-1], -1))
    return dequantize(codes, scale.unsqueeze(-1), mn.unsqueeze(-1)).flatten(-2)
