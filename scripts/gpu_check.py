"""Run the KIVI plugin (PyTorch path) inside vLLM on a GPU: model runners V1 and V2, eager and compiled, prefix
caching and chunking invariance, KV capacity. One engine per subprocess; results as JSON lines.

    python scripts/gpu_check.py --model /tmp/smollm2-135m --out results.jsonl

Used on the lent H200 (see ../shared/device/README.md); numbers are quoted in docs/design.md with the date.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

RUNS = {
    # name: (env, engine kwargs, kivi settings or None, what to run)
    "bf16_v2": ({}, dict(enforce_eager=True), None, "agree"),
    "kivi2_v2": ({}, dict(enforce_eager=True), {"bits": 2}, "agree"),
    "kivi2_v1": ({"VLLM_USE_V2_MODEL_RUNNER": "0"}, dict(enforce_eager=True), {"bits": 2}, "agree"),
    "kivi4_v2": ({}, dict(enforce_eager=True), {"bits": 4}, "agree"),
    "kivi2_v2_compiled": ({}, dict(), {"bits": 2}, "agree"),
    "kivi2_v2_prefix": ({}, dict(enforce_eager=True, block_size=64, enable_prefix_caching=True), {"bits": 2}, "shared"),
    "kivi2_v2_chunks48": ({}, dict(enforce_eager=True, block_size=64, enable_prefix_caching=False,
                                   max_num_batched_tokens=48, max_num_seqs=4), {"bits": 2}, "shared"),
}


def one(name: str, model: str) -> dict:
    env, kw, kivi, what = RUNS[name]
    from vllm import LLM, SamplingParams

    from kivi_vllm.prompts import long_prompts, shared_prefix_prompts

    args = dict(model=model, dtype="bfloat16", max_model_len=2048, seed=0, kv_cache_memory_bytes=4 * 2**30,
                max_num_batched_tokens=1024, max_num_seqs=16)
    args.update(kw)
    if kivi:
        args.update(attention_backend="CUSTOM", additional_config={"kivi": kivi})
    t0 = time.time()
    llm = LLM(**args)
    init = time.time() - t0
    cfg = llm.llm_engine.vllm_config
    sp = SamplingParams(temperature=0, max_tokens=64 if what == "agree" else 32, ignore_eos=True)
    res = dict(name=name, init_s=round(init, 1), kv_tokens=cfg.cache_config.kv_cache_size_tokens,
               block_size=cfg.cache_config.block_size, v2=cfg.use_v2_model_runner,
               cudagraph_mode=str(cfg.compilation_config.cudagraph_mode))
    prompts = long_prompts(8) if what == "agree" else shared_prefix_prompts()
    t0 = time.time()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    res["gen_s"] = round(time.time() - t0, 2)
    res["ids"] = [list(o.outputs[0].token_ids) for o in outs]
    if what == "shared":
        res["ids_round2"] = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, sp, use_tqdm=False)]
    res["text0"] = outs[0].outputs[0].text[:120]
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/smollm2-135m")
    ap.add_argument("--out", default="gpu_check.jsonl")
    ap.add_argument("--one")
    ap.add_argument("--only", nargs="*")
    a = ap.parse_args()
    if a.one:
        print("RESULT " + json.dumps(one(a.one, a.model)), flush=True)
        return
    results = {}
    for name in a.only or RUNS:
        env = {**os.environ, **RUNS[name][0]}
        t0 = time.time()
        p = subprocess.run([sys.executable, __file__, "--one", name, "--model", a.model], env=env,
                           capture_output=True, text=True)
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode or not line:
            print(f"{name}: FAILED rc={p.returncode} after {time.time() - t0:.0f} s\n{p.stderr[-3000:]}", flush=True)
            continue
        results[name] = json.loads(line[0][7:])
        r = results[name]
        print(f"{name}: {time.time() - t0:.0f} s, init {r['init_s']} s, gen {r['gen_s']} s, kv_tokens {r['kv_tokens']}, "
              f"block {r['block_size']}, v2 {r['v2']}, cudagraph {r['cudagraph_mode']}: {r['text0']!r}", flush=True)
        with open(a.out, "a") as f:
            f.write(json.dumps(r) + "\n")

    def prefix(x, y):
        return [next((i for i, (p, q) in enumerate(zip(s, t)) if p != q), min(len(s), len(t))) for s, t in zip(x, y)]

    pairs = [("bf16_v2", "kivi2_v2"), ("bf16_v2", "kivi4_v2"), ("kivi2_v2", "kivi2_v1"),
             ("kivi2_v2", "kivi2_v2_compiled"), ("kivi2_v2_prefix", "kivi2_v2_chunks48")]
    for x, y in pairs:
        if x in results and y in results:
            print(f"matching prefix {x} vs {y}: {prefix(results[x]['ids'], results[y]['ids'])}")
    if "kivi2_v2_prefix" in results:
        r = results["kivi2_v2_prefix"]
        print(f"matching prefix kivi2_v2_prefix round1 vs round2 (prefix hits): {prefix(r['ids'], r['ids_round2'])}")


if __name__ == "__main__":
    main()
