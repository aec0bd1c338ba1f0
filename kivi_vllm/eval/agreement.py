"""Greedy agreement with the bf16 cache: do a quantized cache's greedy tokens follow the bf16 cache's?

Prompts: :func:`kivi_vllm.prompts.long_prompts` (sections of the Python reference manual plus a question, about
350-450 SmolLM2 tokens, so most of each context sits in quantized groups), the same for every configuration. Each
configuration generates ``tokens`` greedy tokens per prompt (``ignore_eos``) in one ``generate`` call. Two measures
against the reference (bf16) tokens of the same prompt:

* matching prefix: how many leading tokens equal the reference's (one early divergence ends it, so it measures how
  long a quantized cache follows the exact one);
* position-wise agreement: the share of positions whose token equals the reference's token at that position,
  over all prompts (it keeps counting after a divergence, when the continuations may realign).

Exact-match agreement is harsh on a small model whose top two tokens are often close; docs/quality.md reads it
beside the cache-read perplexity.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from ..prompts import matching_prefix

#: The defaults of ``kivi-eval --tasks agreement`` (the issue's setting).
DEFAULT_PROMPTS = 8
DEFAULT_TOKENS = 128
#: Engine settings of the agreement runs: prompts prefilled in steps of up to 1,024 tokens (the engine tests' and
#: the old ``benchmarks/agreement.py`` setting), all prompts decoded in one batch.
CHUNK = 1024


@dataclass
class Agreement:
    """Agreement of one configuration's tokens with the reference's, prompt by prompt."""

    matching_prefix: list[int]
    positionwise: float  #: matching positions / reference tokens, over all prompts

    @property
    def mean_prefix(self) -> float:
        return sum(self.matching_prefix) / len(self.matching_prefix)


def agreement(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> Agreement:
    """Matching prefix per prompt and position-wise agreement of ``other`` with ``reference``.

    A position missing from ``other`` (a shorter continuation) counts as a mismatch.

    Raises:
        ValueError: different numbers of prompts, or no reference tokens at all.
    """
    if len(reference) != len(other):
        raise ValueError(f"{len(reference)} reference continuations but {len(other)} to compare")
    total = sum(len(r) for r in reference)
    if total == 0:
        raise ValueError("no reference tokens")
    same = sum(x == y for r, o in zip(reference, other) for x, y in zip(r, o))
    return Agreement([matching_prefix(r, o) for r, o in zip(reference, other)], same / total)


@dataclass
class Generation:
    """Greedy tokens of one configuration."""

    config: str
    ids: list[list[int]]
    prompt_tokens: list[int]
    seconds: float  #: the ``generate`` call alone (engine start excluded)
    kv_tokens: int | None = None


def generate(model: str, name: str, config: object, prompts: Sequence[str], tokens: int,
             max_prompt_tokens: int) -> Generation:
    """Start one engine for ``config`` (a :data:`kivi_vllm.eval.perplexity.CONFIGS` value), generate ``tokens``
    greedy tokens for every prompt in one batch, shut it down. ``max_prompt_tokens`` sizes ``max_model_len``."""
    from vllm import LLM, SamplingParams

    from ..runtime import shutdown_engine
    from .perplexity import engine_args

    llm = LLM(**engine_args(model, config, CHUNK, max_prompt_tokens + tokens, max_num_seqs=max(8, len(prompts))))
    try:
        kv_tokens = llm.llm_engine.vllm_config.cache_config.kv_cache_size_tokens
        sp = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        t0 = time.time()
        outs = llm.generate(list(prompts), sp, use_tqdm=False)
        seconds = time.time() - t0
    finally:
        shutdown_engine(llm)
    return Generation(name, [list(o.outputs[0].token_ids) for o in outs],
                      [len(o.prompt_token_ids) for o in outs], seconds, kv_tokens)
