"""Quality evaluation of KV-cache configurations (``kivi-eval``): cache-read perplexity on the Python reference manual."""
