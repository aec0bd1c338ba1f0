"""Quality evaluation of KV-cache configurations (``kivi-eval``): cache-read perplexity, passkey retrieval and greedy
agreement with the bf16 cache, on the Python reference manual."""
