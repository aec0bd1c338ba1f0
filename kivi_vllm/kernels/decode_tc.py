"""Decode attention on tensor cores with register operands (Triton Gluon): the "tc" kernel.

The same attention over complete groups as ``_decode_fma_kernel`` in :mod:`.decode` (one program per request, KV
head and split; the open group and the reduction are that module's launches), but both products run as
``mma.sync.m16n8k8`` TF32 MMAs whose operands are built in registers, never through shared memory:

* scores ``S = q . K^T``: A = the query heads of the KV head, padded to 16 rows, loaded once; B = the group's keys,
  dequantized as ``f * (4 s) + (m - 4 s)`` per channel (``f = 1 + code / 2**bits`` from a shift and a LOP3,
  :func:`.common.unit_floats`' exponent trick);
* output ``O += P . V``: A = the probabilities, taken from the score accumulator's registers; B = the group's
  values, dequantized per token and channel group the same way.

Plain Triton picks the MMA operand layouts itself and moves a dequantized tile through shared memory to reach them
(the old MMA kernel: 226 LDS per group, docs/benchmarks.md); Gluon (Triton 3.6 ``triton.experimental.gluon``)
lets the kernel say where every element lives. The packed words are loaded in a layout chosen so that each thread
loads the words whose codes it holds in the MMA fragment (PTX ISA, "Matrix Fragments for mma.m16n8k8" with .tf32:
a thread holds B rows ``k = lane % 4`` and ``lane % 4 + 4`` of column ``n = lane / 4``; A rows ``lane / 4`` and
``+ 8``, columns ``lane % 4`` and ``+ 4``; C rows ``lane / 4`` and ``+ 8``, columns ``2 (lane % 4)`` and ``+ 1``).
That needs the reduction index of each product in a permuted order, which is free because a dot product does not
care about the order of its terms:

* keys: MMA index ``k = 8 kc + 4 e + j`` is channel ``j * D/4 + 2 kc + e``, so thread ``j`` holds a contiguous
  quarter of the channels of each of its tokens (whole packed words, one vector load);
* values: MMA index ``k' = 8 kc + 4 e + j`` is token ``8 kc + 2 j + e``, exactly where the score accumulator keeps
  token ``8 kc + 2 j + e`` (C column ``2 (lane % 4) + e``), so P goes from accumulator to A operand without moving;
  output column ``n`` is channel ``(n % 8) * D/8 + n // 8``, so a thread's value codes are contiguous in a row.

Every such re-indexing is a ``reshape``/``permute`` of a tensor followed by ``convert_layout(...,
assert_trivial=True)``: the compiler refuses to build the kernel if any of them would move data between threads.

No interpreter runs Gluon, so this kernel is checked on the GPU (``scripts/kernel_sweep.py``,
``scripts/decode_kernels_check.py``) against the float64 reference; on the CPU :func:`.decode.decode` never picks it.
"""

from __future__ import annotations

import math

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from ..layout import PageLayout

LOG2E_TC = gl.constexpr(1.4426950408889634)


def _bits(n: int) -> list[int]:
    """Powers of two below n (n a power of two): the bases of one dimension."""
    return [1 << i for i in range(int(math.log2(n)))]


def _basis(rank: int, dim: int, value: int) -> list[int]:
    b = [0] * rank
    b[dim] = value
    return b


def supports(layout: PageLayout, qpk: int) -> str | None:
    """None if the "tc" kernel handles this layout and GQA ratio, else the reason it does not: at most 16 query
    heads per KV head (one MMA row tile), head size 32, 64 or 128 (powers of two; the [16, head] fp32 output
    accumulator is 64 registers per thread at 128), group size 16 to 128."""
    d = layout.head_size
    if qpk > 16:
        return f"{qpk} query heads per KV head (at most 16)"
    if d not in (32, 64, 128):
        return f"head size {d} (32, 64 or 128)"
    if layout.group_size % 8 or layout.group_size < 16:
        return f"group size {layout.group_size}"
    return None


