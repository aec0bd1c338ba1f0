#!/usr/bin/env bash
# session 7, device command 8 (after command 7, bundle installed): Llama-3-8B shape, `long` with 768 requests
# (3.1M tokens: more than fp8's cache, less than KIVI-2's), fp8 then KIVI-2; results in
# 2026-11-30-s7-h200-kivi-bench-llama3-8b-long768/ (the tool's 8-file limit: results.json/md and the PNGs)
source /tmp/kivi-env.sh && MODEL=benchmarks/llama3-8b BENCH_DIR=out/bench-l3 NUM_REQUESTS=768 TIME_LIMIT=170 \
  scripts/bench_gpu.sh long fp8 kivi2 2>&1 | grep -vE "^\s*$|it/s|Processed prompts|tok/s, " | tail -12
