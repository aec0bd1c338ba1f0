"""Decode attention on tensor cores with register operands (Triton Gluon): the "tc" kernel.

The same attention over complete groups as ``_decode_fma_kernel`` in :mod:`.decode` (one program of one warp per
request, KV head and split, or per work-list row and KV head: :func:`.decode.decode_work`; the open group, which
merges the slots into the output, is that module's second launch), with both products as
``mma.sync.m16n8k16`` fp16 MMAs (float32 accumulators) whose operands are built in registers (shared memory only
holds the packed records on their way in, ``STAGES``).

By default (:data:`TRANSPOSED`) both products run transposed, ``S^T = K . q^T`` and ``O^T = V^T . P^T``: the dequantized
keys and values are the A operands (16-row tiles of tokens and of channels, the same registers as the B operands below,
since an A and a B fragment hold the same reduction indices), the query heads the 8 columns of B (16 above 8 query heads
per KV head). Padding to 8 instead of 16 halves the MMAs and the softmax work, and the [D, 8] float32 accumulator holds
32 registers per thread instead of 64: 157 registers against 202 at 4 query heads per KV head, 2 bits (sm_90 compile),
879 SASS per group against 983 (731 with the 3-instruction dequantization below). The probabilities leave the score
accumulator transposed (a thread holds tokens lane / 4 and heads 2 (lane % 4)) and reach the B operand of ``V^T . P^T``
(tokens 2 (lane % 4), heads lane / 4) through one register-only layout conversion (shuffles) per group. On the H200
(thirteenth session, docs/benchmarks.md) 0.88-0.91x the 16-row form's time at the GQA shape (batch 64-256, 4k-16k) and
0.81-1.00x the "fma" kernel's at 1 query head per KV head (batch 16-256, 1k-16k; equal at 64 / 16k), where the 16-row
form was slower than "fma".
The description below is of the 16-row form; the transposed one swaps the operands of each product:

* scores ``S = q . K^T``: A = the query heads of one KV head in fp16 (padded to 16 rows, loaded once; a bf16 query
  clamped to fp16's range, |q| <= 65504, and not scaled: the softmax scale and log2(e) multiply the float32 scores,
  since folded into the query they were a rounding of their own; a bf16 query is then exact in fp16 unless it lies
  below fp16's normal range, 6.1e-5); B = the group's keys dequantized in fp16, ``c * s + m``. Dequantized keys
  and values must lie in fp16's range (|x| <= 65504; KIVI's stored scale and minimum already do; before the
  thirteenth session the kernel also needed ``2**bits s`` in that range);
* output ``O += P . V``: A = the probabilities in fp16, taken from the score accumulator's registers as they lie
  (FlashAttention-2's register reuse); B = the group's values dequantized the same way, per token and channel
  group. Scores, softmax and ``O`` stay in float32. The running maximum moves only when a group's scores exceed it
  by more than ``RESCALE_SLACK`` (FlashAttention-4's conditional rescaling), so most groups skip rescaling ``O``
  (64 multiplies per thread): 8-10% less time on the H200 (docs/benchmarks.md).

The loop overlaps each group's memory round trip with the arithmetic of earlier groups. By default (``STAGES`` = 2,
group size <= 32) ``cp.async`` copies group ``g + 1``'s key codes, key scale/min and value codes into shared memory
while group ``g`` is computed, and each thread reads back the words its fragments need (the same layouts as the global
loads); only the value scale/min are prefetched in registers. That held 202 registers (16-row form, tenth session; 159
now) and no spill at 2 bits where the register double buffer (``PREFETCH``, ``STAGES`` = 0) held 255 and spilled 80
bytes: 6-7.5% less time than the register prefetch at 4k-16k for KIVI-2, 9-12% for KIVI-4 (tenth session,
docs/benchmarks.md), which itself took 6.5-9.5% less than loading each record at its turn (ninth session).

A code pair becomes an fp16x2 operand in 3 instructions (inline PTX, :func:`_asm`): LOP3 keeps the two codes where
they lie in their 16-bit halves and ORs in the exponent that makes each code's lowest bit the mantissa's unit
(``2**(10 - pos) + c``, the exponent trick of :func:`.common.unit_floats` without moving the code), subtracting that
power of two leaves ``c`` (exact), and one HFMA2 applies scale and minimum, so each dequantized element is rounded
once (to fp16, 11 significant bits like TF32). Keys pair the codes b and b + 16 / bits of one 32-bit word (16 bits
apart; codes above bit 10 - bits read the word shifted by 6, one shift per word); values pair tokens t and t + 1 of
one channel (two words: one PRMT gathers their bytes, shared by the codes of a byte). The HFMA2's scale and minimum
pairs of the keys (channels b and b + 16 / bits) are built once per group from 32-bit loads (:func:`_scale_pairs`).
Before the thirteenth session a pair took 4-5 instructions (the codes rotated to the top of the mantissas) plus
two re-packing PRMTs that ptxas emitted at every use of a scale pair: 879 SASS per group at 4 query heads per KV
head, 2 bits, now 731 (``benchmarks/kernel_resources.py --qpk 4``).

Plain Triton picks MMA operand layouts itself and moves a dequantized tile through shared memory to reach them (the
old "mma" kernel: 226 LDS per group, docs/benchmarks.md). Gluon (Triton 3.6 ``triton.experimental.gluon``) lets a
kernel say where every element lives: the packed words are loaded in ``DistributedLinearLayout``s chosen so that
each thread loads exactly the words whose codes its MMA fragments hold (PTX ISA, "Matrix Fragments for
mma.m16n8k16" with .f16: a B register holds rows ``k = 2 (lane % 4)`` and ``+ 1`` (and ``+ 8``, ``+ 9``) of column
``lane / 4``; A rows ``lane / 4`` and ``+ 8``; C rows ``lane / 4`` and ``+ 8``, columns ``2 (lane % 4)`` and
``+ 1``). That needs the reduction index of the score product in a permuted channel order and the output columns
in a permuted channel order, both free (a dot product does not care about the order of its terms):

* keys: MMA index ``k = 16 kc + 8 e + 2 j + p`` is channel ``j D/4 + w 32/bits + p 16/bits + b`` with
  ``w 16/bits + b = 2 kc + e``: thread j (lane % 4) holds a contiguous quarter of every token's channels, whole
  words;
* values: MMA index = token (natural order); output column ``n`` is channel ``(n % 8) D/8 + n // 8``: thread
  lane / 4 holds a contiguous eighth of the channels.

Every re-indexing is a ``reshape``/``permute`` followed by ``convert_layout(..., assert_trivial=True)``: compiling
fails if any would move data between threads. No interpreter runs Gluon, so this kernel is tested on the GPU
(``scripts/decode_kernels_check.py --kernels tc --wide``, ``scripts/kernel_sweep.py --decode-kernel tc``) against
the float64 reference, and its sm_90 compile (trivial conversions, shared memory only for the staged records) on
the CPU (``tests/test_sm90_compile.py``); on the CPU :func:`.decode.decode` never picks it.
"""

