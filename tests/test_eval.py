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

import pytest

from kivi_vllm.eval.cli import bits_per_value
from kivi_vllm.eval.perplexity import CONFIGS, evaluate, reference_text, windows


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
