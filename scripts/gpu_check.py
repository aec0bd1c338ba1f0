"""Run the KIVI plugin inside vLLM on a GPU: Triton kernels against the PyTorch path (``KIVI_ATTENTION_PATH=torch``),
eager and with vLLM's default compilation (torch.compile + CUDA graphs), prefix caching and chunking invariance,
KV capacity, and a Llama-2-7B-shaped load (dummy weights, ``benchmarks/llama2-7b/config.json``). One engine per
subprocess; results as JSON lines.

    python scripts/gpu_check.py --model /tmp/smollm2-135m --out results.jsonl            # SmolLM2 runs
    python scripts/gpu_check.py --only llama7b_kivi2_load --out results.jsonl            # 1024 x (1024 + 256)

Used on the lent H200 (see ../shared/device/README.md); numbers are quoted in docs/design.md with the date.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TORCH = {"KIVI_ATTENTION_PATH": "torch"}
LLAMA7B = str(Path(__file__).resolve().parents[1] / "benchmarks" / "llama2-7b")
LAYERS = {"0": {"k_bits": 4}, "29": {"exact": True}}  # SmolLM2 has 30 decoder layers
RUNS = {
    # name: (env, engine kwargs, kivi settings or None, what to run); Triton path unless env says torch
    "bf16": ({}, dict(enforce_eager=True), None, "agree"),
    "kivi2_torch": (TORCH, dict(enforce_eager=True), {"bits": 2}, "agree"),
    "kivi2_triton": ({}, dict(enforce_eager=True), {"bits": 2}, "agree"),
    "kivi2_triton_graphs": ({}, dict(), {"bits": 2}, "agree"),
    "kivi4_torch": (TORCH, dict(enforce_eager=True), {"bits": 4}, "agree"),
    "kivi4_triton": ({}, dict(enforce_eager=True), {"bits": 4}, "agree"),
    "kivi4_triton_graphs": ({}, dict(), {"bits": 4}, "agree"),
    "kivi2_triton_v1": ({"VLLM_USE_V2_MODEL_RUNNER": "0"}, dict(), {"bits": 2}, "agree"),
    "kivi2_triton_prefix": ({}, dict(block_size=64, enable_prefix_caching=True), {"bits": 2}, "shared"),
    "kivi2_triton_chunks48": ({}, dict(block_size=64, enable_prefix_caching=False, max_num_batched_tokens=48,
                                       max_num_seqs=4), {"bits": 2}, "shared"),
    # per-layer policy (issue 4): 4-bit keys in layer 0 and vLLM's own FlashAttention cache in layer 29, next to
    # KIVI Triton layers, eager and with FULL CUDA graphs; every layer exact must give the bf16 engine's tokens
    "kivi2_layers": ({}, dict(enforce_eager=True), {"bits": 2, "layers": LAYERS}, "agree"),
    "kivi2_layers_graphs": ({}, dict(), {"bits": 2, "layers": LAYERS}, "agree"),
    "bf16_graphs": ({}, dict(), None, "agree"),
    "all_exact_graphs": ({}, dict(), {"bits": 2, "layers": {str(i): {"exact": True} for i in range(30)}}, "agree"),
    "llama7b_kivi2_load": ({}, dict(model=LLAMA7B, load_format="dummy", skip_tokenizer_init=True,
                                    max_model_len=4096, gpu_memory_utilization=0.90, kv_cache_memory_bytes=None,
                                    max_num_batched_tokens=None, max_num_seqs=None), {"bits": 2}, "load"),
    "llama7b_bf16_load": ({}, dict(model=LLAMA7B, load_format="dummy", skip_tokenizer_init=True,
                                   max_model_len=4096, gpu_memory_utilization=0.90, kv_cache_memory_bytes=None,
                                   max_num_batched_tokens=None, max_num_seqs=None), None, "load"),
}
DEFAULT = [n for n in RUNS if not n.startswith("llama7b")]  # SmolLM2 runs


def one(name: str, model: str) -> dict:
    env, kw, kivi, what = RUNS[name]
    from vllm import LLM, SamplingParams

    from kivi_vllm.prompts import long_prompts, shared_prefix_prompts

    args = dict(model=model, dtype="bfloat16", max_model_len=2048, seed=0, kv_cache_memory_bytes=4 * 2**30,
                max_num_batched_tokens=1024, max_num_seqs=16)
    args.update(kw)
    args = {k: v for k, v in args.items() if v is not None}
    if kivi:
        args.update(attention_backend="CUSTOM", additional_config={"kivi": kivi})
    t0 = time.time()
    llm = LLM(**args)
    init = time.time() - t0
    cfg = llm.llm_engine.vllm_config
    res = dict(name=name, init_s=round(init, 1), kv_tokens=cfg.cache_config.kv_cache_size_tokens,
               block_size=cfg.cache_config.block_size, v2=cfg.use_v2_model_runner,
               cudagraph_mode=str(cfg.compilation_config.cudagraph_mode),
               kivi_path=os.environ.get("KIVI_ATTENTION_PATH", "auto"))
    if what == "load":  # 1024 requests x (1024 prompt + 256 generated tokens), token-id prompts, ignore_eos
        import random

        from vllm.inputs import TokensPrompt

        rng = random.Random(0)
        prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(100, 32000) for _ in range(1024)])
                   for _ in range(1024)]
        sp = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
        t0 = time.time()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        res["gen_s"] = round(time.time() - t0, 2)
        lens = [len(o.outputs[0].token_ids) for o in outs]
        res.update(requests=len(outs), complete=sum(n == 256 for n in lens),
                   output_tok_s=round(sum(lens) / res["gen_s"], 1), max_num_seqs=cfg.scheduler_config.max_num_seqs,
                   text0="")
        return res
    sp = SamplingParams(temperature=0, max_tokens=64 if what == "agree" else 32, ignore_eos=True)
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
    for name in a.only or DEFAULT:
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
        r["graph_log"] = [x[-200:] for x in (p.stdout + p.stderr).splitlines() if "CUDA graph" in x or "cudagraph" in x][-6:]
        print(f"{name}: {time.time() - t0:.0f} s, init {r['init_s']} s, gen {r['gen_s']} s, kv_tokens {r['kv_tokens']}, "
              f"block {r['block_size']}, v2 {r['v2']}, cudagraph {r['cudagraph_mode']}: {r['text0']!r}", flush=True)
        with open(a.out, "a") as f:
            f.write(json.dumps(r) + "\n")

    def prefix(x, y):
        return [next((i for i, (p, q) in enumerate(zip(s, t)) if p != q), min(len(s), len(t))) for s, t in zip(x, y)]

    pairs = [("kivi2_torch", "kivi2_triton"), ("kivi4_torch", "kivi4_triton"),
             ("kivi2_triton", "kivi2_triton_graphs"), ("kivi4_triton", "kivi4_triton_graphs"),
             ("kivi2_triton_graphs", "kivi2_triton_v1"), ("bf16", "kivi2_triton"), ("bf16", "kivi4_triton"),
             ("bf16", "kivi2_torch"), ("bf16", "kivi4_torch"), ("kivi2_triton_prefix", "kivi2_triton_chunks48"),
             ("kivi2_layers", "kivi2_layers_graphs"), ("bf16", "kivi2_layers"), ("bf16_graphs", "all_exact_graphs")]
    for x, y in pairs:
        if x in results and y in results:
            print(f"matching prefix {x} vs {y}: {prefix(results[x]['ids'], results[y]['ids'])}")
    if "kivi2_triton_prefix" in results:
        r = results["kivi2_triton_prefix"]
        print(f"matching prefix kivi2_triton_prefix round1 vs round2 (prefix hits): {prefix(r['ids'], r['ids_round2'])}")
    for name, r in results.items():
        if "complete" in r:
            print(f"{name}: {r['complete']}/{r['requests']} complete in {r['gen_s']} s, {r['output_tok_s']} output tok/s, "
                  f"kv_tokens {r['kv_tokens']}, max_num_seqs {r['max_num_seqs']}, graphs {r['graph_log'][-2:]}")


if __name__ == "__main__":
    main()
