"""Pieces shared by the KIVI Triton kernels: page addressing, code gathering and packing, quantizing, the request of
a token.

Every byte offset comes from :class:`kivi_vllm.layout.PageLayout` (``layout_args``); the kernels never hard-code one.
Bit order (``PageLayout`` docstring): element c of a packed row sits in byte ``c // (8 / bits)`` at bit offset
``(c % (8 / bits)) * bits``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import PageLayout

#: log2(e): the kernels' softmax runs in base 2 (a global must be a ``tl.constexpr`` to be read inside a kernel).
LOG2E = tl.constexpr(1.4426950408889634)


def layout_args(layout: PageLayout) -> dict:
    """The constexpr arguments every KIVI kernel takes, from the page layout (bytes, tokens, channels)."""
    off = layout.kernel_offsets
    return dict(
        BLOCK_SIZE=layout.block_size, GROUP_SIZE=layout.group_size, HEAD_SIZE=layout.head_size,
        HEAD_PAD=triton.next_power_of_2(layout.head_size), K_BITS=layout.k_bits, V_BITS=layout.v_bits,
        V_GROUP=layout.v_group_size, RECORD_BYTES=off["record_bytes"], OFF_KC=off["k_codes"],
        OFF_KS=off["k_scale"], OFF_KM=off["k_min"], OFF_VC=off["v_codes"], OFF_VS=off["v_scale"],
        OFF_VM=off["v_min"], OFF_KSTAGE=off["k_stage"], OFF_VSTAGE=off["v_stage"],
        RESIDUAL_KV=layout.residual == "kv",
    )


def check_rows(*tensors: torch.Tensor) -> None:
    """Raise ValueError unless every [T, heads, head_size] tensor is contiguous in its last dimension (vLLM's q/k/v
    views of the fused QKV output are; the kernels address rows and heads by stride)."""
    for x in tensors:
        if x.dim() != 3 or x.stride(2) != 1:
            raise ValueError(f"KIVI kernels: expected [tokens, heads, head_size] contiguous in head_size, got shape "
                             f"{tuple(x.shape)} strides {x.stride()}")


def check_attention(op: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor,
                    kv_cache: torch.Tensor, layout: PageLayout) -> tuple[int, int]:
    """Validate an attention launcher's tensors (:func:`check_cache`, :func:`check_rows`, head counts and size);
    return (num_heads, num_kv_heads).

    Raises:
        ValueError: a wrong cache, rows not contiguous in head_size, a head size other than the layout's, or
            num_heads not a multiple of num_kv_heads.
    """
    check_cache(kv_cache, layout)
    check_rows(query, key, value, out)
    _, hq, d = query.shape
    h = kv_cache.shape[1]
    if d != layout.head_size or key.shape[1:] != (h, d) or hq % h:
        raise ValueError(f"KIVI {op}: query {tuple(query.shape)} / key {tuple(key.shape)} do not match {h} KV "
                         f"heads of size {layout.head_size}")
    return hq, h


def check_cache(kv_cache: torch.Tensor, layout: PageLayout) -> None:
    """Raise ValueError unless ``kv_cache`` is a contiguous-per-page uint8 [num_blocks, num_kv_heads, page_bytes]."""
    if kv_cache.dtype != torch.uint8 or kv_cache.dim() != 3 or kv_cache.shape[2] != layout.page_bytes:
        raise ValueError(f"KIVI kernels: expected uint8 kv_cache [num_blocks, num_kv_heads, {layout.page_bytes}], "
                         f"got {kv_cache.dtype} {tuple(kv_cache.shape)}")
    if kv_cache.stride(2) != 1:
        raise ValueError("KIVI kernels: the page bytes of kv_cache must be contiguous")


def dot_args(query: torch.Tensor) -> dict:
    """Operands of the kernels' tl.dot: float32, as TF32 MMAs on the GPU for 16-bit models ("ieee" for float32
    models and under the Triton interpreter). bf16 operands were measured on the H200 (2026-11-30,
    scripts/kernel_sweep.py): the folded query ``q * scale`` loses too much in 8 mantissa bits (relative error up to
    1.6e-2 against the float64 reference), with no speed gain."""
    tf32 = query.dtype != torch.float32 and query.device.type == "cuda"
    return dict(DOT_DTYPE=tl.float32, DOT_PRECISION="tf32" if tf32 else "ieee")


def stage_dtype(layout: PageLayout):
    """Triton dtype of the stage (the model dtype)."""
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[layout.residual_dtype]


@triton.jit
def find_request(qsl_ptr, num_reqs, t):
    """Index r of the request owning batch row t (a scalar or a vector of rows): the largest r < num_reqs with
    query_start_loc[r] <= t (empty padding requests before a real one are skipped because the largest r wins), by a
    branch-free binary search of power-of-two steps (log2(num_reqs) rounds of loads). Row t of a batch whose first
    t + 1 requests have one token each (a decode batch) is request t: two independent loads, no search
    (query_start_loc[t + 1] = t + 1 leaves no later request at or below t)."""
    near = t < num_reqs
    fast = near & (tl.load(qsl_ptr + t, mask=near, other=-1) == t) & (tl.load(qsl_ptr + t + 1, mask=near,
                                                                               other=-1) == t + 1)
    r = tl.where(fast, t, 0)
    step = 1
    while step * 2 < num_reqs:
        step *= 2
    while step > 0:
        cand = r + step
        ok = (cand < num_reqs) & ~fast
        ok = ok & (tl.load(qsl_ptr + cand, mask=ok, other=0) <= t)
        r = tl.where(ok, cand, r)
        step //= 2
    return r


@triton.jit
def gather_codes(ptr, rows, row_mask, chans, ROW_BYTES: tl.constexpr, BITS: tl.constexpr,
                 HEAD_SIZE: tl.constexpr):
    """Codes of packed rows as int32, one element per (row, channel) of the broadcast of ``rows`` and ``chans``
    (e.g. rows [G, 1] x chans [1, D] -> [G, D], or rows [1, G] x chans [D, 1] -> [D, G], already transposed).
    Each element loads the byte holding its channel (``8 / BITS`` neighbours share one byte, so a warp's loads
    coalesce) and shifts it: no reshape, hence no register shuffle between layouts."""
    PER: tl.constexpr = 8 // BITS
    b = tl.load(ptr + rows * ROW_BYTES + chans // PER, mask=row_mask & (chans < HEAD_SIZE), other=0)
    return (b.to(tl.int32) >> ((chans % PER) * BITS)) & ((1 << BITS) - 1)


#: The bits of 1.0f, passed to the kernels at run time so that the exponent trick's AND and OR stay one LOP3 (as two
#: compile-time constants they take two instructions): :func:`unit_floats`.
ONE_F32_BITS = 0x3F800000


@triton.jit
def unit_floats(words, sh, one_bits, BITS: tl.constexpr):
    """float32 ``1 + code / 2**BITS`` of the ``BITS``-bit code that starts at bit ``sh`` of each int32 in ``words``
    (``words`` and ``sh`` broadcast to the result's shape). The code is moved to the top of a float32 mantissa (one
    shift: left or right, the other is 0) and given the exponent of 1.0 (one AND-OR, a LOP3 with ``one_bits`` =
    :data:`ONE_F32_BITS`), so no integer-to-float conversion runs; the caller folds the 1 into the minimum:
    ``code * s + m = f * (s * 2**BITS) + (m - s * 2**BITS)`` (the same trick as the "fast int-to-float" dequantizers
    of FasterTransformer and Marlin, in float32)."""
    MANT: tl.constexpr = 23 - BITS  # lowest bit of the code in the float32 mantissa
    x = (words << tl.maximum(MANT - sh, 0)) >> tl.maximum(sh - MANT, 0)
    return ((x & (((1 << BITS) - 1) << MANT)) | one_bits).to(tl.float32, bitcast=True)


@triton.jit
def unit_codes(ptr, rows, row_mask, one_bits, R: tl.constexpr, ROW_BYTES: tl.constexpr, BITS: tl.constexpr,
               HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr):
    """float32 ``1 + code / 2**BITS`` [R, HEAD_PAD] of the packed rows ``rows`` ([R] int) at ``ptr``, channels in
    their natural order: :func:`unit_codes_at` of the rows' addresses ``ptr + rows * ROW_BYTES``."""
    return unit_codes_at(ptr + rows * ROW_BYTES, row_mask, one_bits, R, BITS, HEAD_SIZE, HEAD_PAD)