from __future__ import annotations

import functools
import math

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

from ..layout import PageLayout
from .common import layout_args

LOG2E_TC = gl.constexpr(1.4426950408889634)


def _bits(n: int) -> list[int]:
    """Powers of two below n (n a power of two): the bases of one dimension."""
    return [1 << i for i in range(int(math.log2(n)))]


def _basis(rank: int, dim: int, value: int) -> list[int]:
    b = [0] * rank
    b[dim] = value
    return b


def _asm(kind: str) -> str:
    """Inline PTX turning a pair of packed codes into fp16x2 ``c * s + m``, one rounding (the HFMA2).

    Each code stays where it lies in its 16-bit half (no shift): LOP3 keeps its bits and ORs in the exponent that
    makes the code's lowest bit the unit of the mantissa, ``2**(10 - pos) + c`` for a code at bit ``pos`` (``pos +
    bits <= 10``), and subtracting that power of two (exact) leaves ``c``. Mask and power of two ("magic") are
    per-code operands, constants of each register that ptxas keeps out of the loop.

    keys (``pack=2`` operands: $0 out; $1 $2 the word, twice; $3 $4 the mask; $5 $6 the magic; $7 $8 the scale
    pair, twice; $9 $10 the minimum pair, twice: :func:`_scale_pairs` gives them as int32): the codes b and b + 16 /
    bits of a word (bits 16 apart), the word shifted right by 6 first for codes above bit 10 - bits (one shift per
    word, shared by those codes).
    values ($1 $2 the words of tokens t and t + 1; $3 $4 a PRMT selector; $5 $6 mask; $7 $8 magic; $9 scale pair;
    $10 minimum pair): the byte holding the channel's code in each word goes to bytes 0 and 2, the code at its bit
    within the byte.

    Before the thirteenth session the codes were moved to the top of the mantissas (a rotate or a shift per pair)
    and given the exponent of 1.0 (``1 + c / 2**bits``), with the scale ``2**bits s``: one more instruction per
    pair, and the same value. Folding the subtraction into the minimum (``m - magic * s``) would round that
    difference too: up to 8.4e-3 relative attention error against 1.8e-3 (``scripts/decode_kernels_check.py
    --wide``, 2026-11-30)."""
    if kind == "key":
        return "{ .reg .b32 t; lop3.b32 t, $1, $3, $5, 0xea; sub.rn.f16x2 t, t, $5; fma.rn.f16x2 $0, t, $7, $9; }"
    return ("{ .reg .b32 t; prmt.b32 t, $1, $2, $3; lop3.b32 t, t, $5, $7, 0xea; sub.rn.f16x2 t, t, $7; "
            "fma.rn.f16x2 $0, t, $9, $10; }")


#: Default slack of the conditional rescaling (log2 units: a factor of 256), FlashAttention-4's threshold.
RESCALE_SLACK = 8.0

#: Load the next group's record into registers before the current group's math (a register double buffer, the
#: loop's only memory round trip overlapped with its arithmetic; False: load each group's record at its turn, the
#: kernel before the ninth session, kept for ``benchmarks/decode_attention.py --tc-stages 0 --tc-prefetch 0``). With
#: :data:`STAGES` >= 2 (where :func:`staged_supported`) it applies to the value scale/min only.
PREFETCH = True

#: Shared-memory stages of the records' key codes, key scale/min and value codes (Ampere ``cp.async`` copies, no
#: registers held while in flight): with STAGES = n >= 2 the loop copies group ``g + n - 1`` while it computes group
#: ``g``, and keeps only the value scale/min in the register prefetch (202 registers at 2 bits in the 16-row form, no
#: spill, against 255 and 80 bytes spilled without; tenth session). 0: no shared memory (PREFETCH decides). Layouts
#: whose thread holds part of a value word (head size 64 at 2 bits) run with 0. Measured on the H200 at the GQA shape
#: (tenth session, docs/benchmarks.md): 2 stages take 0.93x the register prefetch's time for KIVI-2 at 256 / 16k and
#: 0.90x for KIVI-4; 3-5 stages are no faster.
STAGES = 2

#: Compute the transposed products ``S^T = K . q^T`` and ``O^T = V^T . P^T``: the keys and values are the A operands
#: (16-row tiles of tokens and channels), the query heads the 8 (or 16) columns of B, so heads pad to 8 instead of
#: 16: half the MMAs and softmax work of the 16-row form, and a [D, 8] float32 accumulator (32 registers per thread
#: instead of 64). The probabilities reach the P.V product's B operand through one layout conversion in registers
#: (warp shuffles), since the score accumulator holds them transposed. False: the 16-row form (the kernel until the
#: thirteenth session; with the 3-instruction dequantization it compiles to 225 registers, 8 programs per SM, at 4
#: query heads per KV head, 2 bits, against 159 and 12 transposed).
TRANSPOSED = True


def staged_supported(layout: PageLayout) -> bool:
    """Whether :data:`STAGES` applies to ``layout``: group size at most 32 (at 64 and 128 the staged loop spills as
    much or more than the register prefetch, ``benchmarks/kernel_resources.py``) and whole value words per thread
    (``D/8`` channels at least a word's codes)."""
    return layout.group_size <= 32 and layout.head_size // 8 >= 32 // layout.v_bits


