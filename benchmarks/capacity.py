"""KV-cache capacity of the KIVI page layouts against the unquantized and fp8 caches: tokens, and concurrent
requests of 500 and 4,000 tokens, at the same KV memory.

    python benchmarks/capacity.py                      # arithmetic, SmolLM2-135M and Llama-2-7B shapes
    python benchmarks/capacity.py --measure            # + engine-reported blocks on this machine (CPU, ~2 min)

Arithmetic follows vLLM's allocator: num_blocks = floor(memory / (layers * page_bytes)), a request of L tokens
holds ceil(L / block_size) blocks, so concurrency = floor(num_blocks / ceil(L / block_size)). "per-request pool"
is the alternative layout that is *not* implemented (docs/design.md, "Where the residual lives"): pages of one
group hold only quantized tokens and each of max_num_seqs request slots reserves an exact residual of G tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from kivi_vllm.layout import PageLayout

MODELS = {  # name: (layers, kv heads, head size, KV memory in GiB used for the table, bf16 block size)
    "SmolLM2-135M (CPU, 1 GiB)": (30, 3, 64, 1, 128),
    "Llama-2-7B (H200, 100 GiB)": (32, 32, 128, 100, 16),
}
LENGTHS = (500, 4000)


def rows_for(layers, heads, d, gib, dense_block, max_num_seqs=256):
    mem = gib * 2**30
    out = []

    def add(name, page_bytes_per_head, block, pool_per_req=0.0):
        usable = mem - pool_per_req * max_num_seqs
        blocks = int(usable // (layers * heads * page_bytes_per_head))
        tokens = blocks * block
        conc = {L: min(blocks // math.ceil(L / block), max_num_seqs if pool_per_req else 10**9) for L in LENGTHS}
        out.append(dict(layout=name, block=block, bytes_per_token_head=page_bytes_per_head / block, tokens=tokens,
                        **{f"conc_{L}": c for L, c in conc.items()}))

    add("bf16", dense_block * 2 * d * 2, dense_block)
    add("fp8", dense_block * 2 * d, dense_block)
    for bits in (4, 2):
        for res in ("kv", "k"):
            for B in (256, 512, 1024):
                lay = PageLayout(B, d, bits, bits, 32, res, torch.bfloat16)
                add(f"KIVI-{bits} page B={B} residual={res}", lay.page_bytes, B)
        lay = PageLayout(32, d, bits, bits, 32, "kv", torch.bfloat16)
        pool = layers * heads * 32 * d * 2 * 2  # exact K and V of one open group per request slot
        add(f"KIVI-{bits} per-request pool (max_num_seqs={max_num_seqs}, not implemented)", lay.record_bytes, 32,
            pool_per_req=pool)
    base = out[0]
    for r in out:
        r["x_bf16_tokens"] = r["tokens"] / base["tokens"]
        for L in LENGTHS:
            r[f"x_bf16_{L}"] = r[f"conc_{L}"] / base[f"conc_{L}"]
    return out


def measure(kivi_cfgs):
    """Engine-reported KV tokens and blocks at VLLM_CPU_KVCACHE_SPACE=1 (or on the GPU's profiled memory)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from kivi_vllm.runtime import apply_env_defaults

    apply_env_defaults()
    from vllm import LLM

    from kivi_vllm.models import default_model_path

    res = {}
    for name, kivi in kivi_cfgs.items():
        kw = dict(model=str(default_model_path()), dtype="bfloat16", max_model_len=4096, enforce_eager=True)
        if kivi:
            kw.update(attention_backend="CUSTOM", additional_config={"kivi": kivi})
        llm = LLM(**kw)
        cc = llm.llm_engine.vllm_config.cache_config
        res[name] = dict(tokens=cc.kv_cache_size_tokens, blocks=cc.num_gpu_blocks, block=cc.block_size,
                         **{f"conc_{L}": cc.num_gpu_blocks // math.ceil(L / cc.block_size) for L in LENGTHS})
        llm.llm_engine.engine_core.shutdown()
        del llm
    return res


def fmt(rows):
    head = "| layout | block | B/token/head | tokens | x bf16 | 500-token reqs | x bf16 | 4000-token reqs | x bf16 |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['block']} | {r['bytes_per_token_head']:.1f} | {r['tokens']:,} | "
                     f"{r['x_bf16_tokens']:.2f} | {r['conc_500']:,} | {r['x_bf16_500']:.2f} | {r['conc_4000']:,} | "
                     f"{r['x_bf16_4000']:.2f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measure", action="store_true", help="also start engines here and report their KV blocks")
    ap.add_argument("--json", help="write all rows to this file")
    a = ap.parse_args()
    results = {}
    for name, (layers, heads, d, gib, blk) in MODELS.items():
        rows = rows_for(layers, heads, d, gib, blk)
        results[name] = rows
        print(f"\n### {name}: {layers} layers x {heads} KV heads x head size {d}\n")
        print(fmt(rows))
    if a.measure:
        m = measure({"bf16": None, "KIVI-2 (default)": {"bits": 2}, "KIVI-4": {"bits": 4},
                     "KIVI-2 residual=k": {"bits": 2, "residual": "k"}})
        base = m["bf16"]
        print("\n### Measured by the engine here (SmolLM2-135M, VLLM_CPU_KVCACHE_SPACE=1)\n")
        print("| config | block | blocks | KV tokens | x bf16 | 500-token reqs | x bf16 | 4000-token reqs | x bf16 |")
        print("|" + "---|" * 9)
        for k, r in m.items():
            print(f"| {k} | {r['block']} | {r['blocks']} | {r['tokens']:,} | {r['tokens'] / base['tokens']:.2f} | "
                  f"{r['conc_500']} | {r['conc_500'] / base['conc_500']:.2f} | {r['conc_4000']} | "
                  f"{r['conc_4000'] / base['conc_4000']:.2f} |")
        results["measured"] = m
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
