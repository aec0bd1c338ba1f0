"""Reference quantizer against the KIVI formulas computed independently in float64 (paper §3.1)."""

import zlib

import pytest
import torch

from kivi_vllm.quant import (dequantize, dequantize_keys, dequantize_values, pack, quantize, quantize_keys,
                             quantize_values, unpack)


def formula64(x: torch.Tensor, bits: int, dim: int, scale16=None, mn16=None):
    """KIVI's asymmetric quantizer in float64, with scale and min rounded to fp16 as stored (or given)."""
    x = x.double()
    qmax = 2**bits - 1
    mn = x.amin(dim, keepdim=True)
    mx = x.amax(dim, keepdim=True)
    if scale16 is None:
        scale16 = ((mx - mn) / qmax).clamp(-65504, 65504).half().double()
        mn16 = mn.clamp(-65504, 65504).half().double()
    ratio = torch.where(scale16 > 0, (x - mn16) / torch.where(scale16 > 0, scale16, 1.0), torch.zeros_like(x))
    codes = ratio.clamp(0, qmax).round()
    return codes, scale16, mn16, ratio.clamp(0, qmax)


def assert_codes_match(codes: torch.Tensor, ref_codes: torch.Tensor, ratio: torch.Tensor) -> None:
    """Codes equal the float64 formula's except at a .5 tie of (x - min) / scale (within 1e-4), where the float32
    route (a reciprocal per group, then a multiply) may pick either neighbour: both are half a step away."""
    differ = codes.double() != ref_codes
    near_tie = ((ratio - ratio.floor()) - 0.5).abs() < 1e-4
    assert not (differ & ~near_tie).any(), f"{int((differ & ~near_tie).sum())} codes differ away from a tie"
    assert ((codes.double() - ratio).abs()[differ] <= 0.5 + 1e-4).all()


CASES = {
    "randn": lambda g: torch.randn(4, 32, 64, generator=g),
    "outlier_channels": lambda g: torch.randn(4, 32, 64, generator=g) * torch.where(torch.arange(64) % 9 == 0, 40.0, 1.0),
    "uniform_positive": lambda g: torch.rand(4, 32, 64, generator=g) * 7 + 3,
    "large": lambda g: torch.randn(4, 32, 64, generator=g) * 2000,
}


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dim", [-2, -1])
def test_codes_scale_min_match_formula(bits, dtype, case, dim):
    x = CASES[case](torch.Generator().manual_seed(zlib.crc32(f"{bits}{case}{dim}".encode()))).to(dtype)
    codes, scale, mn = quantize(x, bits, dim)
    _, ref_scale, ref_mn, _ = formula64(x, bits, dim)
    assert codes.dtype == torch.uint8 and scale.dtype == torch.float16 and mn.dtype == torch.float16
    assert torch.equal(mn.double(), ref_mn)
    # scale is computed in float32 then rounded to fp16: it may differ from the float64 route by one fp16 ulp
    # when (max - min) / qmax sits on an fp16 rounding midpoint
    ulp = torch.finfo(torch.float16).eps * ref_scale.abs().clamp_min(2**-14)
    assert ((scale.double() - ref_scale).abs() <= ulp).all()
    assert (scale.double() == ref_scale).float().mean() > 0.95
    ref_codes, _, _, ratio = formula64(x, bits, dim, scale.double(), mn.double())  # codes from the stored numbers
    assert_codes_match(codes, ref_codes, ratio)
    assert int(codes.max()) <= 2**bits - 1
    # dequantization error is at most half a step (plus fp16 rounding of the stored min)
    err = (dequantize(codes, scale, mn).double() - x.double()).abs()
    bound = scale.double() / 2 + (x.double().amin(dim, keepdim=True) - mn.double()).abs() + 1e-6
    assert (err <= bound * (1 + 1e-3)).all()


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_constant_group_is_exact(bits, dtype):
    x = torch.full((3, 32, 64), 0.7133, dtype=dtype)
    x[1] = -12.5
    x[2] = 0.0
    codes, scale, mn = quantize(x, bits, dim=-2)
    assert (scale == 0).all() and (codes == 0).all()
    y = dequantize(codes, scale, mn)
    assert not torch.isnan(y).any()
    assert torch.equal(y, x.float()), "a constant group must dequantize to its value exactly"


def test_constant_and_varying_channels_mixed():
    x = torch.randn(2, 32, 16)
    x[:, :, 3] = 5.0  # one constant channel inside otherwise random groups
    codes, scale, mn = quantize(x, 2, dim=-2)
    y = dequantize(codes, scale, mn)
    assert torch.equal(y[:, :, 3], x[:, :, 3])
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_roundtrip_every_code_at_every_position(bits):
    per_byte = 8 // bits
    n = 64
    # every code value at every position within a byte, and every byte position
    codes = (torch.arange(n * (2**bits)).view(2**bits, n) + torch.arange(2**bits)[:, None]) % (2**bits)
    codes = codes.to(torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (2**bits, n * bits // 8)
    assert torch.equal(unpack(packed, bits), codes)
    # documented bit positions: element c sits in byte c // per_byte at bits (c % per_byte) * bits
    for c in range(n):
        byte, shift = c // per_byte, (c % per_byte) * bits
        assert torch.equal((packed[:, byte] >> shift) & (2**bits - 1), codes[:, c])


def test_pack_matches_kivi_int32_word_order():
    # KIVI packs 16 2-bit codes into an int32 with element i at bits [2i, 2i+2); on a little-endian machine the
    # bytes of that word are our packed bytes.
    codes = torch.randint(0, 4, (16,), dtype=torch.uint8)
    word = sum(int(c) << (2 * i) for i, c in enumerate(codes))
    assert list(pack(codes, 2)) == list(word.to_bytes(4, "little"))


@pytest.mark.parametrize("bits", [2, 4])
def test_keys_per_channel_values_per_token(bits):
    g = torch.Generator().manual_seed(0)
    k = torch.randn(5, 3, 32, 64, generator=g).bfloat16()  # [n, H, G tokens, D]
    kq, ks, km = quantize_keys(k, bits)
    assert kq.shape == (5, 3, 32, 64 * bits // 8) and ks.shape == (5, 3, 64)
    ref, s64, m64, ratio = formula64(k, bits, dim=-2)  # per channel: min/max over the G tokens
    assert torch.equal(ks.double(), s64.squeeze(-2)) and torch.equal(km.double(), m64.squeeze(-2))
    assert_codes_match(unpack(kq, bits), ref, ratio)
    y = dequantize_keys(kq, ks, km, bits)
    assert torch.equal(y.double(), unpack(kq, bits).double() * s64 + m64)  # codes * scale + min, exactly

    v = torch.randn(7, 3, 64, generator=g).bfloat16()  # per token, groups of 32 channels
    vq, vs, vm = quantize_values(v, bits, 32)
    assert vq.shape == (7, 3, 64 * bits // 8) and vs.shape == (7, 3, 2)
    ref, s64, m64, ratio = formula64(v.view(7, 3, 2, 32), bits, dim=-1)
    assert torch.equal(vs.double(), s64.squeeze(-1)) and torch.equal(vm.double(), m64.squeeze(-1))
    assert_codes_match(unpack(vq, bits).view(7, 3, 2, 32), ref, ratio)


def test_bad_bits():
    with pytest.raises(ValueError, match="bits must be 2 or 4"):
        quantize(torch.zeros(4, 4), 3, -1)
