"""Compile the KIVI decode (or prefill) kernel for Hopper (sm_90) without a GPU and report its resources: registers per thread,
spills, shared memory, programs per SM, the memory/barrier/MMA instructions of the PTX, and the SASS of each loop
(instructions per warp per iteration, by opcode). The first thing to read
when the decode kernel is slower than its bytes (docs/benchmarks.md): occupancy and the number of barriers per loop
iteration decide how many record loads are in flight.

    python benchmarks/kernel_resources.py                      # default variants, bf16 model, head size 128
    python benchmarks/kernel_resources.py --bits 4 --qpk 4
    python benchmarks/kernel_resources.py --prefill             # the prefill kernel at its tile options
    python benchmarks/kernel_resources.py --store               # the store kernel at 1, 4, 16 rows per program
    python benchmarks/kernel_resources.py --open-group --qpk 4  # the open group's launch, both forms, 1/2/4 warps

Uses triton's bundled ptxas (``ptxas -v``); no CUDA device is needed. Tensors and strides are taken as 16-byte
aligned, as the JIT specializes them on the GPU (figures from before 2026-11-30's fifth session compiled without
that, e.g. the "fma" loop at 1,089 SASS per group instead of 1,138).
"""

from __future__ import annotations

import argparse
import collections
import importlib
import os
import re
import subprocess
import tempfile

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from kivi_vllm.layout import PageLayout

POINTERS = {"q_ptr": "*bf16", "key_ptr": "*bf16", "value_ptr": "*bf16", "kv_ptr": "*u8", "block_table_ptr": "*i32",
            "seq_lens_ptr": "*i32", "qsl_ptr": "*i32", "part_m_ptr": "*fp32", "part_l_ptr": "*fp32",
            "part_acc_ptr": "*fp32", "sm_scale": "fp32", "out_ptr": "*bf16", "tile_req_ptr": "*i32",
            "tile_start_ptr": "*i32", "work_ptr": "*i32", "count_ptr": "*i32", "slot_ptr": "*i64", "rows_ptr": "*i32"}
REGS_PER_SM, SMEM_PER_SM, MAX_WARPS = 65536, 228 * 1024, 64  # H100/H200 (sm_90)


def resources(bits: int, qpk: int, kernel: str, num_warps: int, num_stages: int = 1, group_size: int = 32,
              head_size: int = 128, lane_rows: int | None = None, maxnreg: int | None = None) -> dict:
    """Compile the decode kernel ("fma": ``_decode_fma_kernel``, "mma": ``_decode_split_kernel``, "tc":
    ``decode_tc._decode_tc_kernel``, one warp whatever ``num_warps``) for sm_90 with
    these constexprs (``lane_rows`` None: decode()'s default for ``qpk``); return ptxas' figures, PTX counts and the SASS of its loops."""
    mod = importlib.import_module("kivi_vllm.kernels.decode")
    lay = PageLayout(512, head_size, bits, bits, group_size, "kv", torch.bfloat16)
    if kernel == "tc":  # Gluon; one warp
        tc = importlib.import_module("kivi_vllm.kernels.decode_tc")
        return compiled_resources(tc.tc_kernel(), tc.tc_constexprs(lay, qpk, 8), 1, maxnreg)
    if kernel == "fma":
        fn = mod._decode_fma_kernel
        consts = mod.fma_constexprs(lay, qpk, 8, num_stages, lane_rows)
    else:  # the launch of decode() for a bf16 model on a GPU (TF32 dots)
        fn = mod._decode_split_kernel
        consts = dict(NUM_SPLITS=8, DO_GROUPS=True,
                      **mod.mma_constexprs(lay, qpk, num_stages, dict(DOT_DTYPE=tl.float32, DOT_PRECISION="tf32")))
    return compiled_resources(fn, consts, num_warps, maxnreg)


