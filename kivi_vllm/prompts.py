"""Deterministic long prompts from the Python reference manual that ships with CPython (``pydoc_data.topics``).

Used by the tests and benchmarks that compare KIVI with the bf16 cache: prompts must be long (300+ tokens) so that
most of the context sits in quantized groups; short prompts live entirely in the exact residual and prove nothing.
"""

from __future__ import annotations

#: Manual sections used as context, in a fixed order (all present in CPython 3.10-3.13).
TOPICS = ("assignment", "for", "if", "while", "try", "with", "function", "class", "import", "lambda",
          "assert", "return", "global", "pass", "del", "raise")

QUESTIONS = (
    "Summarize the text above in two sentences.",
    "What is the main rule described above?",
    "Explain the text above to a beginner.",
    "List the key points of the text above.",
)


def manual_text(topic: str) -> str:
    """The text of one section of the Python reference manual."""
    from pydoc_data.topics import topics

    return topics[topic]


def reference_text() -> str:
    """The whole Python reference manual, topics in sorted order (the perplexity text of ``kivi-eval``)."""
    from pydoc_data.topics import topics

    return "\n\n".join(manual_text(k) for k in sorted(topics))


def long_prompts(n: int = 8, chars: int = 1600) -> list[str]:
    """``n`` prompts of about ``chars`` characters of manual text (about 350-450 SmolLM2 tokens) plus a question.

    Plain text (no chat template), so any tokenizer and ``LLM.generate`` accept them.
    """
    out = []
    for i in range(n):
        text, k = "", i
        while len(text) < chars:  # short sections are followed by the next ones
            text += manual_text(TOPICS[k % len(TOPICS)]).strip() + "\n\n"
            k += 1
        out.append(f"{text[:chars].rstrip()}\n\n{QUESTIONS[i % len(QUESTIONS)]}\n")
    return out


def matching_prefix(a: list[int], b: list[int]) -> int:
    """Number of leading tokens two sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


#: Questions appended to one shared manual section by :func:`shared_prefix_prompts`.
SHARED_QUESTIONS = ("What does this text describe?", "Give an example.", "Summarize it.", "Who would read this?",
                    "Explain the first sentence.", "What is a target list?")


def shared_prefix_prompts(chars: int = 1200) -> list[str]:
    """Six prompts that share their first ~290 SmolLM2 tokens (one manual section) and differ in the question:
    the workload for prefix caching, chunking and preemption checks."""
    shared = manual_text("assignment").strip()[:chars]
    return [f"{shared}\n\nQuestion: {q}\nAnswer:" for q in SHARED_QUESTIONS]
