"""What can be checked of the GPU kernels without a GPU: their sm_90 (H200) compile, and which decode kernel runs.

Triton compiles for sm_90 on this CPU with its bundled ptxas (``benchmarks/kernel_resources.py``). The "tc" decode
kernel (Gluon) has no interpreter run, so its CPU test is its compile: every re-indexing of its MMA operands is a
``convert_layout(..., assert_trivial=True)`` that fails to compile if it would move data between threads, and its
shared memory must be exactly the staged record bytes (``decode_tc.STAGES``), none for moving operands. The prefill
kernel must fit the H200's 232,448 bytes of shared memory at its default tile for every group and head size it
accepts: 4 groups per bulk step at group 128 asked for 364,548 bytes and
failed to launch on the H200 (2026-11-30). Numerical checks of these kernels run on the GPU
(``scripts/decode_kernels_check.py``, ``scripts/kernel_sweep.py``).

The compiles run in a child Python: without a GPU the test process runs Triton under ``TRITON_INTERPRET=1``
(``tests/conftest.py``), and neither Gluon nor an interpreted kernel can be compiled for a GPU in that process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kivi_vllm.kernels.decode import default_kernel, kernel_for, tc_supports
from kivi_vllm.layout import PageLayout

ROOT = Path(__file__).resolve().parents[1]
H200_SMEM = 232_448  # bytes of shared memory one program may use on sm_90 (the launch error's "Hardware limit")
# head, G, kb, vb, qpk; staged (decode_tc.STAGES): the first and the last three; 1 query head per KV head (MHA,
# the Llama-2-7B shape) and 16 (two 8-column tiles of query heads in the transposed form)
TC_SHAPES = [(128, 32, 2, 2, 4), (64, 16, 4, 2, 8), (128, 64, 4, 4, 6), (64, 128, 2, 4, 3), (128, 32, 4, 4, 4),
             (128, 32, 2, 2, 1), (128, 32, 2, 2, 16)]
PREFILL_SHAPES = [(128, 128, 2), (256, 64, 4), (256, 128, 4)]  # head, G, bits
STORE_SHAPES = [(128, 32, 2, 1, "kv"), (128, 32, 2, 16, "kv"), (256, 128, 4, 16, "kv"), (64, 32, 2, 4, "k")]
# head, G, bits, rows per program, residual

CHILD = """
import json, sys, torch
sys.path.insert(0, "benchmarks")
import importlib, kernel_resources as kr
from kivi_vllm.layout import PageLayout
tc = importlib.import_module("kivi_vllm.kernels.decode_tc")
pre = importlib.import_module("kivi_vllm.kernels.prefill")
out = {"tc": [], "prefill": []}
for head, g, kb, vb, qpk in %(tc)s:
    lay = PageLayout(512, head, kb, vb, g, "kv", torch.bfloat16)
    out["tc"].append(kr.compiled_resources(tc.tc_kernel(), tc.tc_constexprs(lay, qpk, 8), 1))
lay = PageLayout(512, 128, 2, 2, 32, "kv", torch.bfloat16)
out["tc_slack0"] = kr.compiled_resources(tc.tc_kernel(), tc.tc_constexprs(lay, 4, 8, 0.0), 1)
out["tc_work"] = kr.compiled_resources(tc.tc_kernel(), dict(tc.tc_constexprs(lay, 4, 8), WORK_LIST=True), 1)
out["tc_rows16"] = kr.compiled_resources(tc.tc_kernel(), tc.tc_constexprs(lay, 4, 8, transposed=False), 1)
out["slack_errors"] = []
for slack in (16.0, -1.0):
    try:
        tc.tc_constexprs(lay, 4, 8, slack)
        out["slack_errors"].append(None)
    except ValueError as e:
        out["slack_errors"].append(str(e))
for head, g, bits in %(prefill)s:
    lay = PageLayout(512, head, bits, bits, g, "kv", torch.bfloat16)
    r = kr.prefill_resources(bits, 4, pre.block_q_for(8, 2), 4, group_size=g, head_size=head, unpack="words",
                             bulk_groups=None)
    out["prefill"].append(dict(r, default=pre.default_bulk_groups(lay)))
dec = importlib.import_module("kivi_vllm.kernels.decode")
out["pdl"] = {kind: [kr.open_group_resources(2, qpk, kind, dec.OPEN_WARPS_FOR[kind], pdl=pdl) for pdl in (False, True)]
              for kind, qpk in (("light", 1), ("dot", 4))}