def prefill_resources(bits: int, qpk: int, block_q: int, num_warps: int, phase: int = 1, group_size: int = 32,
                      head_size: int = 128, unpack: str = "bytes", dot: str = "tf32", bulk_groups: int | None = 0,
                      bulk_dot: str = "fp32") -> dict:
    """The same figures for ``kivi_vllm.kernels.prefill._prefill_kernel`` as prefill() launches it for a bf16 model
    on a GPU (TF32 dots, streaming rule), phase 1 (the rows after each request's first group) by default; ``dot``
    "bf16" or "fp16" compiles the dots with 16-bit operands instead (not what prefill() launches); ``bulk_groups``
    and ``bulk_dot``: prefill()'s (None: its default; the bulk loop is the first loop listed; the groups per step
    used are returned as ``bulk_groups``)."""
    mod = importlib.import_module("kivi_vllm.kernels.prefill")
    lay = PageLayout(512, head_size, bits, bits, group_size, "kv", torch.bfloat16)
    dots = {"tf32": dict(DOT_DTYPE=tl.float32, DOT_PRECISION="tf32"), "bf16": dict(DOT_DTYPE=tl.bfloat16,
            DOT_PRECISION="ieee"), "fp16": dict(DOT_DTYPE=tl.float16, DOT_PRECISION="ieee")}
    bulk_groups = mod.resolve_bulk_groups(lay, bulk_groups, unpack)
    mod.check_bulk(lay, bulk_groups, bulk_dot, unpack)
    consts = mod.prefill_constexprs(lay, qpk, block_q, phase, False, dots[dot], unpack, bulk_groups, bulk_dot)
    return dict(compiled_resources(mod._prefill_kernel, consts, num_warps), bulk_groups=bulk_groups)


def open_group_resources(bits: int, qpk: int, kind: str, num_warps: int, group_size: int = 32,
                         head_size: int = 128, pdl: bool = True) -> dict:
    """The same figures for the open group's launch after "tc"/"fma" as decode() makes it with a work list on an
    H200: ``kind`` "light" (``decode._open_group_kernel``) or "dot" (``decode._decode_split_kernel`` with
    ``COMBINE``, TF32 dots), bf16 model, as a programmatic dependent (``pdl``, ``decode.PDL``)."""
    mod = importlib.import_module("kivi_vllm.kernels.decode")
    common = importlib.import_module("kivi_vllm.kernels.common")
    lay = PageLayout(512, head_size, bits, bits, group_size, "kv", torch.bfloat16)
    if kind == "light":
        consts = dict(QPK=qpk, NUM_SPLITS=8, WORK_LIST=True, STAGE_DTYPE=common.stage_dtype(lay), PDL=pdl,
                      **common.layout_args(lay))
        return compiled_resources(mod._open_group_kernel, consts, num_warps)
    consts = dict(NUM_SPLITS=8, DO_GROUPS=False, COMBINE=True, WORK_LIST=True, PDL=pdl,
                  **mod.mma_constexprs(lay, qpk, 1, dict(DOT_DTYPE=tl.float32, DOT_PRECISION="tf32")))
    return compiled_resources(mod._decode_split_kernel, consts, num_warps)


def store_resources(bits: int, rows_per_program: int, num_warps: int = 4, group_size: int = 32, head_size: int = 128,
                    residual: str = "kv", pdl: bool = False) -> dict:
    """The same figures for ``kivi_vllm.kernels.store._store_kernel`` as store() launches it for a bf16 model in a
    pure-decode step (phase 0, every row), ``rows_per_program`` rows per program, as a programmatic dependent of the
    attention with ``pdl``; ``ptx_ops`` also counts the float32 divisions (``div.rn.f32``: the quantizer's
    reciprocals, one per group and scale)."""
    mod = importlib.import_module("kivi_vllm.kernels.store")
    common = importlib.import_module("kivi_vllm.kernels.common")
    lay = PageLayout(512, head_size, bits, bits, group_size, residual, torch.bfloat16)
    consts = dict(STAGE_DTYPE=common.stage_dtype(lay), PHASE=0, ROWS=False, rows_ptr=None,
                  ROWS_PER_PROGRAM=rows_per_program, PDL=pdl, **common.layout_args(lay))
    return compiled_resources(mod._store_kernel, consts, num_warps)


