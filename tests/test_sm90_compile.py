"""What can be checked of the GPU kernels without a GPU: their sm_90 (H200) compile, and which decode kernel runs.

Triton compiles for sm_90 on this CPU with its bundled ptxas (``benchmarks/kernel_resources.py``). The "tc" decode
kernel (Gluon) has no interpreter run, so its CPU test is its compile: every re-indexing of its MMA operands is a
``convert_layout(..., assert_trivial=True)`` that fails to compile if it would move data between threads, and it
must use no shared memory. The prefill kernel must fit the H200's 232,448 bytes of shared memory at its default
tile for every group and head size it accepts: 4 groups per bulk step at group 128 asked for 364,548 bytes and
failed to launch on the H200 (2026-11-30). Numerical checks of these kernels run on the GPU
(``scripts/decode_kernels_check.py``, ``scripts/kernel_sweep.py``).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from kivi_vllm.layout import PageLayout

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import kernel_resources as kr  # noqa: E402 (after the path insert)

DEC = importlib.import_module("kivi_vllm.kernels.decode")
TC = importlib.import_module("kivi_vllm.kernels.decode_tc")
PRE = importlib.import_module("kivi_vllm.kernels.prefill")
H200_SMEM = 232_448  # bytes of shared memory one program may use on sm_90 (the launch error's "Hardware limit")


@pytest.mark.parametrize("head,group,bits,qpk", [(128, 32, (2, 2), 4), (64, 16, (4, 2), 8)])
def test_tc_decode_compiles_with_register_operands(head, group, bits, qpk):
    lay = PageLayout(512, head, *bits, group, "kv", torch.bfloat16)
    r = kr.compiled_resources(TC.tc_kernel(), TC.tc_constexprs(lay, qpk, 8), 1)
    assert r["shared_bytes"] == 0
    assert r["ptx_ops"]["mma.sync"] > 0
    mmas_per_group = 2 * (group // 16) * (head // 16) * 2  # m16n8k16: scores (G/8 x D/16) + P.V (D/8 x G/16)
    assert r["ptx_ops"]["mma.sync"] == mmas_per_group


@pytest.mark.parametrize("head,group,bits", [(128, 128, 2), (256, 64, 4)])
def test_prefill_default_tile_fits_h200_shared_memory(head, group, bits):
    lay = PageLayout(512, head, bits, bits, group, "kv", torch.bfloat16)
    r = kr.prefill_resources(bits, 4, PRE.block_q_for(8, 2), 4, group_size=group, head_size=head, unpack="words",
                             bulk_groups=None)
    assert r["bulk_groups"] == PRE.default_bulk_groups(lay) >= 1
    assert r["shared_bytes"] <= H200_SMEM


def test_default_decode_kernel():
    """'tc' only on CUDA, from 4 query heads per KV head, on shapes it supports; the others as before."""
    lay = PageLayout(512, 128, 2, 2, 32, "kv", torch.bfloat16)
    assert DEC.default_kernel(lay, 4, "cuda") == "tc"
    assert DEC.default_kernel(lay, 8, "cuda") == "tc"
    assert DEC.default_kernel(lay, 4, "cpu") == "fma"
    assert DEC.default_kernel(lay, 8, "cpu") == "mma"
    assert DEC.default_kernel(lay, 1, "cuda") == "fma"
    assert DEC.default_kernel(PageLayout(512, 96, 2, 2, 32, "kv", torch.bfloat16), 4, "cuda") == "fma"
    assert TC.supports(PageLayout(512, 96, 2, 2, 32, "kv", torch.bfloat16), 4) == "head size 96 (64 or 128)"
    assert TC.supports(lay, 32) == "32 query heads per KV head (at most 16)"


def test_tc_decode_refuses_the_cpu():
    lay = PageLayout(64, 64, 2, 2, 16, "kv", torch.float32)
    q = torch.zeros(1, 4, 64)
    kv = torch.zeros(1, 1, 64)
    cache = torch.zeros(1, 1, lay.page_bytes, dtype=torch.uint8)
    with pytest.raises(ValueError, match="runs on CUDA devices only"):
        DEC.decode(q, kv, kv, cache, torch.zeros(1, 1, dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32),
                   torch.tensor([1], dtype=torch.int32), lay, 0.125, torch.zeros_like(q), kernel="tc")
