"""Key outliers from a large k_proj bias: does KIVI-2 collapse, and does a per-layer policy recover? (simulation)

Qwen2/2.5 carry a huge key-projection bias at their first and last layers, and low-bit key caches collapse on them
(../shared/docs/kivi-and-peers.md). SmolLM2 has no bias, so this script builds one: a bias on the k_proj of a few
layers (default 0 and 29), on 4 channels of every KV head with magnitudes m, m/2, m/4, m/10 and alternating signs
(m = 500: 500, -250, 125, -50, like Qwen2's few large channels). Where the channels sit in the rotary embedding
decides what the bias does, so two placements are built:

* ``lowfreq``: channels 30, 31, 62, 63, the two lowest-frequency rotary pairs (SmolLM2: rope_theta 1e5, so they
  turn by at most 0.015 rad over 1,024 tokens). Post-RoPE the bias is then nearly a per-channel constant, and
  q.(k + b) adds nearly the same q.b to every score of a query, which softmax ignores: the exact model is
  (nearly) unchanged. This is the lead's hypothesis's setting.
* ``highfreq``: channels 0, 1, 32, 33, the highest-frequency pairs (about 1 rad per token). RoPE turns the bias
  into a position-dependent term: a different model, whose exact perplexity is reported as its own baseline.

The model runs in float32 with :func:`layer_sensitivity.kivi_attention` (KIVI's streaming visibility rule, the
float64 oracle quantizer of ``tests/oracle.py``), on kivi-eval's windows (fixed 1,024-token windows of the Python
reference manual from its start). Configurations (key modes in ``layer_sensitivity.KEY_MODES``):

* exact; KIVI-4 and KIVI-2 (keys per channel over 32-token groups, fp16 scale and min: the plugin's format);
* KIVI-2 with scale/min kept in float32 (does the fp16 rounding of a large min matter?);
* NOT KIVI, simulated alternatives: keys per token (one scale and min per token and head over all 64 channels, the
  axis of int4/int8 per-token-head caches) at 4 and 2 bits with per-token values of the same bits; fp8 e4m3 with a
  per-tensor scale 1.0 (vLLM's uncalibrated fp8 cache);
* the per-layer policy: KIVI-2 (and per-token 2-bit) with the bias layers exact, and KIVI-2 with 4-bit keys there.

    python benchmarks/outliers.py --windows 1 --out outliers.json
    python benchmarks/outliers.py --placements --save-model /tmp/kbias-highfreq --save-placement highfreq
    kivi-eval --model /tmp/kbias-highfreq --configs bf16 kivi4 kivi2 --windows 2     # the same model in the engine
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import layer_sensitivity as ls  # noqa: E402

#: Channel placements within each KV head (head size 64, HF/vLLM neox rotary: channel c pairs with c + 32 and turns
#: at rope_theta ** (-2 (c mod 32) / 64) rad per token).
PLACEMENTS = {"lowfreq": (31, 63, 30, 62), "highfreq": (0, 32, 1, 33)}
SHAPE = (1.0, -0.5, 0.25, -0.1)  #: bias of the 4 channels, times the magnitude m


def bias_vector(num_kv_heads: int, head_size: int, channels: tuple[int, ...], magnitude: float) -> torch.Tensor:
    """The k_proj bias [num_kv_heads * head_size]: ``magnitude * SHAPE`` on ``channels`` of every KV head."""
    b = torch.zeros(num_kv_heads, head_size)
    for c, f in zip(channels, SHAPE):
        b[:, c] = magnitude * f
    return b.flatten()


def set_key_bias(model, layers: list[int], bias: torch.Tensor | None) -> None:
    """Give ``layers``' k_proj the bias (None removes it)."""
    for i in layers:
        proj = model.model.layers[i].self_attn.k_proj
        proj.bias = None if bias is None else torch.nn.Parameter(bias.to(proj.weight.dtype).clone())


def save_biased_model(src: str, dst: str, layers: list[int], bias: torch.Tensor) -> None:
    """An HF folder of the model with ``attention_bias: true``: the k_proj bias on ``layers``, zero biases on every
    other q/k/v/o projection (Llama's attention_bias gives all four a bias), bf16 weights as the original."""
    import shutil

    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    m.config.attention_bias = True
    for i, layer in enumerate(m.model.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            proj = getattr(layer.self_attn, name)
            b = bias if (name == "k_proj" and i in layers) else torch.zeros(proj.out_features)
            proj.bias = torch.nn.Parameter(b.to(torch.bfloat16).clone())
    m.save_pretrained(dst)
    for f in Path(src).iterdir():  # tokenizer files
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "generation_config")):
            shutil.copy(f, Path(dst) / f.name)


def configs(outlier_layers: list[int], n_layers: int) -> dict[str, dict]:
    """Name -> POLICY for every configuration of the table."""
    every = lambda spec: {i: spec for i in range(n_layers)}  # noqa: E731

    def but(spec, protected):
        pol = every(spec)
        for i in outlier_layers:
            if protected is None:
                pol.pop(i)
            else:
                pol[i] = protected
        return pol

    return {
        "exact": {},
        "KIVI-4": every((4, 4)),
        "KIVI-2": every((2, 2)),
        "KIVI-2, scale/min in fp32": every((2, 2, "channel-fp32-meta")),
        "per-token keys 4-bit (not KIVI)": every((4, 4, "token")),
        "per-token keys 2-bit (not KIVI)": every((2, 2, "token")),
        "fp8 e4m3, scale 1 (not KIVI)": every((8, 8, "fp8")),
        "KIVI-2, bias layers exact": but((2, 2), None),
        "KIVI-2, bias layers k4": but((2, 2), (4, 2)),
        "per-token 2-bit, bias layers exact": but((2, 2, "token"), None),
    }


