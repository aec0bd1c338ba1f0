"""Would the KIVI paper's residual length close KIVI-2's quality gap on SmolLM2? Cache-read perplexity, simulated.

kivi-vllm keeps exact only the open group of each page (0-31 newest tokens at G = 32, docs/design.md section 3).
The paper (Liu et al. 2024, section 3.3 and Algorithm 1) keeps a residual of R = 128 tokens: keys stay exact until R
of them have accumulated, then are quantized R at a time (per channel, groups of G tokens), so 0-127 newest keys are
exact; values stay exact for exactly the last R tokens (quantized one token at a time as they leave the window).
This script runs the Hugging Face model in float32 with the attention function of ``layer_sensitivity.py`` (the
independent float64 oracle's quantizer, every layer KIVI-2), with its rule "key/value j is read quantized by a
query at p" (``layer_sensitivity.RULE``) set per variant:

* ``open group (kivi-vllm)``: key and value j quantized iff its group of G completed before p;
* ``paper R``: keys quantized iff their block of R tokens completed before p, values iff j <= p - R;
* ``keys open group, values last R``: only the value window of the paper;
* ``last R, group-aligned``: keys quantized iff their group of G completed before p - R + G, values iff j <= p - R.

    python benchmarks/residual_length.py --windows 2 --out residual_length.json

Simulation, not the engine: the ``open group`` row reproduces the engine's KIVI-2 figure (docs/quality.md). Two
caveats on "the paper": its code attends to R + 1 exact values in a step (it appends the new value, attends, then
quantizes the oldest), one more than simulated here; and its prefill attends on exact K/V, whereas this is a
cache-read perplexity (every token reads earlier ones as a decode step would), which is what the cache costs.
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
import layer_sensitivity as ls


def blocks(r: int):
    """Quantized iff the block of ``r`` tokens holding j completed before p."""
    return lambda j, p: (j // r + 1) * r <= p


def window(r: int):
    """Quantized iff j is older than the last ``r`` tokens up to p."""
    return lambda j, p: j <= p - r


def variants(g: int, r: int) -> dict:
    return {f"open group (kivi-vllm, G={g})": (blocks(g), blocks(g)),
            f"paper R={r}": (blocks(r), window(r)),
            f"paper R={r // 2}": (blocks(r // 2), window(r // 2)),
            f"keys open group, values last {r}": (blocks(g), window(r)),
            f"last {r}, group-aligned": (lambda j, p: (j // g + 1) * g <= p - r + g, window(r))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="HF model folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--window-tokens", type=int, default=1024)
    ap.add_argument("--residual", type=int, default=128, help="the paper's R")
    ap.add_argument("--bits", type=int, nargs=2, default=[2, 2], metavar=("K", "V"))
    ap.add_argument("--out")
    a = ap.parse_args()
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    from kivi_vllm.eval.perplexity import reference_text, windows
    from kivi_vllm.models import default_model_path

    AttentionInterface.register("kivi_residual_sim", ls.kivi_attention)
    path = a.model or str(default_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="kivi_residual_sim")
    model.eval()
    w = torch.tensor(windows(tok(reference_text(), add_special_tokens=False)["input_ids"], a.windows,
                             a.window_tokens))

    def ppl(quantized: bool) -> float:
        ls.POLICY.clear()
        if quantized:
            ls.POLICY.update({i: tuple(a.bits) for i in range(model.config.num_hidden_layers)})
        with torch.no_grad():
            return math.exp(model(w, labels=w).loss.item())

    res = {"exact": ppl(False)}
    print(f"exact {res['exact']:.3f}", flush=True)
    for name, (krule, vrule) in variants(ls.GROUP, a.residual).items():
        ls.RULE.update(k=krule, v=vrule)
        t0 = time.time()
        res[name] = ppl(True)
        print(f"k{a.bits[0]}v{a.bits[1]}, {name}: {res[name]:.3f} ({100 * (res[name] / res['exact'] - 1):+.1f}%)"
              f" ({time.time() - t0:.0f} s)", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(dict(argv=sys.argv[1:], windows=a.windows, window_tokens=a.window_tokens,
                                               bits=a.bits, perplexity=res), indent=1))


if __name__ == "__main__":
    main()
