"""kivi-eval: cache-read perplexity on real SmolLM2 weights, and a CI guard on the quantizer's quality.

The guard runs the evaluation's own code path (2 windows x 1024 tokens of the Python reference manual, 64-token
prefill chunks, so everything before a chunk is read from the cache) and bounds the perplexity of KIVI-4 and KIVI-2
relative to the bf16 cache. Measured on this CPU (2026-11-30, these windows): bf16 13.357, KIVI-4 13.481 (+0.93%),
KIVI-2 18.357 (+37.4%). The bounds are the issue's target for KIVI-4 with room for last-digit drift (+1.5%) and a
regression bound for KIVI-2 at the measured level (+45%; the issue's +5% target is missed, docs/quality.md). The
lower bound on KIVI-2 catches the failure peers shipped: a cache path that stores or reads unquantized values.
"""

from __future__ import annotations

import math
import random

import pytest

from kivi_vllm.eval.agreement import agreement
from kivi_vllm.eval.cli import bits_per_value
from kivi_vllm.eval.perplexity import CONFIGS, config_settings, evaluate, reference_text, windows


def test_windows_and_text():
    text = reference_text()
    assert "assignment" in text and len(text) > 100_000
    ids = list(range(10))
    assert windows(ids, 2, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="fewer than"):
        windows(ids, 3, 4)


def test_bits_per_value():
    """Independent arithmetic for SmolLM2 (head size 64), KIVI-2, G=32, B=512: a record is 512 B key codes + 256 B
    key scale/min + 512 B value codes + 256 B value scale/min (2 channel groups of 32), the stage 32 x 64 x 2 B x 2;
    the page holds 15 records + the stage."""
    page = 15 * (512 + 256 + 512 + 256) + 32 * 64 * 2 * 2
    assert bits_per_value({"bits": 2}, 64) == pytest.approx(page * 8 / 512 / (2 * 64))
    assert bits_per_value(None, 64) == 16 and bits_per_value("fp8", 64) == 8
    # per-layer bits: the mean page over the layers; a k4v2 record has 1024 B of key codes, a k4v4 one 1024 B more
    k4v2, k4v4 = page + 15 * 512, page + 15 * 1024
    layered = config_settings("kivi2@0=k4v2@29=k4v4")
    assert bits_per_value(layered, 64, num_layers=30) == pytest.approx((28 * page + k4v2 + k4v4) / 30 * 8 / 512 / 128)
    with pytest.raises(ValueError, match="number of layers"):
        bits_per_value(layered, 64)
    # exact layers: 16 bits (their bf16 page: 512 x 64 x 2 B for keys and for values per head)
    exact = config_settings("kivi2@0,29=exact")
    assert exact["layers"] == {"0": {"exact": True}, "29": {"exact": True}}
    assert bits_per_value(exact, 64, num_layers=30) == pytest.approx((28 * page * 8 / 512 / 128 + 2 * 16) / 30)
    assert bits_per_value(config_settings("kivi2@0-29=exact"), 64, num_layers=30) == 16


def test_config_names_with_per_layer_bits():
    assert config_settings("kivi2") is CONFIGS["kivi2"]
    assert config_settings("kivi2@0,29=k4v2") == {"bits": 2, "layers": {"0": {"k_bits": 4, "v_bits": 2},
                                                                        "29": {"k_bits": 4, "v_bits": 2}}}
    assert config_settings("kivi2-g16@3=4")["layers"] == {"3": {"bits": 4}}
    for bad, match in (("kivi3", "unknown configuration 'kivi3'"), ("bf16@0=k4", "KIVI configurations only"),
                       ("kivi2@0=k3", "k_bits=3 is not supported"), ("kivi2@0", "INDICES=SETTING")):
        with pytest.raises(ValueError, match=match):
            config_settings(bad)


