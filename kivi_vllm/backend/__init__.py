"""vLLM glue for the KIVI cache: backend (static facts), metadata (per step), impl (per layer)."""
