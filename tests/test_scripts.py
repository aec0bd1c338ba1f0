"""Helpers of the GPU scripts and benchmarks that decide what a measurement means, checked on small inputs:
``scripts/tp_check.py``'s one-ulp weight perturbation (the noise bound of the TP comparison),
``benchmarks/tpot_equal_concurrency.py``'s split of a run's time into prefill-heavy and other steps,
``benchmarks/tc_rounding.py``'s account of the "tc" decode kernel's error, and ``benchmarks/decode_bounds.py``'s
floors of a decode step (bytes, instructions, fixed cost)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_perturbed_model_moves_tp_reduced_weights_by_at_most_one_ulp(tmp_path):
    from safetensors.torch import load_file, save_file

    tp_check = load("scripts/tp_check.py")
    g = torch.Generator().manual_seed(0)
    o = torch.randn(64, 96, generator=g).to(torch.bfloat16)
    o[0, :8] = 0.0
    o[1, :8] = -0.0
    down = (torch.randn(32, 128, generator=g) * 1e-3).to(torch.bfloat16)
    q = torch.randn(96, 64, generator=g).to(torch.bfloat16)
    src = tmp_path / "src"
    src.mkdir()
    save_file({"model.layers.0.self_attn.o_proj.weight": o, "model.layers.0.mlp.down_proj.weight": down,
               "model.layers.0.self_attn.q_proj.weight": q}, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({"num_hidden_layers": 1}))
    (src / "tokenizer.json").write_text("{}")

    dst = tp_check.perturbed_model(src, tmp_path / "dst", seed=1)
    out = load_file(str(dst / "model.safetensors"))
    assert (dst / "tokenizer.json").read_text() == "{}" and (dst / "config.json").is_file()
    assert torch.equal(out["model.layers.0.self_attn.q_proj.weight"].view(torch.int16), q.view(torch.int16))
    for name, before in (("model.layers.0.self_attn.o_proj.weight", o), ("model.layers.0.mlp.down_proj.weight", down)):
        after = out[name]
        assert torch.isfinite(after.float()).all()
        x, y = before.double(), after.double()
        nz = x != 0
        assert torch.equal(y[~nz], x[~nz])  # zeros stay zero (a step there would make a NaN or a denormal)
        # one unit in the last place of bf16 (8 significant bits) is at most 2^-7 of the value, in float64
        assert ((y - x).abs()[nz] <= x.abs()[nz] * 2.0**-7).all()
        assert (torch.sign(y[nz]) == torch.sign(x[nz])).all()
        moved = (y != x)[nz].double().mean().item()
        assert 0.55 < moved < 0.78  # two thirds of the non-zero elements move (up or down), one third stays
    again = load_file(str(tp_check.perturbed_model(src, tmp_path / "dst2", seed=1) / "model.safetensors"))
    assert all(torch.equal(again[k].view(torch.int16), out[k].view(torch.int16)) for k in out)  # seeded
    other = load_file(str(tp_check.perturbed_model(src, tmp_path / "dst3", seed=2) / "model.safetensors"))
    assert not torch.equal(other["model.layers.0.self_attn.o_proj.weight"], out["model.layers.0.self_attn.o_proj.weight"])


def test_perturbed_model_refuses_other_dtypes(tmp_path):
    from safetensors.torch import save_file

    tp_check = load("scripts/tp_check.py")
    src = tmp_path / "src"
    src.mkdir()
    save_file({"model.layers.0.self_attn.o_proj.weight": torch.ones(4, 4)}, str(src / "model.safetensors"))
    with pytest.raises(ValueError, match="expected bfloat16"):
        tp_check.perturbed_model(src, tmp_path / "dst", seed=1)


def test_time_split_counts_steps_where_a_running_request_got_no_token():
    tpot = load("benchmarks/tpot_equal_concurrency.py")
    # 5 steps at t = 0, 0.5, 0.55, 1.55, 1.6: step i's time runs from t[i-1] to t[i]
    steps = dict(t_s=[0.0, 0.5, 0.55, 1.55, 1.6], running=[4, 4, 4, 6, 6], generation_tokens=[4, 2, 4, 5, 7],
                 itl_s=[None] * 5)
    split = tpot.time_split(dict(steps=steps, steps_recorded=5))
    # steps 1 (2 < 4) and 3 (5 < 6) carried unfinished prompt chunks: 0.5 s + 1.0 s; steps 2 and 4 (7 >= 6: a
    # request finished): 0.05 s each
    assert split["partial prefill"]["steps"] == 2 and split["partial prefill"]["seconds"] == pytest.approx(1.5)
    assert split["partial prefill"]["median_ms"] == pytest.approx(750.0)
    assert split["other"]["steps"] == 2 and split["other"]["seconds"] == pytest.approx(0.1)
    assert tpot.time_split(dict(steps=steps, steps_recorded=9)) is None  # a strided trace has no step times


def test_tc_error_comes_from_the_keys():
    """docs/benchmarks.md's reading of ``benchmarks/tc_rounding.py``: the fp16 keys make "tc"'s error, the fp16
    probabilities and values hardly add to it; folding the softmax scale into the query (the former kernel)
    added a rounding that doubled it at sharp attention; the error grows with sharper attention."""
    emu = load("benchmarks/tc_rounding.py")

    def worst(q_scale: float) -> dict:  # the script's default run: worst of 4 seeds, 4,096 tokens, 16 query heads
        runs = [emu.one_step(q_scale=q_scale, bits=4, seed=seed, tokens=4096, qpk=16) for seed in range(4)]
        return {name: max(r[name] for r in runs) for name in runs[0]}

    sharp, plain = worst(8), worst(1)
    assert sharp["keys exact"] < sharp["tc"] / 4
    assert sharp["P exact"] > sharp["tc"] / 2 and sharp["values exact"] > sharp["tc"] / 2
    assert sharp["former tc (query x scale in fp16)"] > 1.5 * sharp["tc"]
    assert sharp["tc"] > 2 * plain["tc"]
    assert plain["tc"] < 2e-3  # the float64 check's data: within the 1e-2 with a margin
    # for scale: FlashAttention's bf16 roundings of the same cache err more, sharp or not
    for case in (sharp, plain):
        assert case["bf16 attention (FlashAttention)"] > 2 * case["tc"]


def test_decode_bounds_floors_and_marginal_rates(monkeypatch):
    """benchmarks/decode_bounds.py: the bytes floor is bytes / copy, the instruction floor groups x KV heads x
    requests x SASS per group / (SMs x 4 x clock), and the fixed cost and marginal shares come from the two longest
    contexts (a run made of a known fixed cost plus a known rate gives them back; a third, shorter context does not
    enter the line). The SASS count is the offline compile's, replaced here by a constant."""
    bounds = load("benchmarks/decode_bounds.py")
    monkeypatch.setattr(bounds, "loop_sass", lambda bits, qpk, head: 700)
    copy_gbps, sms, mhz = 4000.0, 100, 2000.0
    fixed, rate = 20.0, 0.5  # µs; share of the copy bandwidth the loop moves
    rows = []
    for ctx in (1025, 4097, 16385):  # 32, 128, 512 complete groups of 32
        nbytes = 64 * 8 * ctx * 100.0
        t = fixed + nbytes / (copy_gbps * 1e3) / rate if ctx > 2000 else 99.0
        rows.append(dict(shape="gqa", batch=64, context=ctx, config="kivi2", status="ok", bytes=nbytes, time_us=t))
    rows.append(dict(shape="gqa", batch=64, context=4097, config="fa3-fp8", status="ok", bytes=1.0, time_us=1.0))
    cells, lines = bounds.bounds(dict(copy_gbps=copy_gbps, rows=rows), sms, mhz)
    assert len(cells) == 3 and len(lines) == 1
    c = cells[1]
    assert c["bytes_us"] == pytest.approx(64 * 8 * 4097 * 100.0 / 4e6)
    assert c["inst_us"] == pytest.approx(64 * 8 * 128 * 700 / (100 * 4 * 2000.0))
    assert c["pct_copy"] == pytest.approx(c["bytes_us"] / c["time_us"])
    line = lines[0]
    assert line["contexts"] == (4097, 16385)
    assert line["fixed_us"] == pytest.approx(fixed)
    assert line["marginal_pct_copy"] == pytest.approx(rate)
    groups = 64 * 8 * (512 - 128)
    dt = rows[2]["time_us"] - rows[1]["time_us"]
    assert line["marginal_pct_issue"] == pytest.approx(groups * 700 / (100 * 4 * 2000.0) / dt)
    with pytest.raises(ValueError, match="unknown shape"):
        bounds.bounds(dict(copy_gbps=copy_gbps, rows=[dict(rows[0], shape="mystery")]), sms, mhz)
