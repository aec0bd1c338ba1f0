"""Page arithmetic: bytes per page equal the formula of docs/design.md, and the regions tile the page as documented."""

import math

import pytest
import torch

from kivi_vllm.config import KiviConfigError
from kivi_vllm.layout import PageLayout


def documented_page_bytes(B, D, kb, vb, G, residual, itemsize):
    """docs/design.md, "Page layout": record and stage sizes, term by term."""
    nvg = D // math.gcd(G, D)
    record = G * D * kb // 8 + 2 * D + 2 * D + G * D * vb // 8 + 2 * G * nvg + 2 * G * nvg
    stage = G * D * itemsize * (2 if residual == "kv" else 1)
    m = B // G
    if residual == "kv":
        return (m - 1) * record + max(record, stage)
    return m * record + stage


GRID = [
    (B, D, kb, vb, G, res, dt)
    for B in (32, 64, 256, 512, 1024)
    for D in (64, 80, 96, 128, 256)
    for kb, vb in ((2, 2), (4, 4), (4, 2))
    for G in (16, 32, 64, 128)
    for res in ("kv", "k")
    for dt in (torch.bfloat16, torch.float32)
    if B % G == 0
]


@pytest.mark.parametrize("B,D,kb,vb,G,res,dt", GRID[::7])
def test_page_bytes_match_documented_formula(B, D, kb, vb, G, res, dt):
    layout = PageLayout(B, D, kb, vb, G, res, dt)
    itemsize = torch.empty((), dtype=dt).element_size()
    assert layout.page_bytes == documented_page_bytes(B, D, kb, vb, G, res, itemsize)
    assert layout.page_bytes % 16 == 0


def test_worked_examples_in_design_doc():
    # Llama-2-7B head (D=128), KIVI-2, G=32, B=512, bf16 residual: 15 records of 3,072 B + a 16,384 B stage
    lay = PageLayout(512, 128, 2, 2, 32, "kv", torch.bfloat16)
    assert (lay.record_bytes, lay.stage_bytes, lay.page_bytes) == (3072, 16384, 62464)
    assert round(lay.ratio_vs(2), 3) == 4.197
    # SmolLM2 head (D=64): same ratio, half the bytes
    assert PageLayout(512, 64, 2, 2, 32, "kv", torch.bfloat16).page_bytes == 31232
    # keys-only residual: 16 records + an 8,192 B key stage
    assert PageLayout(512, 128, 2, 2, 32, "k", torch.bfloat16).page_bytes == 16 * 3072 + 8192


def test_value_groups_divide_the_head_size():
    assert PageLayout(512, 128).v_group_size == 32 and PageLayout(512, 80).v_group_size == 16
    assert PageLayout(512, 64, group_size=128).v_group_size == 64


@pytest.mark.parametrize("res", ["kv", "k"])
def test_regions_tile_the_page(res):
    """Write a distinct byte into every region through the typed views; the bytes land where documented."""
    lay = PageLayout(128, 64, 2, 4, 32, res, torch.bfloat16)
    page = torch.zeros(lay.page_bytes, dtype=torch.uint8)
    owner = torch.full((lay.page_bytes,), -1)
    views = {
        "k_codes": lay.k_codes, "v_codes": lay.v_codes,
        "k_scale": lay.k_scale, "k_min": lay.k_min, "v_scale": lay.v_scale, "v_min": lay.v_min,
    }
    for tag, (name, view) in enumerate(views.items()):
        page.zero_()
        v = view(page)
        v.view(torch.uint8).fill_(255) if v.dtype != torch.uint8 else v.fill_(255)
        hit = (page == 255).nonzero().flatten()
        assert len(hit) == lay.region_sizes()[name] * lay.num_groups, name
        assert (owner[hit] == -1).all(), f"{name} overlaps another record region"
        owner[hit] = tag
    assert (owner[: lay.num_groups * lay.record_bytes] >= 0).all(), "records leave gaps"
    page.zero_()
    lay.k_stage(page).view(torch.uint8).fill_(255)
    stage = (page == 255).nonzero().flatten()
    assert stage[0] == lay.stage_offset and len(stage) == lay.region_sizes()["k_stage"]
    if res == "kv":
        # the stage borrows exactly the last record's bytes (plus what lies beyond them)
        assert lay.stage_offset == (lay.num_groups - 1) * lay.record_bytes
    else:
        assert lay.stage_offset == lay.num_groups * lay.record_bytes  # values are never staged: no overlap


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_size=100), "--block-size=100 is not a multiple of the group size 32"),
    (dict(head_size=72), "head size 72 is not supported"),
    (dict(k_bits=3), "--kivi-k-bits"),
    (dict(group_size=48), "--kivi-group-size=48"),
    (dict(residual="v"), "--kivi-residual='v'"),
])
def test_bad_layouts_are_refused(kwargs, match):
    args = dict(block_size=512, head_size=64)
    args.update(kwargs)
    with pytest.raises(KiviConfigError, match=match):
        PageLayout(**args)