def test_cache_read_perplexity_guard(model_path):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_path)(reference_text(), add_special_tokens=False)["input_ids"]
    w = windows(ids, 2, 1024)
    ppl = {name: evaluate(model_path, name, CONFIGS[name], w, chunk=64).perplexity for name in ("bf16", "kivi4", "kivi2")}
    print(ppl)
    assert all(math.isfinite(p) for p in ppl.values())
    assert 5 < ppl["bf16"] < 30  # the model reads the manual sensibly
    assert ppl["kivi4"] <= ppl["bf16"] * 1.015
    assert ppl["bf16"] * 1.05 < ppl["kivi2"] <= ppl["bf16"] * 1.45


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_prompt(model_path, depth):
    """The needle sits at the requested depth of the filler, once, and the prompt ends with the question."""
    from transformers import AutoTokenizer

    from kivi_vllm.eval.passkey import QUESTION, make_prompt

    tok = AutoTokenizer.from_pretrained(model_path)
    ids, n = make_prompt(tok, 54321, depth, 1024)
    text = tok.decode(ids)
    assert n == len(ids) and 900 <= n <= 1024
    assert text.count("54321") == 2 and text.endswith(QUESTION)
    where = text.index("The pass key is 54321") / len(text)
    assert abs(where - depth) < 0.08


def _agreement_by_hand(ref, other):
    """Plain restatement: walk each pair until the first difference; count equal positions over reference length."""
    prefixes, same, total = [], 0, 0
    for r, o in zip(ref, other):
        k = 0
        while k < len(r) and k < len(o) and r[k] == o[k]:
            k += 1
        prefixes.append(k)
        same += sum(1 for i in range(len(r)) if i < len(o) and r[i] == o[i])
        total += len(r)
    return prefixes, same / total


def test_agreement_metrics():
    ref = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]]
    other = [[1, 2, 0, 4], [0, 6, 7, 8], [9, 9, 9]]  # diverges then realigns; diverges at 0; one token short
    r = agreement(ref, other)
    assert r.matching_prefix == [2, 0, 3] and r.mean_prefix == pytest.approx(5 / 3)
    assert r.positionwise == pytest.approx(9 / 12)
    assert agreement(ref, ref).positionwise == 1 and agreement(ref, ref).matching_prefix == [4, 4, 4]
    g = random.Random(0)
    for _ in range(200):
        n = g.randrange(1, 5)
        ref = [[g.randrange(3) for _ in range(g.randrange(1, 9))] for _ in range(n)]
        other = [[g.randrange(3) for _ in range(g.randrange(0, 9))] for _ in range(n)]
        r = agreement(ref, other)
        pref, pos = _agreement_by_hand(ref, other)
        assert r.matching_prefix == pref and r.positionwise == pytest.approx(pos)
    with pytest.raises(ValueError, match="continuations"):
        agreement([[1], [2]], [[1]])


def test_auto_layers_in_config_names():
    from kivi_vllm.calibrate import pick_layers
    from kivi_vllm.eval.cli import config_name, resolve_auto

    errors = [0.1, 0.5, 0.2, 0.9, 0.3]
    assert pick_layers(errors, 2) == [1, 3] and pick_layers(errors, 5) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="cannot pick 6 of 5 layers"):
        pick_layers(errors, 6)
    assert config_name("kivi2@auto5=k4v2") == "kivi2@auto5=k4v2"
    import argparse

    for bad in ("kivi2@1,auto5=k4v2", "kivi2@auto5=k3"):  # autoN must be all of INDICES; bits checked up front
        with pytest.raises(argparse.ArgumentTypeError):
            config_name(bad)
    # the given errors are used as they are (no calibration run) and handed back for the next name
    assert resolve_auto("kivi2@auto3=k4v2@0=k4v4", "unused", errors) == ("kivi2@1,3,4=k4v2@0=k4v4", errors)
    assert config_settings(resolve_auto("kivi2@auto2=4", "unused", errors)[0])["layers"] == {"1": {"bits": 4},
                                                                                          "3": {"bits": 4}}