def tc_constexprs(layout: PageLayout, qpk: int, num_splits: int, rescale_slack: float = RESCALE_SLACK,
                  prefetch: bool | None = None, stages: int | None = None, transposed: bool | None = None) -> dict:
    """Constexprs of :func:`_decode_tc_kernel` for ``layout`` (:func:`.decode.tc_supports` it; cached: decode()
    launches it per layer and step; do not mutate the result): its register layouts (Gluon
    ``DistributedLinearLayout``s of the packed words, built so that the codes land where the MMA fragments want
    them), the inline PTX of :func:`_asm` and the page offsets (:func:`.common.layout_args`).

    ``prefetch``: :data:`PREFETCH` (read at each call) if None. ``stages``: :data:`STAGES` (read at each call) if
    None; 0 where not :func:`staged_supported`. ``transposed``: :data:`TRANSPOSED` (read at each call) if None.

    ``rescale_slack`` (log2 units): a row's running maximum moves only when a group's scores exceed it by more
    than this (0: whenever they exceed it, the classic online softmax). The result is the same up to rounding; the
    probabilities fed to the P.V product reach up to ``2**rescale_slack``, which must stay below fp16's largest
    value 65504 (2**15.999): hence at most 15.

    Raises:
        ValueError: ``rescale_slack`` outside [0, 15]; ``stages`` not 0 or 2-8 (negative, 1, above 8).
    """
    stages = STAGES if stages is None else int(stages)
    if stages == 1 or not 0 <= stages <= 8:  # checked for every layout, also those that run without stages
        raise ValueError(f"KIVI decode: stages must be 0 or 2-8, got {stages}")
    return _tc_constexprs(layout, qpk, num_splits, rescale_slack, PREFETCH if prefetch is None else bool(prefetch),
                          stages if staged_supported(layout) else 0,
                          TRANSPOSED if transposed is None else bool(transposed))


@functools.lru_cache(maxsize=64)
def _tc_constexprs(layout: PageLayout, qpk: int, num_splits: int, rescale_slack: float, prefetch: bool,
                   stages: int, transposed: bool) -> dict:
    """:func:`tc_constexprs` with every argument resolved (the cache key)."""
    if not 0 <= rescale_slack <= 15:
        raise ValueError(f"KIVI decode: rescale_slack must lie in [0, 15] (probabilities up to 2**slack must fit "
                         f"fp16), got {rescale_slack}")
    G, D = layout.group_size, layout.head_size
    kb, vb = layout.k_bits, layout.v_bits
    # keys: [G tokens, 4 (j), KWT words, 2 (p), KPW/2 (b)]: thread (j = lane % 4, tokens lane / 4 + 8 r) holds the
    # words j * KWT .. of its tokens; element (t, j, w, p, b) is code b + p * KPW/2 of word j * KWT + w; p first among
    # the registers (a pair shares one 32-bit register), then b, w, the token's high bits
    kwt = D * kb // 128
    half = 16 // kb
    k_lay = gl.DistributedLinearLayout(
        reg_bases=([_basis(5, 3, 1)] + [_basis(5, 4, v) for v in _bits(half)] + [_basis(5, 2, v) for v in _bits(kwt)]
                   + [_basis(5, 0, v) for v in _bits(G) if v >= 8]),
        lane_bases=[_basis(5, 1, 1), _basis(5, 1, 2), _basis(5, 0, 1), _basis(5, 0, 2), _basis(5, 0, 4)],
        warp_bases=[], block_bases=[], shape=[G, 4, kwt, 2, half])
    # the per-channel key scale/min as loaded, 32-bit words of two channels [4 (j), KWT, 2 (p), KPW/4 (b // 2)]:
    # b // 2 first (contiguous words: vector loads), token lanes broadcast; and the [4, KWT, KPW/4, 2 (b % 2)]
    # layout of the fp16 pairs (channels b and b + KPW/2 of a word) built from them (:func:`_scale_pairs`), whose
    # reshape to [4, KWT, KPW/2] is k_lay's slice
    hh = half // 2
    ks_lay = gl.DistributedLinearLayout(
        reg_bases=[_basis(4, 3, v) for v in _bits(hh)] + [_basis(4, 2, 1)] + [_basis(4, 1, v) for v in _bits(kwt)],
        lane_bases=[_basis(4, 0, 1), _basis(4, 0, 2), [0] * 4, [0] * 4, [0] * 4], warp_bases=[], block_bases=[],
        shape=[4, kwt, 2, hh])
    kp_lay = gl.DistributedLinearLayout(
        reg_bases=[_basis(4, 3, 1)] + [_basis(4, 2, v) for v in _bits(hh)] + [_basis(4, 1, v) for v in _bits(kwt)],
        lane_bases=[_basis(4, 0, 1), _basis(4, 0, 2), [0] * 4, [0] * 4, [0] * 4], warp_bases=[], block_bases=[],
        shape=[4, kwt, hh, 2])
    # values: [G tokens, 8 (n0), VWT words, VCW codes]: thread (j = lane % 4, n0 = lane / 4) holds tokens
    # 16 kc + 8 e + 2 j + p and channels n0 * D/8 .. (n0 + 1) * D/8 - 1 (VWT words of VCW codes, or half a word);
    # token bit 0 first among the registers (tokens t, t + 1 share one B register)
    cptv = D // 8
    vcw = min(32 // vb, cptv)
    vwt = cptv // vcw
    v_lay = gl.DistributedLinearLayout(
        reg_bases=([_basis(4, 0, 1)] + [_basis(4, 3, v) for v in _bits(vcw)] + [_basis(4, 2, v) for v in _bits(vwt)]
                   + [_basis(4, 0, v) for v in _bits(G) if v >= 8]),
        lane_bases=[_basis(4, 0, 2), _basis(4, 0, 4), _basis(4, 1, 1), _basis(4, 1, 2), _basis(4, 1, 4)],
        warp_bases=[], block_bases=[], shape=[G, 8, vwt, vcw])
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    # the cp.async copies (STAGES): 16-byte vectors, rows of key / value words, then the key scale and min
    krw, vrw = D * kb // 32, D * vb // 32
    kvec, vvec = min(4, krw), min(4, vrw)
    kc_copy = gl.BlockedLayout([1, kvec], [32 // (krw // kvec), krw // kvec], [1, 1], [1, 0])
    vc_copy = gl.BlockedLayout([1, vvec], [32 // (vrw // vvec), vrw // vvec], [1, 1], [1, 0])
    ks_copy = gl.BlockedLayout([8], [32], [1], [0])  # D fp16: 16 lanes of 8 at D = 128
    return dict(QPK=qpk, NUM_SPLITS=num_splits, K_LAY=k_lay, KS_LAY=ks_lay, KP_LAY=kp_lay,
                V_LAY=v_lay,
                MMA=mma, KWT=kwt, VWT=vwt, VCW=vcw, KEY_ASM=_asm("key"), VAL_ASM=_asm("value"),
                RESCALE_SLACK=float(rescale_slack), PREFETCH=prefetch, STAGES=stages, KC_COPY=kc_copy,
                VC_COPY=vc_copy, KS_COPY=ks_copy, SMEM2=gl.SwizzledSharedLayout(1, 1, 1, [1, 0]),
                SMEM1=gl.SwizzledSharedLayout(1, 1, 1, [0]), TRANSPOSED=transposed,
                NP=max(8, 1 << (qpk - 1).bit_length()),
                **layout_args(layout))


@gluon.jit
def _scale_pairs(w, KP_LAY: gl.constexpr, K_LAY: gl.constexpr):
    """The fp16x2 scale (or minimum) operands of the key HFMA2s from the loaded words ``w`` [4, KWT, 2 (p), HALF/2]
    (word ``i`` holds channels 2i and 2i + 1): the pair of channels b and b + HALF of each word, one PRMT per pair,
    as [1, 4, KWT, 2, HALF] int32 (broadcast over tokens; equal for p = 0 and 1). Built explicitly, once per group:
    left to ptxas, the pairs of 16-bit loads were re-packed at every use (two PRMTs per HFMA2)."""
    w0, w1 = gl.split(gl.permute(w, (0, 1, 3, 2)))  # [4, KWT, HALF/2]: the words of p = 0 and p = 1
    w0 = gl.expand_dims(gl.convert_layout(w0, gl.SliceLayout(3, KP_LAY)), 3)
    w1 = gl.expand_dims(gl.convert_layout(w1, gl.SliceLayout(3, KP_LAY)), 3)
    odd = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(0, gl.SliceLayout(0, KP_LAY))))
    sel = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.where(odd == 0, 0x5410, 0x7632), 0), 0), 0)
    pr = gl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [w0, w1, sel], dtype=gl.int32,
                                   is_pure=True, pack=1)  # [4, KWT, HALF/2, 2 (b % 2)]
    pr = gl.reshape(pr, [w.shape[0], w.shape[1], w.shape[3] * 2])  # b = 2 (b // 2) + b % 2
    pr = gl.convert_layout(pr, gl.SliceLayout(2, gl.SliceLayout(0, K_LAY)), assert_trivial=True)
    p = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(0, gl.SliceLayout(0, gl.SliceLayout(4, K_LAY)))))
    p = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(p, 0), 0), 0), 4)  # [1, 1, 1, 2, 1]
    return gl.expand_dims(gl.expand_dims(pr, 2), 0) + p * 0  # the same pair for p = 0 and 1


