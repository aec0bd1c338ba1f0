"""``python -m kivi_vllm.bench``: the same as the ``kivi-bench`` console script."""

from .cli import main

main()
