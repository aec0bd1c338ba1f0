"""Tensor parallelism with the KIVI cache: greedy tokens and per-GPU KV capacity at TP=1 and TP=2 (needs 2 GPUs).

    python scripts/tp_check.py                        # KIVI-2 and bf16, TP 1 and 2, one JSON object on stdout
    python scripts/tp_check.py --tp 1 3 --model ~/.cache/kivi-vllm/smollm2-135m-instruct   # 3 GPUs, the real model

The model: SmolLM2-135M-Instruct has 9 query and 3 KV heads, which vLLM cannot split over 2 GPUs (heads must divide
by the TP size). By default the script therefore serves ``smollm2-135m-6h``: the same weights with the last of
the three GQA groups removed (query heads 0-5, KV heads 0-1, o_proj columns 0-383), derived once from the default
model into the kivi-vllm cache folder. It is a weaker model, but a real one, and both TP sizes run the same weights.

Also runs on vLLM's CPU build (ranks are processes there too; ``VLLM_CPU_OMP_THREADS_BIND`` then gives each rank
an equal share of the cores unless set), where the KIVI layers take the PyTorch path.

Each (configuration, TP size) runs in its own subprocess (one engine per process; vLLM's TP workers are processes
of their own) with ``kv_cache_memory_bytes`` per GPU fixed, so the capacity per GPU is exact arithmetic: a GPU holds
``num_kv_heads / TP`` heads of every layer, so at TP=2 it holds twice the tokens of TP=1 in the same bytes.
Reported per run: vLLM's blocks and tokens per GPU, the blocks expected from the page size, the mean negative
log-likelihood of the 8 prompts' tokens (vLLM's prompt logprobs: each prompt token scored by a prefill that reads
the KIVI cache as decode would) and greedy tokens; per configuration: the NLL difference and the matching prefix of
TP=2 against TP=1 for each prompt. All-reduces sum in another order than one GPU does, and a last-bit change of a
key can flip a 2-bit code, so greedy tokens may part on near-ties (design.md section 7: eager vs compiled); a TP
bug (wrong heads or pages per rank) instead raises the NLL by a large margin. ``ok`` is true when every run's blocks
equal the expected ones and each configuration's NLL moves by at most max(0.02, 5 x bf16's move) nats, or, with
``--perturb N``, by at most twice the largest move that a one-ulp perturbation of the TP-reduced weights
(:func:`perturbed_model`) causes for that configuration at the first TP size, if that is larger: the noise of a
quantized cache is larger than bf16's, and is measured rather than assumed.

    python scripts/tp_check.py --eager --perturb 3 --out tp_check.json      # 2 GPUs: + 6 runs at TP=1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {"bf16": None, "kivi2": {"bits": 2}}
KV_BYTES = 2 * 2**30  # per GPU
N_TOKENS = 64


def pruned_model(src: Path, dst: Path, groups: int = 2) -> Path:
    """``src`` (a Llama GQA model folder) with only its first ``groups`` KV-head groups: query heads, KV heads and
    o_proj input columns of the others are dropped; every other tensor is copied. Written once."""
    if (dst / "config.json").is_file():
        return dst
    from safetensors.torch import load_file, save_file

    cfg = json.loads((src / "config.json").read_text())
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head = cfg.get("head_dim") or cfg["hidden_size"] // nq
    per = nq // nkv  # query heads per KV head; query head h reads KV head h // per (transformers' repeat_kv)
    q_rows, kv_rows = groups * per * head, groups * head
    tensors = load_file(str(src / "model.safetensors"))
    out = {}
    for name, t in tensors.items():
        if name.endswith("self_attn.q_proj.weight"):
            t = t[:q_rows]
        elif name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            t = t[:kv_rows]
        elif name.endswith("self_attn.o_proj.weight"):
            t = t[:, :q_rows]
        elif "self_attn" in name:
            raise ValueError(f"pruned_model: unexpected attention tensor {name} (biases are not handled)")
        out[name] = t.contiguous()
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(out, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg.update(num_attention_heads=groups * per, num_key_value_heads=groups, head_dim=head)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors") and f.is_file():
            shutil.copy(f, tmp / f.name)
    tmp.rename(dst)
    return dst


def perturbed_model(src: Path, dst: Path, seed: int) -> Path:
    """``src`` with every non-zero element of each ``o_proj`` and ``down_proj`` weight moved by one bf16 unit in the
    last place, up, down or not at all (a third each, seeded): the size of change that a different summation order
    of those products' tensor-parallel all-reduce makes to their outputs. How far the prompt NLL moves under such
    perturbations is the noise a TP comparison must be judged against (a 2-bit code flips when a key moves by one
    last bit across a rounding boundary). Written once per seed.

    Raises:
        ValueError: such a weight is not bfloat16. ``src`` must hold a single ``model.safetensors``."""
    if (dst / "config.json").is_file():
        return dst
    import torch
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = load_file(str(src / "model.safetensors"))
    for name, t in tensors.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            if t.dtype != torch.bfloat16:
                raise ValueError(f"perturbed_model: {name} is {t.dtype}, expected bfloat16")
            step = torch.randint(-1, 2, t.shape, generator=gen, dtype=torch.int16)
            bits = t.view(torch.int16) + torch.where(t != 0, step, torch.zeros_like(step))  # +-1 on the magnitude
            tensors[name] = bits.view(torch.bfloat16).contiguous()
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tmp.rename(dst)
    return dst


def expected_blocks(cfg_json: dict, tp: int, kivi: dict | None, block_size: int) -> int:
    """Blocks per GPU: KV_BYTES // (layers x KV heads per GPU x page bytes per head), page from the layout."""
    import torch

    from kivi_vllm.config import KiviConfig
    from kivi_vllm.layout import PageLayout

    head = cfg_json.get("head_dim") or cfg_json["hidden_size"] // cfg_json["num_attention_heads"]
    heads = max(1, cfg_json["num_key_value_heads"] // tp)
    if kivi is None:
        page = block_size * 2 * head * 2  # bf16 K and V
    else:
        page = PageLayout.from_config(KiviConfig.from_dict(kivi), block_size, head, torch.bfloat16).page_bytes
    return KV_BYTES // (cfg_json["num_hidden_layers"] * heads * page)


def one(config: str, tp: int, model: str, eager: bool) -> dict:
    """One engine: vLLM's KV blocks per GPU and greedy tokens of 8 long prompts."""
    from vllm import LLM, SamplingParams

    from kivi_vllm.prompts import long_prompts

    kivi = CONFIGS[config]
    args = dict(model=model, dtype="bfloat16", tensor_parallel_size=tp, max_model_len=2048, seed=0,
                kv_cache_memory_bytes=KV_BYTES, max_num_seqs=16, enforce_eager=eager)
    if kivi:
        args.update(attention_backend="CUSTOM", additional_config={"kivi": kivi})
    t0 = time.time()
    llm = LLM(**args)
    init = time.time() - t0
    cache = llm.llm_engine.vllm_config.cache_config
    prompts = long_prompts(8)
    scored = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    logprobs = [d[t].logprob for o in scored for t, d in zip(o.prompt_token_ids[1:], o.prompt_logprobs[1:])]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=N_TOKENS, ignore_eos=True), use_tqdm=False)
    cfg_json = json.loads((Path(model) / "config.json").read_text())
    return dict(config=config, tp=tp, init_s=round(init, 1), block_size=cache.block_size,
                blocks_per_gpu=cache.num_gpu_blocks, tokens_per_gpu=cache.num_gpu_blocks * cache.block_size,
                expected_blocks_per_gpu=expected_blocks(cfg_json, tp, kivi, cache.block_size),
                prompt_nll=round(-sum(logprobs) / len(logprobs), 5), scored_tokens=len(logprobs),
                ids=[list(o.outputs[0].token_ids) for o in outs], text0=outs[0].outputs[0].text[:100])


