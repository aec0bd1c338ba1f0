"""Cache-read perplexity: prompt log-probabilities where later tokens read earlier tokens from the KV cache.

A window of W tokens is prefilled in chunks of C tokens (vLLM's chunked prefill, ``max_num_batched_tokens = C``), and
the engine returns the log-probability of every prompt token (``prompt_logprobs=0``). Only the current chunk is
computed from exact K/V; everything before it is read from the cache, quantized. With KIVI's default streaming prefill
even a token of the current chunk reads every group completed before it dequantized, exactly as a decode step would
(docs/design.md §5), so the figure does not depend on C. For bf16 and fp8 caches the chunking is what makes later
tokens read the cache. Perplexity of a prefill that attends with exact K/V only would say nothing about the cache,
so it is never reported here.

Text: the Python reference manual that ships with CPython (``pydoc_data.topics``, topics in sorted order), or the
user's files; fixed, non-overlapping windows from the start of the token stream, the same for every configuration.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ..prompts import reference_text  # noqa: F401  (the default text; re-exported for kivi-eval and the tests)
from ..runtime import shutdown_engine

#: Configurations by name: None = the model dtype (bf16) cache; a str = vLLM's ``kv_cache_dtype``; a dict = KIVI
#: settings (``additional_config["kivi"]``).
CONFIGS: dict[str, object] = {
    "bf16": None,
    "fp8": "fp8",
    "fp8_e5m2": "fp8_e5m2",
    "kivi4": {"bits": 4},
    "kivi2": {"bits": 2},
    "kivi2-g64": {"bits": 2, "group_size": 64},
    "kivi2-g128": {"bits": 2, "group_size": 128},
    "kivi2-residual-k": {"bits": 2, "residual": "k"},
    "kivi2-g16": {"bits": 2, "group_size": 16},
    "kivi-k4v2": {"k_bits": 4, "v_bits": 2},
    "kivi-k2v4": {"k_bits": 2, "v_bits": 4},
    "kivi4-prefill-exact": {"bits": 4, "prefill": "exact"},
    "kivi2-prefill-exact": {"bits": 2, "prefill": "exact"},
}


#: Separates a configuration name from per-layer bits in :func:`config_settings` names (``kivi2@0,29=k4v2``).
LAYER_SEP = "@"


def config_settings(name: str) -> object:
    """The settings of a configuration name: a :data:`CONFIGS` name, optionally followed by per-layer bits for a
    KIVI configuration, each as ``@INDICES=SETTING`` (``kivi-serve --kivi-layer``'s syntax, see
    :func:`kivi_vllm.config.parse_layer_setting`). Example: ``kivi2@0,29=k4v2`` is KIVI-2 with layers 0 and 29 at
    4-bit keys and 2-bit values; ``kivi2@0=k4v4@29=k4`` gives each layer its own setting.

    Raises:
        ValueError: an unknown base name, per-layer bits on a non-KIVI configuration, or a bad layer setting.
    """
    from ..config import KiviConfig, KiviConfigError, parse_layer_setting

    base, *layer_parts = name.split(LAYER_SEP)
    if base not in CONFIGS:
        raise ValueError(f"unknown configuration {base!r}; known: {', '.join(sorted(CONFIGS))} (optionally followed "
                         f"by {LAYER_SEP}INDICES=SETTING for per-layer bits, e.g. kivi2{LAYER_SEP}0,29=k4v2)")
    settings = CONFIGS[base]
    if not layer_parts:
        return settings
    if settings is None or isinstance(settings, str):
        raise ValueError(f"{name!r}: per-layer bits apply to KIVI configurations only, not {base!r}")
    layers: dict[str, dict[str, int]] = {}
    try:
        for part in layer_parts:
            layers.update(parse_layer_setting(part))
        out = {**settings, "layers": layers}
        KiviConfig.from_dict(out)  # validates
    except KiviConfigError as e:
        raise ValueError(f"{name!r}: {e}") from None
    return out


def windows(token_ids: Sequence[int], count: int, length: int) -> list[list[int]]:
    """``count`` consecutive non-overlapping windows of ``length`` tokens from the start of ``token_ids``.

    Raises:
        ValueError: the text is shorter than ``count * length`` tokens.
    """
    if len(token_ids) < count * length:
        raise ValueError(f"the text has {len(token_ids)} tokens, fewer than {count} windows x {length}")
    return [list(token_ids[i * length : (i + 1) * length]) for i in range(count)]


@dataclass
class Result:
    """Mean negative log-likelihood (nats per token) over every scored token; perplexity = exp(nll)."""

    config: str
    nll: float
    tokens: int
    seconds: float
    kv_tokens: int | None  #: vLLM's "GPU KV cache size" (max concurrency x max_model_len: depends on max_model_len)
    nonfinite: int = 0  #: prompt log-probabilities that were NaN or -inf (the NLL is then NaN: a broken cache path)
    kv_pool_tokens: int | None = None  #: the pool's capacity, num_gpu_blocks x block_size (the memory cost)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


def engine_args(model: str, config: object, chunk: int, window: int, **extra) -> dict:
    """vLLM ``LLM(**kwargs)`` for one configuration: chunked prefill of ``chunk`` tokens, no prefix caching, eager."""
    kw = dict(model=model, dtype="bfloat16", max_model_len=window + 16, enforce_eager=True, seed=0,
              max_num_batched_tokens=chunk, max_num_seqs=8, enable_chunked_prefill=True, enable_prefix_caching=False)
    if isinstance(config, str):
        kw["kv_cache_dtype"] = config
    elif isinstance(config, dict):
        kw.update(attention_backend="CUSTOM", additional_config={"kivi": config})
    kw.update(extra)
    return kw


def score(llm, token_windows: list[list[int]]) -> tuple[float, int, int]:
    """(mean NLL in nats, number of scored tokens, how many log-probabilities were not finite) of the windows'
    tokens after the first of each window."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in token_windows], sp, use_tqdm=False)
    total, n, bad = 0.0, 0, 0
    for w, o in zip(token_windows, outs):
        for tok, lp in zip(w[1:], o.prompt_logprobs[1:]):
            x = lp[tok].logprob
            bad += not math.isfinite(x)
            total -= x
            n += 1
    return total / n, n, bad


def evaluate(model: str, name: str, config: object, token_windows: list[list[int]], chunk: int,
             **extra) -> Result:
    """Start one engine for ``config``, score the windows, shut it down."""
    from vllm import LLM

    llm = LLM(**engine_args(model, config, chunk, max(len(w) for w in token_windows), **extra))
    try:
        cache = llm.llm_engine.vllm_config.cache_config
        t0 = time.time()
        nll, n, bad = score(llm, token_windows)
        return Result(name, nll, n, time.time() - t0, cache.kv_cache_size_tokens, bad,
                      cache.num_gpu_blocks * cache.block_size)
    finally:
        shutdown_engine(llm)