def tc_constexprs(layout: PageLayout, qpk: int, num_splits: int) -> dict:
    """Constexprs of :func:`_decode_tc_kernel` for ``layout``: the kernel's register layouts (Gluon
    ``DistributedLinearLayout``s of the packed words, built so that the codes land where the MMA fragments want
    them) and the page offsets."""
    from .common import layout_args

    G, D = layout.group_size, layout.head_size
    kb, vb = layout.k_bits, layout.v_bits
    # keys: [G tokens, 4 (j), KWT words, KCW codes]; thread (j = lane % 4, token lane / 4 + 8 r) holds channels
    # j * D/4 .. (j + 1) * D/4 - 1 of its tokens
    cpt = D // 4
    kcw = min(32 // kb, cpt)
    kwt = cpt // kcw
    lane_k = [_basis(4, 1, 1), _basis(4, 1, 2), _basis(4, 0, 1), _basis(4, 0, 2), _basis(4, 0, 4)]
    reg_k = ([_basis(4, 3, v) for v in _bits(kcw)] + [_basis(4, 2, v) for v in _bits(kwt)]
             + [_basis(4, 0, v) for v in _bits(G) if v >= 8])
    # values: [G tokens, 8 (n0), VWT words, VCW codes]; token t = 8 kc + 2 j + e (lane % 4 = j), n0 = lane / 4;
    # thread holds channels n0 * D/8 .. (n0 + 1) * D/8 - 1 of tokens 2 j, 2 j + 1 of every 8
    cptv = D // 8
    vcw = min(32 // vb, cptv)
    vwt = cptv // vcw
    lane_v = [_basis(4, 0, 2), _basis(4, 0, 4), _basis(4, 1, 1), _basis(4, 1, 2), _basis(4, 1, 4)]
    reg_v = ([_basis(4, 3, v) for v in _bits(vcw)] + [_basis(4, 2, v) for v in _bits(vwt)] + [_basis(4, 0, 1)]
             + [_basis(4, 0, v) for v in _bits(G) if v >= 8])
    k_lay = gl.DistributedLinearLayout(reg_bases=reg_k, lane_bases=lane_k, warp_bases=[], block_bases=[],
                                       shape=[G, 4, kwt, kcw])
    v_lay = gl.DistributedLinearLayout(reg_bases=reg_v, lane_bases=lane_v, warp_bases=[], block_bases=[],
                                       shape=[G, 8, vwt, vcw])
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    return dict(QPK=qpk, NUM_SPLITS=num_splits, SLOTS=num_splits + 1, K_LAY=k_lay, V_LAY=v_lay, MMA=mma,
                KWT=kwt, KCW=kcw, VWT=vwt, VCW=vcw, **layout_args(layout))


@gluon.jit
def _unit(words, sh, one_bits, BITS: gl.constexpr):
    """float32 ``1 + code / 2**BITS`` of the code starting at bit ``sh`` of ``words`` (a shift and a LOP3; see
    :func:`.common.unit_floats`)."""
    MANT: gl.constexpr = 23 - BITS
    x = (words << gl.maximum(MANT - sh, 0)) >> gl.maximum(sh - MANT, 0)
    return ((x & (((1 << BITS) - 1) << MANT)) | one_bits).to(gl.float32, bitcast=True)


@gluon.jit
def _decode_tc_kernel(
    q_ptr, kv_ptr, block_table_ptr, seq_lens_ptr, qsl_ptr,
    part_m_ptr, part_l_ptr, part_acc_ptr, sm_scale, one_bits,
    stride_qt, stride_qh, stride_cache_block, stride_cache_head, stride_bt,
    QPK: gl.constexpr, NUM_SPLITS: gl.constexpr, SLOTS: gl.constexpr,
    K_LAY: gl.constexpr, V_LAY: gl.constexpr, MMA: gl.constexpr,
    KWT: gl.constexpr, KCW: gl.constexpr, VWT: gl.constexpr, VCW: gl.constexpr,
    BLOCK_SIZE: gl.constexpr, GROUP_SIZE: gl.constexpr, HEAD_SIZE: gl.constexpr, HEAD_PAD: gl.constexpr,
    K_BITS: gl.constexpr, V_BITS: gl.constexpr, V_GROUP: gl.constexpr, RECORD_BYTES: gl.constexpr,
    OFF_KC: gl.constexpr, OFF_KS: gl.constexpr, OFF_KM: gl.constexpr, OFF_VC: gl.constexpr,
    OFF_VS: gl.constexpr, OFF_VM: gl.constexpr, OFF_KSTAGE: gl.constexpr, OFF_VSTAGE: gl.constexpr,
    RESIDUAL_KV: gl.constexpr,
):
    G: gl.constexpr = GROUP_SIZE
    D: gl.constexpr = HEAD_SIZE
    GROUPS_PER_PAGE: gl.constexpr = BLOCK_SIZE // GROUP_SIZE
    K_ROW_W: gl.constexpr = HEAD_SIZE * K_BITS // 32  # 32-bit words per packed key row
    V_ROW_W: gl.constexpr = HEAD_SIZE * V_BITS // 32
    KPW: gl.constexpr = 32 // K_BITS
    VPW: gl.constexpr = 32 // V_BITS
    CPT: gl.constexpr = D // 4  # key channels per thread (j)
    CPTV: gl.constexpr = D // 8  # value channels per thread (n0)
    NVG: gl.constexpr = D // V_GROUP
    A_LAY: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=1)
    B_LAY: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=1)
    ROW_LAY: gl.constexpr = gl.SliceLayout(1, MMA)

    r = gl.program_id(0)
    h = gl.program_id(1)
    split = gl.program_id(2)
    q_start = gl.load(qsl_ptr + r).to(gl.int64)
    q_len = gl.load(qsl_ptr + r + 1) - q_start
    seq_len = gl.load(seq_lens_ptr + r)

    m_i = gl.full([16], float("-inf"), gl.float32, ROW_LAY)
    l_i = gl.full([16], 0.0, gl.float32, ROW_LAY)
    acc = gl.full([16, D], 0.0, gl.float32, MMA)

    # --- index tensors, loop invariant ------------------------------------------------------------------------
    # keys [G, 4, KWT, KCW]: token, j, word of the thread, code of the word
    K3: gl.constexpr = gl.SliceLayout(3, K_LAY)
    kt = gl.expand_dims(gl.expand_dims(gl.arange(0, G, layout=gl.SliceLayout(1, gl.SliceLayout(2, K3))), 1), 2)
    kj = gl.expand_dims(gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, K3))), 0), 2)
    kw = gl.expand_dims(gl.expand_dims(gl.arange(0, KWT, layout=gl.SliceLayout(0, gl.SliceLayout(1, K3))), 0), 1)
    k_word_off = kt * K_ROW_W + (kj * CPT + kw * KCW) // KPW  # [G, 4, KWT] word of each (token, j, word)
    KS: gl.constexpr = gl.SliceLayout(0, K_LAY)  # [4, KWT, KCW]: per-channel scale/min, broadcast over tokens
    kj2 = gl.expand_dims(gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, KS))), 1), 2)
    kw2 = gl.expand_dims(gl.expand_dims(gl.arange(0, KWT, layout=gl.SliceLayout(0, gl.SliceLayout(2, KS))), 0), 2)
    kb2 = gl.expand_dims(gl.expand_dims(gl.arange(0, KCW, layout=gl.SliceLayout(0, gl.SliceLayout(1, KS))), 0), 1)
    kchan = kj2 * CPT + kw2 * KCW + kb2  # [4, KWT, KCW] channel
    k_sh = gl.expand_dims((kchan % KPW) * K_BITS, 0)  # [1, 4, KWT, KCW] first bit of each code in its word
    # values [G, 8, VWT, VCW]: token, n0, word of the thread, code of the word
    V3: gl.constexpr = gl.SliceLayout(3, V_LAY)
    vt = gl.expand_dims(gl.expand_dims(gl.arange(0, G, layout=gl.SliceLayout(1, gl.SliceLayout(2, V3))), 1), 2)
    vn = gl.expand_dims(gl.expand_dims(gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, V3))), 0), 2)
    vw = gl.expand_dims(gl.expand_dims(gl.arange(0, VWT, layout=gl.SliceLayout(0, gl.SliceLayout(1, V3))), 0), 1)
    vchan0 = vn * CPTV + vw * VCW  # [1, 8, VWT] first channel of each word
    v_word_off = vt * V_ROW_W + vchan0 // VPW  # [G, 8, VWT]
    v_scale_off = vt * NVG + vchan0 // V_GROUP  # [G, 8, VWT] (a word's codes share a value channel group)
    VS: gl.constexpr = gl.SliceLayout(0, V_LAY)  # [8, VWT, VCW]
    vn2 = gl.expand_dims(gl.expand_dims(gl.arange(0, 8, layout=gl.SliceLayout(1, gl.SliceLayout(2, VS))), 1), 2)
    vw2 = gl.expand_dims(gl.expand_dims(gl.arange(0, VWT, layout=gl.SliceLayout(0, gl.SliceLayout(2, VS))), 0), 2)
    vb2 = gl.expand_dims(gl.expand_dims(gl.arange(0, VCW, layout=gl.SliceLayout(0, gl.SliceLayout(1, VS))), 0), 1)
    v_sh = gl.expand_dims(((vn2 * CPTV + vw2 * VCW + vb2) % VPW) * V_BITS, 0)  # [1, 8, VWT, VCW]

    if (q_len == 1) & (seq_len > 0):
        p = seq_len - 1
        n_full = p // G
        per_split = gl.cdiv(n_full, NUM_SPLITS)
        g_lo = split * per_split
        g_hi = gl.minimum(n_full, g_lo + per_split)
        # q as the A operand: row = query head of this KV head (padded to 16), MMA index k -> channel
        # j * CPT + 2 kc + e with k = 8 kc + 4 e + j
        qr = gl.arange(0, 16, layout=gl.SliceLayout(1, A_LAY))
        qk = gl.arange(0, D, layout=gl.SliceLayout(0, A_LAY))
        qch = (qk % 4) * CPT + (qk // 8) * 2 + (qk // 4) % 2
        q = gl.load(q_ptr + q_start * stride_qt + gl.expand_dims(h * QPK + qr, 1) * stride_qh
                    + gl.expand_dims(qch, 0), mask=gl.expand_dims(qr < QPK, 1), other=0.0).to(gl.float32)
        q = q * (sm_scale * LOG2E_TC)
        bt_row = block_table_ptr + r * stride_bt
        for g in range(g_lo, g_hi):
            blk = gl.load(bt_row + g // GROUPS_PER_PAGE).to(gl.int64)
            rec = kv_ptr + blk * stride_cache_block + h * stride_cache_head + (g % GROUPS_PER_PAGE) * RECORD_BYTES
            kwords = gl.load((rec + OFF_KC).to(gl.pointer_type(gl.int32)) + k_word_off)  # [G, 4, KWT]
            ks = gl.load((rec + OFF_KS).to(gl.pointer_type(gl.float16)) + kchan).to(gl.float32)  # [4, KWT, KCW]
            km = gl.load((rec + OFF_KM).to(gl.pointer_type(gl.float16)) + kchan).to(gl.float32)
            vwords = gl.load((rec + OFF_VC).to(gl.pointer_type(gl.int32)) + v_word_off)  # [G, 8, VWT]
            vs = gl.load((rec + OFF_VS).to(gl.pointer_type(gl.float16)) + v_scale_off).to(gl.float32)
            vm = gl.load((rec + OFF_VM).to(gl.pointer_type(gl.float16)) + v_scale_off).to(gl.float32)
            # keys, dequantized: f * (s * 2**bits) + (m - s * 2**bits), then to the B operand [D (k), G]
            ks = ks * (1 << K_BITS)
            kf = _unit(gl.expand_dims(kwords, 3), k_sh, one_bits, K_BITS)  # [G, 4, KWT, KCW]
            kd = kf * gl.expand_dims(ks, 0) + gl.expand_dims(km - ks, 0)
            kd = gl.reshape(kd, [G, 4, CPT // 2, 2])  # channel j * CPT + 2 kc + e
            kd = gl.reshape(gl.permute(kd, (2, 3, 1, 0)), [D, G])  # k = 8 kc + 4 e + j
            kd = gl.convert_layout(kd, B_LAY, assert_trivial=True)
            s = mma_v2(q, kd, gl.full([16, G], 0.0, gl.float32, MMA), input_precision="tf32")
            m_new = gl.maximum(m_i, gl.max(s, axis=1))
            alpha = gl.exp2(m_i - m_new)
            prob = gl.exp2(s - gl.expand_dims(m_new, 1))
            l_i = l_i * alpha + gl.sum(prob, axis=1)
            # P as the A operand: token 8 kc + 2 j + e sits at MMA index 8 kc + 4 e + j
            pa = gl.reshape(prob, [16, G // 8, 4, 2])
            pa = gl.reshape(gl.permute(pa, (0, 1, 3, 2)), [16, G])
            pa = gl.convert_layout(pa, A_LAY, assert_trivial=True)
            # values, dequantized per token and channel group, then to the B operand [G (k'), D (n)]
            vs = vs * (1 << V_BITS)
            vf = _unit(gl.expand_dims(vwords, 3), v_sh, one_bits, V_BITS)  # [G, 8, VWT, VCW]
            vd = vf * gl.expand_dims(vs, 3) + gl.expand_dims(vm - vs, 3)
            vd = gl.reshape(vd, [G // 8, 4, 2, 8, CPTV])  # token 8 kc + 2 j + e, channel n0 * CPTV + c
            vd = gl.reshape(gl.permute(vd, (0, 2, 1, 4, 3)), [G, D])  # k' = 8 kc + 4 e + j, n = 8 c + n0
            vd = gl.convert_layout(vd, B_LAY, assert_trivial=True)
            acc = mma_v2(pa, vd, acc * gl.expand_dims(alpha, 1), input_precision="tf32")
            m_i = m_new

    rows = gl.arange(0, 16, layout=ROW_LAY)
    rmask = rows < QPK
    base = (r * (QPK * gl.num_programs(1)) + h * QPK + rows) * SLOTS + split
    gl.store(part_m_ptr + base, m_i, mask=rmask)
    gl.store(part_l_ptr + base, l_i, mask=rmask)
    on = gl.arange(0, D, layout=gl.SliceLayout(0, MMA))
    och = (on % 8) * CPTV + on // 8  # output column n is channel (n % 8) * D/8 + n // 8
    gl.store(part_acc_ptr + gl.expand_dims(base, 1) * HEAD_PAD + gl.expand_dims(och, 0), acc,
             mask=gl.expand_dims(rmask, 1))


def tc_kernel():
    """The Gluon kernel object (for :mod:`benchmarks.kernel_resources`)."""
    return _decode_tc_kernel


__all__ = ["supports", "tc_constexprs", "tc_kernel"]
_ = triton  # the launcher in .decode uses triton's grid conventions