def rank_env(tp: int) -> dict[str, str]:
    """The environment of one run: on vLLM's CPU build with several ranks, unless set, bind each rank's OpenMP
    threads to its own share of the cores (vLLM's automatic binding wants one NUMA node per rank)."""
    from kivi_vllm.runtime import is_vllm_cpu_build

    env = dict(os.environ)
    if tp > 1 and is_vllm_cpu_build() and not env.get("VLLM_CPU_OMP_THREADS_BIND"):
        per = max(1, (os.cpu_count() or tp) // tp)
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
            str(r * per) if per == 1 else f"{r * per}-{r * per + per - 1}" for r in range(tp))
    return env


def matching_prefix(a: list[int], b: list[int]) -> int:
    """Leading tokens two sequences share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> int:
    """Run every (configuration, TP size) in a subprocess and print the comparison as JSON; exit 1 unless ok."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: SmolLM2-135M-Instruct reduced to 6 query / 2 KV heads)")
    ap.add_argument("--tp", type=int, nargs=2, default=[1, 2], metavar=("A", "B"), help="the two TP sizes")
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--eager", action="store_true", help="enforce_eager (default: vLLM's compilation and graphs)")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--perturb", type=int, default=0, metavar="N",
                    help="also run each configuration at the first TP size on N copies of the model whose o_proj and "
                         "down_proj weights moved by one bf16 unit in the last place (seeds 1..N): the NLL noise of a "
                         "last-bit change, which then widens that configuration's bound to twice its largest move")
    ap.add_argument("--one", nargs=2, metavar=("CONFIG", "TP"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.model is None:
        from kivi_vllm.models import cache_dir, default_model_path

        a.model = str(pruned_model(default_model_path(), cache_dir() / "smollm2-135m-6h"))
    if a.one:
        print("RESULT " + json.dumps(one(a.one[0], int(a.one[1]), a.model, a.eager)), flush=True)
        return 0

    def run(config: str, tp: int, model: str) -> dict:
        cmd = [sys.executable, __file__, "--model", model, "--one", config, str(tp)] + (["--eager"] * a.eager)
        p = subprocess.run(cmd, capture_output=True, text=True, env=rank_env(tp))
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode or not line:
            return dict(failed=True, rc=p.returncode, stderr_tail=p.stderr[-3000:])
        return json.loads(line[0][len("RESULT "):])

    runs = {}
    lo, hi = a.tp
    for config in a.configs:
        for tp in a.tp:
            runs[f"{config}_tp{tp}"] = run(config, tp, a.model)
    noise = {}
    if a.perturb:
        from kivi_vllm.models import cache_dir

        for i in range(1, a.perturb + 1):
            model = str(perturbed_model(Path(a.model), cache_dir() / f"{Path(a.model).name}-ulp{i}", seed=i))
            for config in a.configs:
                runs[f"{config}_tp{lo}_ulp{i}"] = r = run(config, lo, model)
                base = runs[f"{config}_tp{lo}"]
                if "prompt_nll" in r and "prompt_nll" in base:
                    noise.setdefault(config, []).append(round(r["prompt_nll"] - base["prompt_nll"], 5))
    report = dict(model=a.model, tp=a.tp, kv_cache_memory_bytes_per_gpu=KV_BYTES, tokens_per_prompt=N_TOKENS,
                  runs={k: {f: v for f, v in r.items() if f != "ids"} for k, r in runs.items()}, compare={})
    ok = all(not r.get("failed") and r["blocks_per_gpu"] == r["expected_blocks_per_gpu"] for r in runs.values())
    for config in a.configs:
        x, y = runs.get(f"{config}_tp{lo}", {}), runs.get(f"{config}_tp{hi}", {})
        if "ids" in x and "ids" in y:
            pref = [matching_prefix(s, t) for s, t in zip(x["ids"], y["ids"])]
            report["compare"][config] = dict(
                prompt_nll_change=round(y["prompt_nll"] - x["prompt_nll"], 5), matching_prefix=pref,
                identical_prompts=sum(p == N_TOKENS for p in pref),
                tokens_per_gpu_ratio=round(y["tokens_per_gpu"] / x["tokens_per_gpu"], 3))
    c = report["compare"]
    if noise:
        report["nll_change_one_ulp"] = noise  # per configuration, one entry per perturbed copy
    if "bf16" in c and len(c) == len(a.configs):
        bound = max(0.02, 5 * abs(c["bf16"]["prompt_nll_change"]))
        report["nll_bound"] = {k: round(max(bound, 2 * max(map(abs, noise.get(k, [0])))), 5) for k in c}
        ok = ok and all(abs(v["prompt_nll_change"]) <= report["nll_bound"][k] for k, v in c.items())
    else:
        ok = False
    report["ok"] = ok
    text = json.dumps(report, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
