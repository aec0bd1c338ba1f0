"""Passkey retrieval ("needle in a haystack"): a random 5-digit key hidden at several depths of filler text.

The prompt is the classic one (Mohtashami & Jaggi 2023, used in KIVI's long-context example): repeated filler
sentences with "The pass key is NNNNN. Remember it. NNNNN is the pass key." inserted at a fraction ``depth`` of the
filler, then "What is the pass key? The pass key is". The model answers greedily (8 tokens). A trial succeeds when
the key's five digits appear in the answer. The context lengths are approximate (filler repeats are fitted to the
tokenizer) and reported exactly. The bf16 cache runs first: only lengths where bf16 succeeds say anything about a
quantized cache.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "What is the pass key? The pass key is"


def make_prompt(tokenizer, key: int, depth: float, target_tokens: int) -> tuple[list[int], int]:
    """Token ids of one passkey prompt of about ``target_tokens`` tokens with the key at ``depth`` (0 = start,
    1 = end of the filler). Returns (ids, length)."""
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    unit = len(tokenizer(FILLER, add_special_tokens=False)["input_ids"])
    fixed = len(tokenizer(needle + QUESTION, add_special_tokens=False)["input_ids"])
    n = max(1, (target_tokens - fixed) // unit)
    before = round(n * depth)
    text = FILLER * before + needle + FILLER * (n - before) + QUESTION
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids, len(ids)


@dataclass
class PasskeyResult:
    """Accuracy per (target length, depth), the exact prompt lengths, and the answers of failed trials."""

    config: str
    accuracy: dict[tuple[int, float], float] = field(default_factory=dict)
    lengths: dict[int, int] = field(default_factory=dict)
    failures: list[tuple[int, float, int, str]] = field(default_factory=list)


def run(llm, tokenizer, config: str, lengths=(1024, 2048, 4096), depths=(0.0, 0.25, 0.5, 0.75, 1.0), trials: int = 2,
        seed: int = 0) -> PasskeyResult:
    """All trials of one engine in one ``generate`` call; keys drawn from ``random.Random(seed)``, so every
    configuration gets the same prompts."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    rng = random.Random(seed)
    cases, prompts = [], []
    for length in lengths:
        for depth in depths:
            for _ in range(trials):
                key = rng.randrange(10000, 100000)
                ids, n = make_prompt(tokenizer, key, depth, length)
                cases.append((length, depth, key, n))
                prompts.append(TokensPrompt(prompt_token_ids=ids))
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    res = PasskeyResult(config)
    hits: dict[tuple[int, float], list[bool]] = {}
    for (length, depth, key, n), o in zip(cases, outs):
        answer = o.outputs[0].text
        ok = str(key) in answer.replace(" ", "")
        hits.setdefault((length, depth), []).append(ok)
        res.lengths[length] = n
        if not ok:
            res.failures.append((length, depth, key, answer))
    res.accuracy = {k: sum(v) / len(v) for k, v in hits.items()}
    return res