@triton.jit
def unit_codes_at(row_ptrs, row_mask, one_bits, R: tl.constexpr, BITS: tl.constexpr, HEAD_SIZE: tl.constexpr,
                  HEAD_PAD: tl.constexpr):
    """float32 ``1 + code / 2**BITS`` [R, HEAD_PAD] of R packed rows whose first bytes are at ``row_ptrs`` ([R] uint8
    pointers; the rows may lie in different records), channels in their natural order. One 32-bit load per word
    of a row ([R, words]); each of the word's ``32 / BITS`` codes is turned into a float by :func:`unit_floats`,
    giving a [R, words, codes per word] tile whose row-major order is the channel order (channel ``w * 32 / BITS +
    b`` is code b of word w: the page's bit order). The caller turns it into ``code * scale + min`` as ``f * (scale
    * 2**BITS) + (min - scale * 2**BITS)``, one multiply-add that equals the direct form before its single
    rounding. Masked rows and channels past the head size give 1.0 (code 0). Rows must be 4-byte aligned: they are
    (a row is head size x bits / 8 bytes with the head size a multiple of 16, record regions multiples of 16
    bytes)."""
    PW: tl.constexpr = 32 // BITS
    W: tl.constexpr = HEAD_PAD // PW
    w = tl.arange(0, W)
    words = tl.load(row_ptrs[:, None].to(tl.pointer_type(tl.int32)) + w[None, :],
                    mask=row_mask[:, None] & (w[None, :] < HEAD_SIZE * BITS // 32), other=0)
    f = unit_floats(words[:, :, None], (tl.arange(0, PW) * BITS)[None, None, :], one_bits, BITS)
    return tl.reshape(f, (R, HEAD_PAD))


@triton.jit
def load_value_scales(ptr, rows, row_mask, G: tl.constexpr, HEAD_PAD: tl.constexpr, HEAD_SIZE: tl.constexpr,
                      V_GROUP: tl.constexpr):
    """Per-token fp16 value scales (or minima) at ``ptr`` ([G, HEAD_SIZE / V_GROUP] in the record), expanded to one
    float32 per channel [G, HEAD_PAD]: :func:`value_scales_at` of the rows ``rows``."""
    return value_scales_at(ptr.to(tl.pointer_type(tl.float16)) + rows * (HEAD_SIZE // V_GROUP), row_mask, G,
                           HEAD_PAD, HEAD_SIZE, V_GROUP)


@triton.jit
def value_scales_at(row_ptrs, row_mask, R: tl.constexpr, HEAD_PAD: tl.constexpr, HEAD_SIZE: tl.constexpr,
                    V_GROUP: tl.constexpr):
    """fp16 per-token value scales (or minima) of R tokens, ``HEAD_SIZE / V_GROUP`` each starting at ``row_ptrs``
    ([R] fp16 pointers), expanded to one float32 per channel [R, HEAD_PAD]: one load per token and channel group,
    broadcast in registers."""
    NVG: tl.constexpr = HEAD_PAD // V_GROUP
    ci = tl.arange(0, NVG)
    x = tl.load(row_ptrs[:, None] + ci[None, :], mask=row_mask[:, None] & (ci[None, :] < HEAD_SIZE // V_GROUP),
                other=0.0).to(tl.float32)
    return tl.reshape(tl.broadcast_to(x[:, :, None], (R, NVG, V_GROUP)), (R, HEAD_PAD))


@triton.jit
def pack_rows(codes, ROWS: tl.constexpr, HEAD_PAD: tl.constexpr, BITS: tl.constexpr):
    """int32 codes [ROWS, HEAD_PAD] -> uint8 bytes [ROWS, HEAD_PAD * BITS / 8] (inverse of :func:`gather_codes`)."""
    PER: tl.constexpr = 8 // BITS
    c = tl.reshape(codes, (ROWS, HEAD_PAD // PER, PER))
    shifts = tl.arange(0, PER) * BITS
    return tl.sum(c << shifts[None, None, :], axis=2).to(tl.uint8)


@triton.jit
def quantize(x, AXIS: tl.constexpr, BITS: tl.constexpr):
    """KIVI asymmetric min/max quantization of float32 ``x`` along ``AXIS`` (bit-exact with
    :func:`kivi_vllm.quant.quantize`: fp32 min/max, fp16 min and scale, codes ``(x - min) * (1 / scale)`` from the
    stored fp16 numbers with one IEEE reciprocal per group (0 for a constant group, whose codes are then 0), clamped
    to [0, 2**BITS - 1] and rounded half to even).

    Returns (codes int32 like x, scale fp16 and min fp16 with AXIS kept as size 1).
    """
    QMAX: tl.constexpr = (1 << BITS) - 1
    mn32 = tl.min(x, axis=AXIS, keep_dims=True)
    mx32 = tl.max(x, axis=AXIS, keep_dims=True)
    mn = tl.clamp(mn32, -65504.0, 65504.0).to(tl.float16)
    scale = tl.clamp(tl.math.div_rn(mx32 - mn32, QMAX * 1.0), -65504.0, 65504.0).to(tl.float16)
    s32 = scale.to(tl.float32)
    rcp = tl.where(s32 > 0, tl.math.div_rn(1.0, tl.where(s32 > 0, s32, 1.0)), 0.0)  # per group, not per element
    q = tl.clamp((x - mn.to(tl.float32)) * rcp, 0.0, QMAX * 1.0)
    # round half to even: adding 2**23 leaves the rounded value in the low mantissa bits (0 <= q <= 15)
    codes = (q + 8388608.0).to(tl.int32, bitcast=True) & QMAX
    return codes, scale, mn