out["pdl"]["store"] = [kr.store_resources(2, 16, pdl=pdl) for pdl in (False, True)]
out["pdl"]["tc"] = [kr.compiled_resources(tc.tc_kernel(), dict(tc.tc_constexprs(lay, 4, 8), WORK_LIST=True, PDL=pdl),
                                          1) for pdl in (False, True)]
out["store"] = [kr.store_resources(bits, rpp, group_size=g, head_size=head, residual=res)
                for head, g, bits, rpp, res in %(store)s]
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", CHILD % dict(tc=TC_SHAPES, prefill=PREFILL_SHAPES, store=STORE_SHAPES)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.split("RESULT ", 1)[1])


def staged_bytes(head: int, group: int, k_bits: int, v_bits: int) -> int:
    """Shared memory of the "tc" loop's cp.async stages: per stage one group record's key codes (G x D x k_bits/8),
    fp16 key scale and minimum per channel (2 x 2 x D) and value codes (G x D x v_bits/8); none where the kernel
    does not stage (group size above 32, or value words shared between threads: D/8 below 32/v_bits channels)."""
    from kivi_vllm.kernels.decode_tc import STAGES

    if group > 32 or head // 8 < 32 // v_bits:
        return 0
    return STAGES * (group * head * (k_bits + v_bits) // 8 + 4 * head)


def test_tc_stages_apply_where_supported_and_are_checked():
    """``tc_constexprs`` resolves ``stages`` per layout (0 where :func:`decode_tc.staged_supported` says no) and
    refuses a stage count the loop cannot run (1: nothing to overlap; negative; above 8) for every layout."""
    from kivi_vllm.kernels import decode_tc as tc

    staged = PageLayout(512, 128, 2, 2, 32, "kv", torch.bfloat16)
    unstaged = [PageLayout(512, 128, 4, 4, 64, "kv", torch.bfloat16),  # group above 32
                PageLayout(512, 64, 2, 2, 32, "kv", torch.bfloat16)]  # 8 channels per thread, 16 codes per word
    assert tc.staged_supported(staged) and not any(tc.staged_supported(lay) for lay in unstaged)
    assert [tc.tc_constexprs(staged, 4, 8, stages=s)["STAGES"] for s in (0, 2, 3)] == [0, 2, 3]
    assert all(tc.tc_constexprs(lay, 4, 8, stages=3)["STAGES"] == 0 for lay in unstaged)
    for lay in (staged, *unstaged):
        for bad in (1, -1, 9):
            with pytest.raises(ValueError, match=f"stages must be 0 or 2-8, got {bad}"):
                tc.tc_constexprs(lay, 4, 8, stages=bad)


def tc_mmas(head: int, group: int, qpk: int, transposed: bool = True) -> int:
    """m16n8k16 MMAs per group of the "tc" loop. Transposed (``decode_tc.TRANSPOSED``): scores ``S^T = K q^T``
    (G/16 m-tiles x NP/8 n-tiles x D/16 k-steps, NP = the query heads padded to 8 or 16) and ``O^T = V^T P^T``
    (D/16 x NP/8 x G/16); query heads as 16 rows: scores G/8 n-tiles x D/16 k-steps, P.V D/8 n-tiles x G/16
    k-steps."""
    if transposed:
        np_ = max(8, 1 << (qpk - 1).bit_length())
        return 2 * (group // 16) * (head // 16) * (np_ // 8)
    return (group // 8) * (head // 16) + (head // 8) * (group // 16)


@pytest.mark.parametrize("i", range(len(TC_SHAPES)))
def test_tc_decode_compiles_with_register_operands(compiled, i):
    head, group, kb, vb, qpk = TC_SHAPES[i]
    r = compiled["tc"][i]
    assert r["shared_bytes"] == staged_bytes(head, group, kb, vb)  # the probabilities' transpose: registers only
    assert r["ptx_ops"]["mma.sync"] == tc_mmas(head, group, qpk)


def test_tc_transposed_halves_the_mmas_and_the_accumulator(compiled):
    """At 4 query heads per KV head the transposed loop (query heads padded to 8 columns) runs half the MMAs of the
    16-row form, and its [D, 8] float32 accumulator and [D, 8] query operand leave registers for more programs per
    SM (157 registers and 12 programs against 202 and 9, sm_90, 2026-12-02, before the 3-instruction dequantization;
    now 159 and 12 against 225 and 8); both keep shared memory to the stages."""
    t, rows16 = compiled["tc"][0], compiled["tc_rows16"]  # TC_SHAPES[0]: head 128, G 32, k2v2, 4 per KV head
    assert rows16["ptx_ops"]["mma.sync"] == tc_mmas(128, 32, 4, transposed=False) == 2 * t["ptx_ops"]["mma.sync"]
    assert rows16["shared_bytes"] == t["shared_bytes"] == staged_bytes(128, 32, 2, 2)
    assert t["registers"] <= rows16["registers"] - 32 and t["programs_per_sm"] > rows16["programs_per_sm"]


def test_tc_dequantizes_a_code_pair_in_three_instructions(compiled):
    """Each pair of codes (one fp16x2 MMA operand register) costs one LOP3, one HADD2 and one HFMA2 in the loop, with
    no rotate or shift per pair (``decode_tc._asm``; 4-5 instructions and 108 SHF per group before 2026-12-02), and
    the HFMA2s' scale/minimum pairs are not re-packed at each use (two PRMTs per HFMA2 before: 176 PRMT in all).
    Head 128, G 32, 2 bits: G x D / 32 lanes / 2 = 64 key pairs and 64 value pairs per thread and group."""
    ops = compiled["tc"][0]["loops"][0]["ops"]  # TC_SHAPES[0]; every opcode of the loop
    assert ops["HFMA2"] == ops["HADD2"] == 128
    assert 128 <= ops["LOP3"] <= 136
    assert ops.get("SHF", 0) <= 16 and ops["PRMT"] < 96, ops


@pytest.mark.parametrize("bits", [2, 4])
def test_tc_code_positions_decode_exactly(bits):
    """The arithmetic of ``decode_tc._asm`` on the CPU, in numpy fp16: for every code of a 32-bit key word (codes b
    and b + 16/bits paired in the two 16-bit halves, words shifted right by 6 for codes above bit 10 - bits, as the
    kernel's ``kshift``) and of a value byte (the byte moved to bytes 0 and 2 by PRMT), ``(word & mask) | magic``
    read as two fp16 minus ``2**(10 - pos)`` equals the codes the page layout defines (code i of a word at bits
    ``[i * bits, (i + 1) * bits)``, ``kivi_vllm.layout``), for random words. Fails if a code reached the exponent
    bits or the magic were off by a bit."""
    import numpy as np

    rng = np.random.default_rng(bits)
    words = rng.integers(0, 2**32, size=4096, dtype=np.uint64).astype(np.uint32)

    def code(w, i):  # the layout's rule
        return (w >> np.uint32(i * bits)) & np.uint32((1 << bits) - 1)

    def decode(w, pos):
        assert pos + bits <= 10  # the code inside the mantissa
        mask = ((1 << bits) - 1) << pos
        magic = (25 - pos) << 10  # fp16 bits of 2**(10 - pos)
        t = (w & np.uint32(mask | mask << 16)) | np.uint32(magic | magic << 16)
        halves = t.view(np.uint16).reshape(-1, 2).view(np.float16)  # little-endian: [low half, high half]
        return (halves - np.float16(2.0 ** (10 - pos))).astype(np.float64)

    half = 16 // bits
    for b in range(half):  # keys: codes b (low half) and b + half (high half) of one word
        pos = b * bits
        shift = 6 if pos + bits > 10 else 0
        got = decode(words >> np.uint32(shift), pos - shift)
        assert np.array_equal(got[:, 0], code(words, b)) and np.array_equal(got[:, 1], code(words, b + half)), b
    for i in range(32 // bits):  # values: code i of the words of tokens t and t + 1, its byte moved to bytes 0, 2
        byte, pos = divmod(i * bits, 8)
        w2 = words.reshape(-1, 2)
        gathered = ((w2[:, 0] >> np.uint32(8 * byte)) & np.uint32(0xFF)) | (
            ((w2[:, 1] >> np.uint32(8 * byte)) & np.uint32(0xFF)) << np.uint32(16))
        got = decode(gathered, pos)
        assert np.array_equal(got[:, 0], code(w2[:, 0], i)) and np.array_equal(got[:, 1], code(w2[:, 1], i)), i


def test_tc_rescaling_is_a_branch(compiled):
    """Conditional rescaling (the default slack 8) adds one warp-uniform branch around the output rescale; slack 0
    (rescale whenever the maximum grows) has none. Both keep the register-only operands and the MMA count."""
    slack8, slack0 = compiled["tc"][0], compiled["tc_slack0"]  # TC_SHAPES[0]: head 128, G 32, k2v2, 4 per KV head
    for r in (slack8, slack0):
        assert r["shared_bytes"] == staged_bytes(128, 32, 2, 2) and r["ptx_ops"]["mma.sync"] == 2 * 8 + 8 * 2
    assert slack8["ptx_ops"]["bra"] == slack0["ptx_ops"]["bra"] + 1  # conditional branches (bra.uni: jumps)
    # probabilities reach 2**slack: 2**16 is infinite in fp16
    assert all(e and "rescale_slack must lie in [0, 15]" in e for e in compiled["slack_errors"])


def test_tc_work_list_keeps_the_loop_and_the_programs_per_sm(compiled):
    """The work-list variant of "tc" (what the engine runs) compiles to the split grid's group loop, and fits at
    least the programs per SM that decode.WORK_PROGRAMS_PER_SM sizes its waves with, without local memory."""
    from kivi_vllm.kernels.decode import WORK_PROGRAMS_PER_SM

    split, work = compiled["tc"][0], compiled["tc_work"]
    # the same loop up to register allocation (731 SASS instructions with 2 stages, 2026-12-02)
    assert abs(work["loops"][0]["instructions"] - split["loops"][0]["instructions"]) <= 4
    # 157 registers: 12 programs fit; waves of 12 per SM measured faster at batch 64, slower at 256 than of 8
    # (thirteenth session; 202 registers and 9 before, tenth session: slower than 8)
    assert work["programs_per_sm"] >= WORK_PROGRAMS_PER_SM["tc"]
    loop = work["loops"][0]
    assert work["spill_bytes"] == 0 and loop["ldl"] == 0 and loop["stl"] == 0, (work["spill_bytes"], loop)


@pytest.mark.parametrize("i", range(len(PREFILL_SHAPES)))
def test_prefill_default_tile_fits_h200_shared_memory(compiled, i):
    r = compiled["prefill"][i]
    assert r["bulk_groups"] == r["default"] >= 1
    assert r["shared_bytes"] <= H200_SMEM


def test_attention_path_in_the_startup_log():
    from kivi_vllm.backend.metadata import attention_path_summary

    lay = PageLayout(512, 128, 2, 2, 32, "kv", torch.bfloat16)
    line = attention_path_summary(lay, 32, 8, True, (9, 0))
    assert "decode kernel 'tc' (tensor cores" in line and "4 query heads per KV head" in line
    assert "head size 128, group size 32, compute capability 9.0" in line
    assert "decode kernel 'tc' (tensor cores" in attention_path_summary(lay, 32, 32, True, (9, 0))
    assert "1 query head per KV head" in attention_path_summary(lay, 32, 32, True, (9, 0))
    assert "decode kernel 'fma' (CUDA cores" in attention_path_summary(lay, 32, 32, True, (7, 5))
    assert "decode kernel 'fma'" in attention_path_summary(lay, 32, 8, True, None)  # ROCm: no 'tc'
    assert "PyTorch path" in attention_path_summary(lay, 32, 8, False)
    assert attention_path_summary(lay, 32, 8, False, prefill_rule="exact").endswith("prefill: PyTorch path, exact rule")
    assert line.endswith("; prefill: Triton prefill kernel")  # the streaming rule
    exact = attention_path_summary(lay, 32, 8, True, (9, 0), (True, "FlashAttention 3 (...)"))
    assert exact.endswith("prefill: first chunks by FlashAttention 3 (...), continuation chunks by the Triton prefill kernel")
    assert "FlashAttention not used for first chunks: no build" in attention_path_summary(
        lay, 32, 8, True, (9, 0), (False, "no build"))


def test_default_decode_kernel():
    """'tc' only on NVIDIA sm_80+ (from 1 query head per KV head since the transposed loop), on shapes it supports;
    the others as before."""
    lay = PageLayout(512, 128, 2, 2, 32, "kv", torch.bfloat16)
    assert default_kernel(lay, 4, (9, 0)) == "tc"
    assert default_kernel(lay, 2, (9, 0)) == default_kernel(lay, 3, (9, 0)) == "tc"
    assert default_kernel(lay, 3, None) == kernel_for(3) == "fma"
    assert default_kernel(lay, 8, (8, 0)) == "tc"
    assert default_kernel(lay, 4, None) == kernel_for(4) == "fma"  # CPU or ROCm
    assert default_kernel(lay, 8, (7, 5)) == kernel_for(8) == "mma"
    assert default_kernel(lay, 1, (9, 0)) == "tc"
    assert default_kernel(lay, 1, (7, 5)) == default_kernel(lay, 1, None) == kernel_for(1) == "fma"
    lay96 = PageLayout(512, 96, 2, 2, 32, "kv", torch.bfloat16)
    assert default_kernel(lay96, 4, (9, 0)) == "fma"
    assert tc_supports(lay96, 4) == "head size 96 (64 or 128)"
    assert tc_supports(lay, 32) == "32 query heads per KV head (at most 16)"


def test_pdl_only_on_hopper_outside_the_interpreter(monkeypatch):
    """decode.pdl_for: programmatic dependent launch where griddepcontrol exists (sm_90+) and the kernels are
    compiled (not TRITON_INTERPRET), and only while decode.PDL is on (set_options(pdl=...))."""
    import importlib

    dec = importlib.import_module("kivi_vllm.kernels.decode")
    cap = {"v": (9, 0)}
    monkeypatch.setattr(dec, "cuda_capability", lambda device: cap["v"])
    monkeypatch.setattr(dec, "PDL", True)
    monkeypatch.setattr(dec, "OPEN_WARPS", None)  # set_options below sets it: restored after the test
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    gpu = torch.device("cuda")
    assert dec.pdl_for(gpu)
    cap["v"] = (8, 9)
    assert not dec.pdl_for(gpu)
    cap["v"] = None  # CPU, ROCm
    assert not dec.pdl_for(torch.device("cpu"))
    cap["v"] = (9, 0)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not dec.pdl_for(gpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert dec.pdl_for(gpu)
    dec.set_options(pdl=False)
    assert not dec.pdl_for(gpu) and dec.PDL is False
    dec.set_options(open_warps=4)  # None leaves it off
    assert not dec.pdl_for(gpu)


def test_tc_decode_refuses_the_cpu():
    from kivi_vllm.kernels.decode import decode

    lay = PageLayout(64, 64, 2, 2, 16, "kv", torch.float32)
    q = torch.zeros(1, 4, 64)
    kv = torch.zeros(1, 1, 64)
    cache = torch.zeros(1, 1, lay.page_bytes, dtype=torch.uint8)
    with pytest.raises(ValueError, match="compute capability 8.0 or newer only"):
        decode(q, kv, kv, cache, torch.zeros(1, 1, dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32),
               torch.tensor([1], dtype=torch.int32), lay, 0.125, torch.zeros_like(q), kernel="tc")


def test_builder_fills_the_work_buffers_in_place():
    """The metadata builder's decode work list (what "tc" reads under CUDA graphs): each step's list lands in the
    same device buffers (a captured graph replays their addresses), equals decode_work's for that step, and without
    host sequence lengths every decode request gets one item running to the end."""
    import numpy as np

    from kivi_vllm.backend.metadata import KiviMetadataBuilder
    from kivi_vllm.kernels.decode import WORK_END, decode_work, work_capacity

    b = object.__new__(KiviMetadataBuilder)  # no vLLM config: only the state _fill_work reads
    b.layout = PageLayout(512, 128, 2, 2, 32, "kv", torch.bfloat16)
    b.decode_kernel, b.num_kv_heads, b.work_wave, b.work_reqs = "tc", 8, 1056, 64
    b.work = (torch.full((work_capacity(64, 8, 1056), 4), -1, dtype=torch.int32), torch.zeros(64, dtype=torch.int32))
    ptrs = (b.work[0].data_ptr(), b.work[1].data_ptr())
    for n, seq in ((3, np.array([4096, 100, 33])), (5, np.array([16384, 1024, 0, 2048, 40]))):
        qsl = np.arange(n + 1)
        items, counts = b._fill_work(qsl, seq, n)
        want_items, want_counts = decode_work(qsl, seq, 32, n, 8, 1056, 32)
        assert (items.data_ptr(), counts.data_ptr()) == ptrs
        assert torch.equal(items, torch.from_numpy(want_items)) and torch.equal(counts, torch.from_numpy(want_counts))
    items, counts = b._fill_work(np.array([0, 1, 8, 9]), None, 3)  # request 1 is a 7-token chunk
    assert counts.tolist() == [1, 0, 1] and items[:2, 0].tolist() == [0, 2] and (items[:2, 3] == WORK_END).all()


@pytest.mark.parametrize("i", range(len(STORE_SHAPES)))
def test_store_compiles_without_spill_or_per_element_division(compiled, i):
    """The store kernel compiles for sm_90 at 1-16 rows per program (the interpreter runs any Python; Triton's
    compiler refuses, e.g., a loop variable whose type changes), fits the shared memory, spills nothing up to group
    x head 32 x 128, and quantizes with a reciprocal per group: fewer float32 divisions than a thread's key and
    value elements of one group (2 G D / 128 with 4 warps), each of which took a division before the twelfth
    session. At group 128 x head 256 (a [128, 256] tile, 256 elements per thread per tensor) it spills, less than
    the 4,532 bytes of the kernel before that session (the kernel sweep checks that shape's bytes on the GPU)."""
    head, group, _, _, _ = STORE_SHAPES[i]
    r = compiled["store"][i]
    assert r["shared_bytes"] <= H200_SMEM
    assert r["spill_bytes"] == 0 if group * head <= 32 * 128 else r["spill_bytes"] < 4532, r["spill_bytes"]
    assert 0 < r["ptx_ops"]["div.rn.f32"] < 2 * group * head // 128, r["ptx_ops"]


def test_open_group_overlaps_the_first_kernel_with_pdl(compiled):
    """decode.PDL: the "tc" kernel lets its dependent start (one launch_dependents), and the open group's launch,
    both forms at their shipped warps, loads its open group before it waits for the slots (griddepcontrol.wait on
    both of its paths, the program with a one-token request and the one without) and reads the slots (max, sum,
    accumulator) only after it, and lets the store after it start; without PDL none of these instructions is
    there, and the figures that decide the programs per SM stay (registers, shared memory, the loop's
    instructions)."""
    for kind in ("light", "dot"):
        off, on = compiled["pdl"][kind]
        assert "griddepcontrol.wait" not in off["ptx_ops"] and off["loads_before_wait"] is None
        assert "griddepcontrol.launch_dependents" not in off["ptx_ops"]
        assert on["ptx_ops"]["griddepcontrol.wait"] == 2, on["ptx_ops"]
        assert on["ptx_ops"]["griddepcontrol.launch_dependents"] == 1, on["ptx_ops"]
        # the request's bounds, block-table entry, the stage rows and this step's key/value come first
        assert on["loads_before_wait"] >= 5, (kind, on["loads_before_wait"])
        # nothing is written, and no slot is read (plain or cp.async), before the first kernel is done
        assert on["stores_before_wait"] == 0 and on["async_before_wait"] == 0, on
        assert on["stores_in_block_before_waits"] == [0, 0], on
        slot_reads = on["loads_after_wait"] + on["ptx_ops"].get("cp.async", 0) - on["async_before_wait"]
        assert slot_reads >= 3, (kind, on["loads_after_wait"], on["ptx_ops"])
        assert on["registers"] == off["registers"] and on["shared_bytes"] == off["shared_bytes"]
    off, on = compiled["pdl"]["tc"]
    assert "griddepcontrol.launch_dependents" not in off["ptx_ops"]
    assert on["ptx_ops"]["griddepcontrol.launch_dependents"] == 1
    assert (on["registers"], on["programs_per_sm"]) == (off["registers"], off["programs_per_sm"])
    assert on["loops"][0]["instructions"] == off["loops"][0]["instructions"]


def test_store_writes_after_the_attention_with_pdl(compiled):
    """The decode step's store as a programmatic dependent (store(pdl=True), 16 rows per program as at batch 256):
    it loads (this step's slots, keys and values; on the other path the first completing group) before a
    griddepcontrol.wait on each of its two paths (with and without a completing row), and no global store precedes
    either wait in the PTX or shares its basic block (its record writes share bytes with the stage the open group
    reads; moving either wait after a write fails this, checked); without PDL no wait, the same registers."""
    off, on = compiled["pdl"]["store"]
    assert "griddepcontrol.wait" not in off["ptx_ops"]
    assert on["ptx_ops"]["griddepcontrol.wait"] == 2, on["ptx_ops"]
    assert on["stores_before_wait"] == 0 and on["stores_in_block_before_waits"] == [0, 0], on
    assert on["loads_before_wait"] >= 10, on["loads_before_wait"]
    assert (on["registers"], on["spill_bytes"]) == (off["registers"], off["spill_bytes"])
