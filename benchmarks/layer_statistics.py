"""Which cheap per-layer statistic predicts where 4-bit keys help? Candidates for ``kivi_vllm.calibrate``, scored
against the per-layer perplexity sensitivity of ``benchmarks/layer_sensitivity.py`` (30 + 3 perplexity runs).

One float32 forward of the transformers model over ``--tokens`` tokens of the reference manual from window
``--window`` (x 1,024 tokens), post-RoPE K/V per layer, 2-bit (and 4-bit) keys from the float64 oracle of
``tests/oracle.py`` over complete 32-token groups, KIVI's streaming visibility rule, values exact. Per layer:

* ``out_err2``: relative error of the attention output with 2-bit keys (what ``kivi_vllm.calibrate`` uses);
* ``score_err2``: RMS error of the scores q.k / sqrt(D) on quantized keys;
* ``key_rel_err2``: RMS error of the 2-bit keys relative to the keys' RMS;
* ``key_range``, ``key_range_max``: mean and largest (max - min) of a channel over a group (the 2-bit step x 3).

    python benchmarks/layer_statistics.py --window 4 --sensitivity docs/measurements/2026-11-30-cpu-layer-sensitivity.json

Prints, per statistic, the Spearman correlation with the sensitivity gains, the top 5 layers and how many of them
are in the sensitivity's top 5.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import oracle  # noqa: E402

G = 32
STATS: dict[int, dict[str, float]] = {}


def stat_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    """transformers attention function: exact attention out, the statistics of this layer into STATS."""
    _, hq, t, _ = query.shape
    rep = hq // key.shape[1]
    k = key[0].transpose(0, 1)  # [T, Hkv, D]
    pos = torch.arange(t)
    causal = pos[None, :] <= pos[:, None]
    quant = (pos[None, :] // G + 1) * G <= pos[:, None]
    kr, vr, q = key.repeat_interleave(rep, 1).double(), value.repeat_interleave(rep, 1).double(), query.double()

    def out_with(kq):
        kqr = kq.transpose(0, 1)[None].repeat_interleave(rep, 1)
        s = torch.where(quant, q @ kqr.transpose(-1, -2), q @ kr.transpose(-1, -2)) * scaling
        return torch.softmax(s.masked_fill(~causal, float("-inf")), -1) @ vr, s

    o_e, s_e = out_with(k.double())
    n = t // G * G
    row = {}
    for bits in (2, 4):
        kq = k.double().clone()
        kq[:n] = oracle.dequantized_keys(k[:n], bits, G)
        o, s = out_with(kq)
        row[f"out_err{bits}"] = ((o - o_e).norm() / o_e.norm()).item()
        row[f"score_err{bits}"] = (s - s_e)[..., quant & causal].pow(2).mean().sqrt().item()
        err = (kq[:n] - k[:n].double()).pow(2).mean().sqrt()
        row[f"key_rel_err{bits}"] = (err / k[:n].double().pow(2).mean().sqrt()).item()
    kg = k[:n].double().unflatten(0, (-1, G))
    row["key_range"] = (kg.amax(1) - kg.amin(1)).mean().item()
    row["key_range_max"] = (kg.amax(1) - kg.amin(1)).amax().item()
    STATS[module.layer_idx] = row
    return o_e.to(query.dtype).transpose(1, 2).contiguous(), None


def spearman(a: dict[int, float], b: dict[int, float]) -> float:
    ra = {x: i for i, x in enumerate(sorted(a, key=a.get))}
    rb = {x: i for i, x in enumerate(sorted(b, key=b.get))}
    n = len(a)
    return 1 - 6 * sum((ra[i] - rb[i]) ** 2 for i in a) / (n * (n * n - 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="HF model folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--window", type=int, default=4, help="calibration window index (x 1,024 tokens)")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--sensitivity", default=str(Path(__file__).resolve().parents[1] / "docs" / "measurements" /
                                                 "2026-11-30-cpu-layer-sensitivity.json"))
    ap.add_argument("--out")
    a = ap.parse_args()
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    from kivi_vllm.models import default_model_path
    from kivi_vllm.prompts import reference_text

    AttentionInterface.register("kivi_stats", stat_attention)
    path = a.model or str(default_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="kivi_stats").eval()
    ids = tok(reference_text(), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        model(torch.tensor([ids[a.window * 1024 : a.window * 1024 + a.tokens]]))
    gain = {int(k): v for k, v in json.loads(Path(a.sensitivity).read_text())["gain"].items()}
    truth = sorted(gain, key=lambda i: -gain[i])[:5]
    print(f"sensitivity top 5: {truth}")
    for name in ("out_err2", "score_err2", "key_rel_err2", "key_range", "key_range_max"):
        val = {i: STATS[i][name] for i in STATS}
        top = sorted(val, key=lambda i: -val[i])[:5]
        print(f"{name:14s} Spearman {spearman(val, gain):+.2f}  top 5 {top}  in the sensitivity's top 5: "
              f"{len(set(top) & set(truth))}")
    if a.out:
        Path(a.out).write_text(json.dumps(STATS, indent=1))


if __name__ == "__main__":
    main()
