"""Which layers' keys make KIVI-2 costly? Per-layer sensitivity of cache-read perplexity, simulated in transformers.

The Hugging Face model (float32) runs with an attention function that applies KIVI's streaming visibility rule
(docs/design.md §4) per layer: a query at position p sees keys and values of groups completed before p
fake-quantized (the independent float64 oracle's quantizer, ``tests/oracle.py``), and its own group exactly. This is
what the vLLM engine computes with the KIVI cache. Layers not listed attend exactly. Runs:

* ``exact``: no layer quantized (the bf16 reference);
* ``all k2v2`` and ``all k4v2``: every layer 2-bit (or 4-bit) keys, 2-bit values;
* ``k4 at layer L``: all layers k2v2 except layer L with 4-bit keys, for every L: how much each layer's keys cost;
* ``k4 at the top N layers``: the N layers that recover most, together.

    python benchmarks/layer_sensitivity.py --windows 1 --out layer_sensitivity.json

Simulation, not the engine: use it to choose layers for a per-layer policy, then measure the policy with kivi-eval.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import oracle  # noqa: E402

#: layer index -> (k_bits, v_bits), or (k_bits, v_bits, keys) with ``keys`` one of KEY_MODES; absent = exact.
POLICY: dict[int, tuple] = {}
GROUP = 32
#: How keys are fake-quantized (values are always per token, KIVI's way, except "fp8"):
#: "channel": KIVI, per channel over groups of GROUP tokens, scale and min stored in fp16;
#: "channel-fp32-meta": the same, scale and min kept in float32 (isolates fp16 rounding of the min);
#: "token": NOT KIVI, a simulated alternative: one scale and min per token and head over all D channels (the key
#: axis of int4/int8 per-token-head caches and of the paper's "K-T" fake quantization);
#: "fp8": NOT KIVI, keys and values cast to float8 e4m3 with a per-tensor scale of 1.0 and saturation at +-448
#: (vLLM's uncalibrated fp8 cache, simulated; bits are ignored).
KEY_MODES = ("channel", "channel-fp32-meta", "token", "fp8")


def group_complete(j: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """KIVI's streaming rule: key/value j is read quantized by the query at p iff j's group completed before p."""
    return (j // GROUP + 1) * GROUP <= p


#: Which keys ("k") and values ("v") a query reads quantized: callables (j [1, T], p [T, 1]) -> bool [T, T].
#: kivi-vllm's rule for both; ``residual_length.py`` swaps in the paper's residual rules.
RULE = {"k": group_complete, "v": group_complete}


def _fp8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-448, 448).to(torch.float8_e4m3fn).to(torch.float64)


def fake_quant_kv(key: torch.Tensor, value: torch.Tensor, spec: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized [T, Hkv, D] keys and values (float64) of one sequence under a POLICY entry."""
    k_bits, v_bits, keys = (*spec, "channel")[:3]
    if keys == "fp8":
        return _fp8(key), _fp8(value)
    vq = oracle.dequantized_values(value, v_bits, GROUP)
    if keys == "channel":
        kq = oracle.dequantized_keys(key, k_bits, GROUP)
    elif keys == "channel-fp32-meta":
        kq = oracle.dequantized_keys(key, k_bits, GROUP, fp16_meta=False)
    elif keys == "token":
        kq = oracle.dequantized_values(key, k_bits, key.shape[-1])  # one group = the whole head vector
    else:
        raise ValueError(f"unknown key mode {keys!r}; expected one of {KEY_MODES}")
    return kq, vq


def kivi_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: [B, Hq, T, D] query, [B, Hkv, T, D] key/value (post-RoPE) -> [B, T, Hq, D]."""
    b, hq, t, d = query.shape
    hkv = key.shape[1]
    rep = hq // hkv
    k = key.repeat_interleave(rep, dim=1)
    v = value.repeat_interleave(rep, dim=1)
    spec = POLICY.get(module.layer_idx)
    pos = torch.arange(t)
    causal = pos[None, :] <= pos[:, None]
    s_e = (query @ k.transpose(-1, -2)) * scaling
    if spec is None:
        s = s_e.masked_fill(~causal, float("-inf"))
        out = torch.softmax(s, -1) @ v
        return out.transpose(1, 2).contiguous(), None
    kv = [fake_quant_kv(key[i].transpose(0, 1), value[i].transpose(0, 1), spec) for i in range(b)]
    kq = torch.stack([x[0] for x in kv]).transpose(1, 2).to(query.dtype).repeat_interleave(rep, dim=1)  # [B,Hq,T,D]
    vq = torch.stack([x[1] for x in kv]).transpose(1, 2).to(query.dtype).repeat_interleave(rep, dim=1)
    qk, qv = RULE["k"](pos[None, :], pos[:, None]), RULE["v"](pos[None, :], pos[:, None])
    s = torch.where(qk, (query @ kq.transpose(-1, -2)) * scaling, s_e).masked_fill(~causal, float("-inf"))
    p = torch.softmax(s, -1)
    out = (p * qv) @ vq + (p * ~qv) @ v
    return out.transpose(1, 2).contiguous(), None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="HF model folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--windows", type=int, default=1)
    ap.add_argument("--window-tokens", type=int, default=1024)
    ap.add_argument("--out")
    a = ap.parse_args()
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    from kivi_vllm.eval.perplexity import reference_text, windows
    from kivi_vllm.models import default_model_path

    AttentionInterface.register("kivi_sim", kivi_attention)
    path = a.model or str(default_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="kivi_sim")
    model.eval()
    n_layers = model.config.num_hidden_layers
    w = torch.tensor(windows(tok(reference_text(), add_special_tokens=False)["input_ids"], a.windows,
                             a.window_tokens))

    def ppl(policy: dict) -> float:
        POLICY.clear()
        POLICY.update(policy)
        with torch.no_grad():
            return math.exp(model(w, labels=w).loss.item())

    t0 = time.time()
    res = {"exact": ppl({}), "all k2v2": ppl({i: (2, 2) for i in range(n_layers)}),
           "all k4v2": ppl({i: (4, 2) for i in range(n_layers)})}
    print(f"exact {res['exact']:.3f}  all k2v2 {res['all k2v2']:.3f}  all k4v2 {res['all k4v2']:.3f}  "
          f"({time.time() - t0:.0f} s)", flush=True)
    gain = {}
    for layer in range(n_layers):
        pol = {i: (2, 2) for i in range(n_layers)}
        pol[layer] = (4, 2)
        res[f"k4 at layer {layer}"] = ppl(pol)
        gain[layer] = res["all k2v2"] - res[f"k4 at layer {layer}"]
        print(f"layer {layer:2d} keys at 4 bits: {res[f'k4 at layer {layer}']:.3f} (recovers {gain[layer]:+.3f})",
              flush=True)
    total = res["all k2v2"] - res["all k4v2"]
    ranked = sorted(gain, key=gain.get, reverse=True)
    print(f"\nall layers k2 -> k4 recovers {total:.3f}; the 5 layers that recover most: "
          + ", ".join(f"{L} ({gain[L]:+.3f})" for L in ranked[:5]))
    for top in (2, 5, 10):
        pol = {i: (2, 2) for i in range(n_layers)}
        pol.update({L: (4, 2) for L in ranked[:top]})
        res[f"k4 at the top {top} layers"] = ppl(pol)
        print(f"keys at 4 bits in the {top} most sensitive layers: {res[f'k4 at the top {top} layers']:.3f}",
              flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(dict(perplexity=res, gain=gain, ranked=ranked), indent=1))


if __name__ == "__main__":
    main()