def key_error(model, w: torch.Tensor, layer: int, channels: tuple[int, ...]) -> dict:
    """RMS error of layer ``layer``'s dequantized keys on the bias channels and on the others, per key mode (the
    first window's completed groups), and the RMS error of the attention scores q.k/sqrt(D) those errors cause."""
    captured = {}
    original = ls.kivi_attention

    def capture(module, query, key, value, *a, **kw):
        if module.layer_idx == layer:
            captured["q"], captured["k"] = query[0].detach(), key[0].detach()
        return original(module, query, key, value, *a, **kw)

    from transformers import AttentionInterface

    AttentionInterface.register("kivi_sim", capture)
    ls.POLICY.clear()
    with torch.no_grad():
        model(w[:1])
    AttentionInterface.register("kivi_sim", original)
    q, k = captured["q"], captured["k"]  # [Hq, T, D], [Hkv, T, D]
    t, d = k.shape[1], k.shape[2]
    n = t // ls.GROUP * ls.GROUP
    mask = torch.zeros(d, dtype=torch.bool)
    mask[list(channels)] = True
    out = {}
    for mode, bits in (("channel", 2), ("channel-fp32-meta", 2), ("token", 2), ("token", 4), ("fp8", 8)):
        kq, _ = ls.fake_quant_kv(k.transpose(0, 1), k.transpose(0, 1), (bits, bits, mode))
        err = (kq.transpose(0, 1) - k.double())[:, :n]  # [Hkv, n, D]
        rep = q.shape[0] // k.shape[0]
        s_err = (q.double()[:, :n] @ err.repeat_interleave(rep, 0).transpose(-1, -2)) / math.sqrt(d)
        causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
        out[f"{mode} {bits}-bit"] = dict(
            key_rms_bias_channels=err[..., mask].pow(2).mean().sqrt().item(),
            key_rms_other_channels=err[..., ~mask].pow(2).mean().sqrt().item(),
            score_rms=s_err[:, causal].pow(2).mean().sqrt().item(),
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="HF model folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--windows", type=int, default=1)
    ap.add_argument("--window-tokens", type=int, default=1024)
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 29], help="layers whose k_proj gets the bias")
    ap.add_argument("--magnitude", type=float, default=500.0, help="m: the largest |bias| (500 = Qwen2-like)")
    ap.add_argument("--placements", nargs="*", default=["none", "lowfreq", "highfreq"],
                    choices=["none", *PLACEMENTS], help="bias placements to evaluate (none = the original model)")
    ap.add_argument("--configs", nargs="*", help="subset of the configuration names (default: all)")
    ap.add_argument("--save-model", help="also write the biased model as an HF folder here (for kivi-eval --model)")
    ap.add_argument("--save-placement", default="lowfreq", choices=list(PLACEMENTS))
    ap.add_argument("--out")
    a = ap.parse_args()
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    from kivi_vllm.eval.perplexity import reference_text, windows
    from kivi_vllm.models import default_model_path

    AttentionInterface.register("kivi_sim", ls.kivi_attention)
    path = a.model or str(default_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="kivi_sim")
    model.eval()
    cfg = model.config
    n_layers, hkv = cfg.num_hidden_layers, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = torch.tensor(windows(tok(reference_text(), add_special_tokens=False)["input_ids"], a.windows,
                             a.window_tokens))
    table = configs(a.layers, n_layers)
    names = a.configs or list(table)

    def ppl(policy: dict) -> float:
        ls.POLICY.clear()
        ls.POLICY.update(policy)
        with torch.no_grad():
            return math.exp(model(w, labels=w).loss.item())

    res: dict = dict(meta=dict(layers=a.layers, magnitude=a.magnitude, windows=a.windows,
                               window_tokens=a.window_tokens, shape=SHAPE, placements=PLACEMENTS), perplexity={},
                     key_error={})
    for placement in a.placements:
        channels = PLACEMENTS.get(placement, PLACEMENTS["lowfreq"])
        set_key_bias(model, a.layers, None if placement == "none" else bias_vector(hkv, d, channels, a.magnitude))
        res["key_error"][placement] = key_error(model, w, a.layers[0], channels)
        print(f"{placement}: layer {a.layers[0]} error RMS (bias channels / others / scores): " + "; ".join(
            f"{k} {v['key_rms_bias_channels']:.3g} / {v['key_rms_other_channels']:.3g} / {v['score_rms']:.3g}"
            for k, v in res["key_error"][placement].items()), flush=True)
        row = res["perplexity"][placement] = {}
        for name in names:
            t0 = time.time()
            row[name] = ppl(table[name])
            print(f"{placement:8s} {name:36s} {row[name]:10.3f}  ({time.time() - t0:.0f} s)", flush=True)
    set_key_bias(model, a.layers, None)
    if a.placements:
        print(f"\n| cache | " + " | ".join(a.placements) + " |\n|---|" + "---:|" * len(a.placements))
        for name in names:
            print(f"| {name} | " + " | ".join(f"{res['perplexity'][p][name]:.3f}" for p in a.placements) + " |")
    if a.save_model:
        bias = bias_vector(hkv, d, PLACEMENTS[a.save_placement], a.magnitude)
        save_biased_model(path, a.save_model, a.layers, bias)
        print(f"wrote {a.save_model}")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