def compiled_resources(fn, consts: dict, num_warps: int, maxnreg: int | None = None) -> dict:
    """Compile ``fn`` (a Triton or Gluon kernel) for sm_90 with ``consts`` and ``num_warps`` (and Triton's
    ``maxnreg`` register cap, if given); ptxas' figures, PTX counts, SASS loops."""
    from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction

    names = fn.arg_names
    # constexprs the caller left at their defaults (e.g. WORK_LIST) are constexprs still, not i32 arguments
    consts = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **consts}
    sig = {n: "constexpr" if n in consts else POINTERS.get(n, "i32") for n in names}
    source = GluonASTSource if isinstance(fn, GluonJITFunction) else triton.compiler.ASTSource
    # what the launcher's JIT specializes on an H200: 16-byte aligned tensors and strides divisible by 16 (vLLM's
    # page, query and block-table strides are); without it the loads are not vectorized
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
               if n not in consts and (sig[n].startswith("*") or n.startswith("stride"))}
    src = source(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=aligned)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, maxnreg=maxnreg))
    ptx = k.asm["ptx"]
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        log = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", path, "-o", path + ".cubin"], capture_output=True,
                             text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill = int(re.search(r"(\d+) bytes spill stores", log).group(1))
    shared = k.metadata.shared
    per_sm = min(REGS_PER_SM // (((regs + 7) // 8 * 8) * 32 * num_warps), SMEM_PER_SM // max(shared, 1),
                 MAX_WARPS // num_warps)
    ops = collections.Counter(".".join(m.split(".")[:2]) for m in
                              re.findall(r"\b(?:ld\.global|cp\.async|bar\.sync|mma\.sync|bra|griddepcontrol)\b[\w.]*", ptx))
    ops["div.rn.f32"] = len(re.findall(r"\bdiv\.rn\.f32\b", ptx))
    # global loads and stores before the first griddepcontrol.wait in the PTX text (a programmatic dependent's
    # overlap, and what it must not do before it), loads after it (None: no wait); and for every wait the global
    # stores between it and the label before it (its basic block: a store there runs before that wait on its path)
    wait = ptx.find("griddepcontrol.wait")
    count = lambda pattern, text: len(re.findall(pattern, text)) if wait >= 0 else None  # noqa: E731
    block_stores = []
    for m in re.finditer(r"griddepcontrol\.wait", ptx):
        labels = list(re.finditer(r"^\$L__BB\w+:", ptx[:m.start()], re.MULTILINE))
        block_stores.append(len(re.findall(r"\bst\.global\b", ptx[labels[-1].end() if labels else 0:m.start()])))
    return dict(registers=regs, spill_bytes=spill, shared_bytes=shared, programs_per_sm=per_sm, ptx_ops=dict(ops),
                loads_before_wait=count(r"\bld\.global\b", ptx[:wait]),
                stores_before_wait=count(r"\bst\.global\b", ptx[:wait]),
                async_before_wait=count(r"\bcp\.async\b", ptx[:wait]),
                loads_after_wait=count(r"\bld\.global\b", ptx[wait:]), stores_in_block_before_waits=block_stores,
                loops=sass_loops(k.asm["cubin"]))


def sass_loops(cubin: bytes) -> list[dict]:
    """SASS of each loop of a cubin (a backward branch to a label): instructions per warp per iteration and the most
    frequent opcodes, from triton's bundled ``nvdisasm``."""
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True, check=True).stdout
    inst = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
    labels, pending, body = {}, [], []
    for line in sass.splitlines():
        lab = re.match(r"\s*\.L_x_(\d+):", line)
        if lab:
            pending.append(lab.group(1))
            continue
        m = inst.match(line)
        if m:
            addr = int(m.group(1), 16)
            for name in pending:
                labels[name] = addr
            pending = []
            target = re.search(r"BRA\s.*\.L_x_(\d+)", line)
            body.append((addr, m.group(2), target.group(1) if target else None))
    loops = []
    for addr, _, target in body:
        if target is not None and labels.get(target, addr + 1) < addr:
            ops = collections.Counter(op for a, op, _ in body if labels[target] <= a <= addr)
            loops.append(dict(instructions=sum(ops.values()), top=dict(ops.most_common(12)), ops=dict(ops),
                              ldl=ops["LDL"], stl=ops["STL"]))
    return loops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--qpk", type=int, default=1, help="query heads per KV head")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--head-size", type=int, default=128)
    ap.add_argument("--prefill", action="store_true", help="the prefill kernel instead (block_q x warps variants)")
    ap.add_argument("--dot", choices=["tf32", "bf16", "fp16"], default="tf32",
                    help="prefill: operand type of the dots (prefill() uses tf32 for 16-bit models)")
    ap.add_argument("--bulk-groups", type=int, default=None,
                    help="prefill: the bulk loop's groups per step for the 'words' variants (default: prefill()'s)")
    ap.add_argument("--bulk-dot", choices=["fp32", "16", "f16"], default="fp32",
                    help="prefill: the bulk loop's operands")
    ap.add_argument("--maxnreg", type=int, default=None, help="decode: register cap per thread (Triton's maxnreg)")
    ap.add_argument("--store", action="store_true", help="the store kernel instead (1, 4 and 16 rows per program)")
    ap.add_argument("--open-group", action="store_true",
                    help="the open group's launch instead (light and dot forms, 1, 2 and 4 warps)")
    a = ap.parse_args()
    if a.open_group:
        print(f"open group's launch, KIVI-{a.bits}, head size {a.head_size}, group size {a.group_size}, {a.qpk} "
              "query head(s) per KV head, sm_90, work list")
        for kind in ("light", "dot"):
            for w in (1, 2, 4):
                r = open_group_resources(a.bits, a.qpk, kind, w, group_size=a.group_size, head_size=a.head_size)
                print(f"{kind}, {w} warps: {r['registers']} registers, {r['spill_bytes']} B spilled, "
                      f"{r['shared_bytes']} B shared, {r['programs_per_sm']} programs/SM", flush=True)
        return
    if a.store:
        print(f"store kernel, KIVI-{a.bits}, head size {a.head_size}, group size {a.group_size}, sm_90, phase 0")
        for rpp in (1, 4, 16):
            r = store_resources(a.bits, rpp, group_size=a.group_size, head_size=a.head_size)
            print(f"rows_per_program {rpp}, 4 warps: {r['registers']} registers, {r['spill_bytes']} B spilled, "
                  f"{r['shared_bytes']} B shared, {r['programs_per_sm']} programs/SM; PTX {r['ptx_ops']}", flush=True)
            for loop in r["loops"]:
                print(f"    loop: {loop['instructions']} SASS instructions per warp per iteration; {loop['top']}")
        return
    if a.prefill:
        print(f"prefill kernel, KIVI-{a.bits}, head size {a.head_size}, group size {a.group_size}, {a.qpk} query "
              f"head(s) per KV head, sm_90, {a.dot} dots, phase 1; 'words' variants with a bulk loop "
              f"({a.bulk_dot} operands), 'bytes' without one")
        for bq, w, unpack in ((64 // a.qpk, 4, "bytes"), (64 // a.qpk, 4, "words"), (128 // a.qpk, 8, "bytes"),
                              (128 // a.qpk, 8, "words"), (32 // a.qpk, 4, "words")):
            r = prefill_resources(a.bits, a.qpk, max(1, bq), w, group_size=a.group_size, head_size=a.head_size,
                                  unpack=unpack, dot=a.dot, bulk_groups=a.bulk_groups if unpack == "words" else 0,
                                  bulk_dot=a.bulk_dot)
            print(f"block_q {max(1, bq)}, {w} warps, unpack {unpack}, bulk_groups {r['bulk_groups']}: "
                  f"{r['registers']} registers, "
                  f"{r['spill_bytes']} B spilled, {r['shared_bytes']} B shared, {r['programs_per_sm']} programs/SM; "
                  f"PTX {r['ptx_ops']}", flush=True)
            for loop in r["loops"]:
                print(f"    loop: {loop['instructions']} SASS instructions per warp per iteration (all branches); "
                      f"{loop['top']}", flush=True)
        return
    variants = [dict(kernel="tc", num_warps=1), dict(kernel="fma", num_warps=1),
                dict(kernel="fma", num_warps=1, lane_rows=1), dict(kernel="fma", num_warps=1, num_stages=2),
                dict(kernel="fma", num_warps=1, num_stages=3), dict(kernel="fma", num_warps=2),
                dict(kernel="mma", num_warps=2),
                dict(kernel="mma", num_warps=4), dict(kernel="mma", num_warps=4, num_stages=3)]
    print(f"decode kernels, KIVI-{a.bits}, head size {a.head_size}, group size {a.group_size}, {a.qpk} query "
          "head(s) per KV head, sm_90")
    for v in variants:
        r = resources(a.bits, a.qpk, **v, group_size=a.group_size, head_size=a.head_size, maxnreg=a.maxnreg)
        print(f"{v}: {r['registers']} registers, {r['spill_bytes']} B spilled, {r['shared_bytes']} B shared, "
              f"{r['programs_per_sm']} programs/SM; PTX {r['ptx_ops']}", flush=True)
        for loop in r["loops"]:
            print(f"    loop: {loop['instructions']} SASS instructions per warp per iteration, {loop['ldl']} LDL / "
                  f"{loop['stl']} STL (spill traffic); {loop['top']}", flush=True)


if __name__ == "__main__":
    main()