@gluon.jit
def _dims4(x):
    """``x`` [n] as [1, 1, 1, 1, n]."""
    return gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(x, 0), 0), 0), 0)


@gluon.jit
def _record_ptr(kv_ptr, bt_row, g, h, stride_cache_block, stride_cache_head, GROUPS_PER_PAGE: gl.constexpr,
                RECORD_BYTES: gl.constexpr):
    """Byte address of group ``g``'s record of KV head ``h`` (its page from the request's block-table row)."""
    blk = gl.load(bt_row + g // GROUPS_PER_PAGE).to(gl.int64)
    return kv_ptr + blk * stride_cache_block + h * stride_cache_head + (g % GROUPS_PER_PAGE) * RECORD_BYTES


@gluon.jit
def _load_record(kv_ptr, bt_row, g, h, stride_cache_block, stride_cache_head, k_word_off, kchan, v_word_off,
                 v_scale_off, GROUPS_PER_PAGE: gl.constexpr, RECORD_BYTES: gl.constexpr, OFF_KC: gl.constexpr,
                 OFF_KS: gl.constexpr, OFF_KM: gl.constexpr, OFF_VC: gl.constexpr, OFF_VS: gl.constexpr,
                 OFF_VM: gl.constexpr):
    """Group ``g``'s record of KV head ``h`` in the registers: key words, key scale/min, value words, value
    scale/min (every load issued before any use)."""
    rec = _record_ptr(kv_ptr, bt_row, g, h, stride_cache_block, stride_cache_head, GROUPS_PER_PAGE, RECORD_BYTES)
    kwords = gl.load((rec + OFF_KC).to(gl.pointer_type(gl.int32)) + k_word_off)  # [G, 4, KWT]
    ks = gl.load((rec + OFF_KS).to(gl.pointer_type(gl.int32)) + kchan)  # words of two channels
    km = gl.load((rec + OFF_KM).to(gl.pointer_type(gl.int32)) + kchan)
    vwords = gl.load((rec + OFF_VC).to(gl.pointer_type(gl.int32)) + v_word_off)  # [G, 8, VWT]
    vs, vm = _load_value_scales(rec, v_scale_off, OFF_VS, OFF_VM)
    return kwords, ks, km, vwords, vs, vm


@gluon.jit
def _copy_record(kc_s, ks_s, km_s, vc_s, stage, kv_ptr, bt_row, g, h, stride_cache_block, stride_cache_head, kc_off,
                 ks_off, vc_off, GROUPS_PER_PAGE: gl.constexpr, RECORD_BYTES: gl.constexpr, OFF_KC: gl.constexpr,
                 OFF_KS: gl.constexpr, OFF_KM: gl.constexpr, OFF_VC: gl.constexpr):
    """Start the ``cp.async`` copies of group ``g``'s key codes, key scale, key minimum and value codes
    into shared-memory stage ``stage``, as one commit group."""
    rec = _record_ptr(kv_ptr, bt_row, g, h, stride_cache_block, stride_cache_head, GROUPS_PER_PAGE, RECORD_BYTES)
    async_copy.async_copy_global_to_shared(kc_s.index(stage), (rec + OFF_KC).to(gl.pointer_type(gl.int32)) + kc_off)
    async_copy.async_copy_global_to_shared(ks_s.index(stage), (rec + OFF_KS).to(gl.pointer_type(gl.float16)) + ks_off)
    async_copy.async_copy_global_to_shared(km_s.index(stage), (rec + OFF_KM).to(gl.pointer_type(gl.float16)) + ks_off)
    async_copy.async_copy_global_to_shared(vc_s.index(stage), (rec + OFF_VC).to(gl.pointer_type(gl.int32)) + vc_off)
    async_copy.commit_group()


@gluon.jit
def _load_value_scales(rec, v_scale_off, OFF_VS: gl.constexpr, OFF_VM: gl.constexpr):
    """The value scale and minimum of the group record at ``rec`` (:func:`_record_ptr`) in the registers."""
    vs = gl.load((rec + OFF_VS).to(gl.pointer_type(gl.float16)) + v_scale_off)
    vm = gl.load((rec + OFF_VM).to(gl.pointer_type(gl.float16)) + v_scale_off)
    return vs, vm


@gluon.jit
def _group_step(q, kwords, ks, km, vwords, vs, vm, m_i, l_i, acc, kcode, v_sel, vcode, qscale,
                K_LAY: gl.constexpr, KP_LAY: gl.constexpr, B16: gl.constexpr, A16: gl.constexpr, MMA: gl.constexpr,
                KEY_ASM: gl.constexpr, VAL_ASM: gl.constexpr, G: gl.constexpr, D: gl.constexpr,
                KWT: gl.constexpr, HALF: gl.constexpr, CPTV: gl.constexpr, RESCALE_SLACK: gl.constexpr,
                TRANSPOSED: gl.constexpr):
    """One complete group's scores, online softmax and ``O += P . V`` from its record in the registers; returns the
    updated (m_i, l_i, acc). ``TRANSPOSED`` (:data:`TRANSPOSED`): ``S^T = K . q^T`` with the keys as A [G, D] and
    the query heads as B ``q`` [D, NP], ``O^T += V^T . P^T`` with the values as A [D, G], acc [D, NP]; else the
    16-row form, ``q`` [16, D] as A, the keys and values as B, acc [16, D]. m_i, l_i: per query head."""
    T: gl.constexpr = 0 if TRANSPOSED else 1  # the token axis of the scores (and the channel axis of acc)
    kshift, kmask, kmagic = kcode
    vmask, vmagic = vcode
    kd = gl.inline_asm_elementwise(
        KEY_ASM, "=r,r,r,r,r,r,r,r,r,r,r",
        [gl.expand_dims(gl.expand_dims(kwords, 3), 4) >> kshift, kmask, kmagic,
         _scale_pairs(ks, KP_LAY, K_LAY), _scale_pairs(km, KP_LAY, K_LAY)],
        dtype=gl.float16, is_pure=True, pack=2)  # [G, 4, KWT, 2, HALF]
    kd = gl.reshape(gl.permute(kd, (0, 1, 2, 4, 3)), [G, 4, KWT * HALF // 2, 2, 2])  # (w, b) -> (kc, e)
    if TRANSPOSED:  # keys -> A operand [G, D (k = 16 kc + 8 e + 2 j + p)]
        kd = gl.convert_layout(gl.reshape(gl.permute(kd, (0, 2, 3, 1, 4)), [G, D]), A16, assert_trivial=True)
        s = mma_v2(kd, q, gl.full([G, q.shape[1]], 0.0, gl.float32, MMA))  # [G, NP]
    else:  # keys -> B operand [D (k), G]
        kd = gl.convert_layout(gl.reshape(gl.permute(kd, (2, 3, 1, 4, 0)), [D, G]), B16, assert_trivial=True)
        s = mma_v2(q, kd, gl.full([16, G], 0.0, gl.float32, MMA))  # [16, G]
    # s times qscale: log2 units. Online softmax, base 2; with RESCALE_SLACK > 0 a head's running max (and so acc,
    # l) moves only when the group's max exceeds it by more than the slack (FlashAttention-4's conditional
    # rescaling): the probabilities are then at most 2**slack (fp16 holds them), and most groups skip the rescale
    m_new = gl.maximum(m_i, gl.max(s, axis=T) * qscale)
    if RESCALE_SLACK > 0:
        grow = m_new > m_i + RESCALE_SLACK
        if gl.max(grow.to(gl.int32), axis=0) > 0:  # one branch for the warp
            m_new = gl.where(grow, m_new, m_i)
            alpha = gl.exp2(m_i - m_new)
            acc = acc * gl.expand_dims(alpha, T)
            l_i = l_i * alpha
            m_i = m_new
    else:
        alpha = gl.exp2(m_i - m_new)
        acc = acc * gl.expand_dims(alpha, T)
        l_i = l_i * alpha
        m_i = m_new
    prob = gl.exp2(s * qscale - gl.expand_dims(m_i, T))  # one FFMA per score
    l_i = l_i + gl.sum(prob, axis=T)
    if TRANSPOSED:  # P -> B operand [G (k = token), NP]: the transpose of the C fragments (shuffles)
        pv = gl.convert_layout(prob.to(gl.float16), B16)
    else:  # P -> A operand [16, G] from the score accumulator's registers as they lie
        pv = gl.convert_layout(prob.to(gl.float16), A16, assert_trivial=True)
    vd = gl.inline_asm_elementwise(
        VAL_ASM, "=r,r,r,r,r,r,r,r,r,r,r",
        [gl.expand_dims(vwords, 3), v_sel, vmask, vmagic, gl.expand_dims(vs, 3), gl.expand_dims(vm, 3)],
        dtype=gl.float16, is_pure=True, pack=2)  # [G, 8, VWT, VCW]
    vd = gl.reshape(gl.permute(gl.reshape(vd, [G, 8, CPTV]), (0, 2, 1)), [G, D])  # n: channel (n % 8) CPTV + n // 8
    if TRANSPOSED:  # values -> A operand [D, G]
        acc = mma_v2(gl.convert_layout(gl.permute(vd, (1, 0)), A16, assert_trivial=True), pv, acc)
    else:  # values -> B operand [G (k = token), D]
        acc = mma_v2(pv, gl.convert_layout(vd, B16, assert_trivial=True), acc)
    return m_i, l_i, acc


@gluon.jit
def _decode_tc_kernel(
    q_ptr, kv_ptr, block_table_ptr, seq_lens_ptr, qsl_ptr,
    part_m_ptr, part_l_ptr, part_acc_ptr, sm_scale,
    stride_qt, stride_qh, stride_cache_block, stride_cache_head, stride_bt, work_ptr,
    QPK: gl.constexpr, NUM_SPLITS: gl.constexpr,
    K_LAY: gl.constexpr, KS_LAY: gl.constexpr, KP_LAY: gl.constexpr, V_LAY: gl.constexpr, MMA: gl.constexpr,
    KWT: gl.constexpr, VWT: gl.constexpr, VCW: gl.constexpr, KEY_ASM: gl.constexpr, VAL_ASM: gl.constexpr,
    BLOCK_SIZE: gl.constexpr, GROUP_SIZE: gl.constexpr, HEAD_SIZE: gl.constexpr, HEAD_PAD: gl.constexpr,
    K_BITS: gl.constexpr, V_BITS: gl.constexpr, V_GROUP: gl.constexpr, RECORD_BYTES: gl.constexpr,
    OFF_KC: gl.constexpr, OFF_KS: gl.constexpr, OFF_KM: gl.constexpr, OFF_VC: gl.constexpr,
    OFF_VS: gl.constexpr, OFF_VM: gl.constexpr, OFF_KSTAGE: gl.constexpr, OFF_VSTAGE: gl.constexpr,
    RESIDUAL_KV: gl.constexpr, RESCALE_SLACK: gl.constexpr, WORK_LIST: gl.constexpr = False,
    PREFETCH: gl.constexpr = False, STAGES: gl.constexpr = 0, KC_COPY: gl.constexpr = None,
    VC_COPY: gl.constexpr = None, KS_COPY: gl.constexpr = None, SMEM2: gl.constexpr = None,
    SMEM1: gl.constexpr = None, TRANSPOSED: gl.constexpr = False, NP: gl.constexpr = 8, PDL: gl.constexpr = False,
):
    """Split ``program_id(2)`` of the complete groups of request ``program_id(0)``, KV head ``program_id(1)`` (with
    ``WORK_LIST``: work item ``program_id(0)`` of ``work_ptr``, as ``_decode_fma_kernel``): writes its (max, sum,
    accumulator) partials to its slot for the open group's launch, which merges them (:func:`.decode.open_kernel_for`;
    slots as ``_decode_fma_kernel``). With ``PDL`` it lets the open group's launch (launched as a programmatic
    dependent) start at once (``griddepcontrol.launch_dependents``, :data:`.decode.PDL`)."""
    if PDL:
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)
    G: gl.constexpr = GROUP_SIZE
    D: gl.constexpr = HEAD_SIZE
    GROUPS_PER_PAGE: gl.constexpr = BLOCK_SIZE // GROUP_SIZE
    K_ROW_W: gl.constexpr = HEAD_SIZE * K_BITS // 32  # 32-bit words per packed key row
    V_ROW_W: gl.constexpr = HEAD_SIZE * V_BITS // 32
    KPW: gl.constexpr = 32 // K_BITS  # codes per word
    VPW: gl.constexpr = 32 // V_BITS
    HALF: gl.constexpr = KPW // 2
    CPT: gl.constexpr = D // 4  # key channels per thread (j)
    CPTV: gl.constexpr = D // 8  # value channels per thread (n0)
    NVG: gl.constexpr = D // V_GROUP
    A16: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B16: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    NQ: gl.constexpr = NP if TRANSPOSED else 16  # query heads (padded)
    CA: gl.constexpr = 0 if TRANSPOSED else 1  # the channel axis of the query operand and of acc
    ROW_LAY: gl.constexpr = gl.SliceLayout(CA, MMA)  # per query head

    r = gl.program_id(0)
    h = gl.program_id(1)
    split = gl.program_id(2)
    if WORK_LIST:
        item = work_ptr + gl.program_id(0) * 4
        r = gl.load(item)
        split = gl.load(item + 1)
    live = r >= 0  # an unused work item: no request, writes nothing
    r = gl.maximum(r, 0)
    q_start = gl.load(qsl_ptr + r).to(gl.int64)
    q_len = gl.load(qsl_ptr + r + 1) - q_start
    seq_len = gl.load(seq_lens_ptr + r)
    m_i = gl.full([NQ], float("-inf"), gl.float32, ROW_LAY)
    l_i = gl.full([NQ], 0.0, gl.float32, ROW_LAY)
    acc = gl.full([D, NQ] if TRANSPOSED else [NQ, D], 0.0, gl.float32, MMA)

    # --- loop-invariant index tensors ---------------------------------------------------------------------------
    # keys: words [G, 4, KWT] (word j * KWT + w of token t), scale/min words [4, KWT, 2, HALF/2] (two channels
    # each), and per code b the shift, mask and magic of :func:`_asm`
    K3: gl.constexpr = gl.SliceLayout(3, gl.SliceLayout(4, K_LAY))
    kt = gl.expand_dims(gl.expand_dims(gl.arange(0, G, layout=gl.SliceLayout(1, gl.SliceLayout(2, K3))), 1), 2)
    kj = gl.expand_dims(gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, K3))), 0), 2)
    kw = gl.expand_dims(gl.expand_dims(gl.arange(0, KWT, layout=gl.SliceLayout(0, gl.SliceLayout(1, K3))), 0), 1)
    k_word_off = kt * K_ROW_W + kj * KWT + kw
    KB1: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(0, gl.SliceLayout(0, gl.SliceLayout(0, K_LAY))))
    # per key code b [1, 1, 1, 1, HALF] (:func:`_asm`): codes above bit 10 - bits read the word shifted right by 6
    kpos = K_BITS * gl.arange(0, HALF, layout=KB1)
    kshift = gl.where(kpos + K_BITS > 10, 6, 0)
    kpos = kpos - kshift
    kmask = ((1 << K_BITS) - 1) << kpos
    kmagic = (25 - kpos) << 10  # the fp16 bits of 2**(10 - pos)
    kcode = (_dims4(kshift), _dims4(kmask | (kmask << 16)), _dims4(kmagic | (kmagic << 16)))
    sj = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, KS_LAY))))
    sw = gl.arange(0, KWT, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, KS_LAY))))
    sp = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, KS_LAY))))
    sb = gl.arange(0, HALF // 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, KS_LAY))))
    kchan = (gl.expand_dims(gl.expand_dims(gl.expand_dims(sj, 1), 2), 3) * (CPT // 2)  # word of channels 2i, 2i + 1
             + gl.expand_dims(gl.expand_dims(gl.expand_dims(sw, 0), 2), 3) * (KPW // 2)
             + gl.expand_dims(gl.expand_dims(gl.expand_dims(sp, 0), 1), 3) * (HALF // 2)
             + gl.expand_dims(gl.expand_dims(gl.expand_dims(sb, 0), 1), 2))
    # values: words [G, 8, VWT] and their value channel group (a word's codes share one, V_GROUP >= 16), and per
    # code [1, 8, VWT, VCW] the byte of its word (PRMT selector: into bytes 0 and 2), its mask and magic
    W3: gl.constexpr = gl.SliceLayout(3, V_LAY)
    vt = gl.expand_dims(gl.expand_dims(gl.arange(0, G, layout=gl.SliceLayout(1, gl.SliceLayout(2, W3))), 1), 2)
    vn = gl.expand_dims(gl.expand_dims(gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, W3))), 0), 2)
    vw = gl.expand_dims(gl.expand_dims(gl.arange(0, VWT, layout=gl.SliceLayout(0, gl.SliceLayout(1, W3))), 0), 1)
    v_chan0 = vn * CPTV + vw * VCW
    v_word_off = vt * V_ROW_W + v_chan0 // VPW
    v_scale_off = vt * NVG + v_chan0 // V_GROUP
    VS: gl.constexpr = gl.SliceLayout(0, V_LAY)
    vn2 = gl.expand_dims(gl.expand_dims(gl.arange(0, 8, layout=gl.SliceLayout(1, gl.SliceLayout(2, VS))), 1), 2)
    vw2 = gl.expand_dims(gl.expand_dims(gl.arange(0, VWT, layout=gl.SliceLayout(0, gl.SliceLayout(2, VS))), 0), 2)
    vb2 = gl.expand_dims(gl.expand_dims(gl.arange(0, VCW, layout=gl.SliceLayout(0, gl.SliceLayout(1, VS))), 0), 1)
    v_pos = ((vn2 * CPTV + vw2 * VCW + vb2) % VPW) * V_BITS  # first bit of the code in its word
    v_sel = gl.expand_dims((v_pos // 8) | ((v_pos // 8 + 4) << 8), 0)
    vmask = ((1 << V_BITS) - 1) << (v_pos % 8)
    vmagic = (25 - v_pos % 8) << 10
    vcode = (gl.expand_dims(vmask | (vmask << 16), 0), gl.expand_dims(vmagic | (vmagic << 16), 0))

    if (q_len == 1) & (seq_len > 0) & live:
        p = seq_len - 1
        n_full = p // G  # complete groups, all read from records
        if WORK_LIST:  # the item's end clamped to the device's group count (the host's may be an upper bound)
            g_lo = gl.load(item + 2)
            g_hi = gl.minimum(n_full, gl.load(item + 3))
        else:
            per_split = gl.cdiv(n_full, NUM_SPLITS)
            g_lo = split * per_split
            g_hi = gl.minimum(n_full, g_lo + per_split)
        # q as an MMA operand in fp16 as the model gave it (a bf16 or fp16 query is exact in fp16; the softmax scale
        # and log2(e) multiply the float32 scores instead: folded into q they rounded it, which doubled the error at
        # sharp attention, benchmarks/tc_rounding.py); MMA index k = 16 kc + 8 e + 2 j + p is channel
        # j * CPT + w * KPW + p * HALF + b with w * HALF + b = 2 kc + e
        # transposed: the B operand [D (k), NP]; else the A operand [16, D (k)]
        QOP: gl.constexpr = B16 if TRANSPOSED else A16
        qk = gl.arange(0, D, layout=gl.SliceLayout(1 - CA, QOP))
        qr = gl.arange(0, NQ, layout=gl.SliceLayout(CA, QOP))
        pair = (qk // 16) * 2 + (qk // 8) % 2
        qch = ((qk // 2) % 4) * CPT + (pair // HALF) * KPW + (qk % 2) * HALF + pair % HALF
        q = gl.load(q_ptr + q_start * stride_qt + gl.expand_dims(h * QPK + qr, CA) * stride_qh
                    + gl.expand_dims(qch, 1 - CA), mask=gl.expand_dims(qr < QPK, CA), other=0.0).to(gl.float32)
        q = gl.minimum(gl.maximum(q, -65504.0), 65504.0).to(gl.float16)
        qscale = sm_scale * LOG2E_TC
        bt_row = block_table_ptr + r * stride_bt
        g_last = gl.maximum(g_hi - 1, 0)  # clamps the look-ahead loads to a group of this range (any page is valid)
        if STAGES > 0:  # key codes, key scale/min and value codes through STAGES shared-memory buffers (cp.async)
            kc_s = gl.allocate_shared_memory(gl.int32, [STAGES, G, K_ROW_W], SMEM2)  # layouts: of one stage
            ks_s = gl.allocate_shared_memory(gl.float16, [STAGES, D], SMEM1)
            km_s = gl.allocate_shared_memory(gl.float16, [STAGES, D], SMEM1)
            vc_s = gl.allocate_shared_memory(gl.int32, [STAGES, G, V_ROW_W], SMEM2)
            kc_off = (gl.expand_dims(gl.arange(0, G, layout=gl.SliceLayout(1, KC_COPY)), 1) * K_ROW_W
                      + gl.expand_dims(gl.arange(0, K_ROW_W, layout=gl.SliceLayout(0, KC_COPY)), 0))
            vc_off = (gl.expand_dims(gl.arange(0, G, layout=gl.SliceLayout(1, VC_COPY)), 1) * V_ROW_W
                      + gl.expand_dims(gl.arange(0, V_ROW_W, layout=gl.SliceLayout(0, VC_COPY)), 0))
            ks_off = gl.arange(0, D, layout=KS_COPY)
            for i in gl.static_range(STAGES - 1):
                _copy_record(kc_s, ks_s, km_s, vc_s, i, kv_ptr, bt_row, gl.minimum(g_lo + i, g_last), h,
                             stride_cache_block, stride_cache_head, kc_off, ks_off, vc_off, GROUPS_PER_PAGE,
                             RECORD_BYTES, OFF_KC, OFF_KS, OFF_KM, OFF_VC)
            vs_n, vm_n = _load_value_scales(
                _record_ptr(kv_ptr, bt_row, gl.minimum(g_lo, g_last), h, stride_cache_block, stride_cache_head,
                            GROUPS_PER_PAGE, RECORD_BYTES), v_scale_off, OFF_VS, OFF_VM)
            for g in range(g_lo, g_hi):
                st = (g - g_lo) % STAGES
                gl.thread_barrier()  # every lane has read the stage the next copy overwrites (last iteration's)
                _copy_record(kc_s, ks_s, km_s, vc_s, (st + STAGES - 1) % STAGES, kv_ptr, bt_row,
                             gl.minimum(g + STAGES - 1, g_last), h, stride_cache_block, stride_cache_head, kc_off,
                             ks_off, vc_off, GROUPS_PER_PAGE, RECORD_BYTES, OFF_KC, OFF_KS, OFF_KM, OFF_VC)
                vs, vm = vs_n, vm_n
                vs_n, vm_n = _load_value_scales(
                    _record_ptr(kv_ptr, bt_row, gl.minimum(g + 1, g_last), h, stride_cache_block, stride_cache_head,
                                GROUPS_PER_PAGE, RECORD_BYTES), v_scale_off, OFF_VS, OFF_VM)
                async_copy.wait_group(STAGES - 1)  # this lane's copies of group g have landed
                gl.thread_barrier()  # and every other lane's
                kwords = kc_s.index(st).reshape([G, 4, KWT]).load(K3)
                ks = ks_s.index(st)._reinterpret(gl.int32, [D // 2], SMEM1).reshape([4, KWT, 2, HALF // 2]).load(
                    KS_LAY)
                km = km_s.index(st)._reinterpret(gl.int32, [D // 2], SMEM1).reshape([4, KWT, 2, HALF // 2]).load(
                    KS_LAY)
                vwords = vc_s.index(st).reshape([G, 8, VWT]).load(W3)
                m_i, l_i, acc = _group_step(q, kwords, ks, km, vwords, vs, vm, m_i, l_i, acc, kcode, v_sel, vcode,
                                            qscale, K_LAY, KP_LAY, B16, A16, MMA, KEY_ASM, VAL_ASM, G, D, KWT, HALF,
                                            CPTV, RESCALE_SLACK, TRANSPOSED)
            async_copy.wait_group(0)
        else:
            if PREFETCH:  # the first group's record; each iteration then loads the next one's before its own math
                kw_n, ks_n, km_n, vw_n, vs_n, vm_n = _load_record(
                    kv_ptr, bt_row, gl.minimum(g_lo, g_last), h, stride_cache_block,
                    stride_cache_head, k_word_off, kchan, v_word_off, v_scale_off, GROUPS_PER_PAGE, RECORD_BYTES,
                    OFF_KC, OFF_KS, OFF_KM, OFF_VC, OFF_VS, OFF_VM)
            for g in range(g_lo, g_hi):
                if PREFETCH:
                    kwords, ks, km, vwords, vs, vm = kw_n, ks_n, km_n, vw_n, vs_n, vm_n
                    kw_n, ks_n, km_n, vw_n, vs_n, vm_n = _load_record(
                        kv_ptr, bt_row, gl.minimum(g + 1, g_hi - 1), h, stride_cache_block, stride_cache_head,
                        k_word_off, kchan, v_word_off, v_scale_off, GROUPS_PER_PAGE, RECORD_BYTES, OFF_KC, OFF_KS,
                        OFF_KM, OFF_VC, OFF_VS, OFF_VM)
                else:
                    kwords, ks, km, vwords, vs, vm = _load_record(
                        kv_ptr, bt_row, g, h, stride_cache_block, stride_cache_head, k_word_off, kchan, v_word_off,
                        v_scale_off, GROUPS_PER_PAGE, RECORD_BYTES, OFF_KC, OFF_KS, OFF_KM, OFF_VC, OFF_VS, OFF_VM)
                m_i, l_i, acc = _group_step(q, kwords, ks, km, vwords, vs, vm, m_i, l_i, acc, kcode, v_sel, vcode,
                                            qscale, K_LAY, KP_LAY, B16, A16, MMA, KEY_ASM, VAL_ASM, G, D, KWT, HALF,
                                            CPTV, RESCALE_SLACK, TRANSPOSED)

    rows = gl.arange(0, NQ, layout=ROW_LAY)
    rmask = (rows < QPK) & live
    base = (r * (QPK * gl.num_programs(1)) + h * QPK + rows) * NUM_SPLITS + split
    gl.store(part_m_ptr + base, m_i, mask=rmask)
    gl.store(part_l_ptr + base, l_i, mask=rmask)
    on = gl.arange(0, D, layout=gl.SliceLayout(1 - CA, MMA))  # acc's channel n is (n % 8) * CPTV + n // 8
    gl.store(part_acc_ptr + gl.expand_dims(base, CA) * HEAD_PAD + gl.expand_dims((on % 8) * CPTV + on // 8, 1 - CA),
             acc, mask=gl.expand_dims(rmask, CA))


def tc_kernel():
    """The Gluon kernel object (launched by :func:`.decode.decode`, compiled by ``benchmarks/kernel_resources.py``)."""
    return _decode_tc_kernel
