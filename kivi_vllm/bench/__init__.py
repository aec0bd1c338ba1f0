"""Capacity and throughput benchmark of KV-cache configurations (``kivi-bench``).

* :mod:`.run`: one configuration x one workload in one process: starts vLLM's offline engine, drives it with
  token-id prompts, records vLLM's own per-step scheduler stats and per-request timings, returns a JSON-ready dict.
* :mod:`.report`: merges the run files of an output folder into ``results.json``, a Markdown table with ratios
  against bf16 and fp8, and PNG plots.
* :mod:`.cli`: the ``kivi-bench`` command: each (workload, configuration) runs in its own subprocess, so the
  GPU memory of one engine is freed before the next starts.
"""
