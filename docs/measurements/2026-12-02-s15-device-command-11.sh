#!/usr/bin/env bash
# session 15, device command 11 (same machine as command 10, run inline, copied here): kivi-bench `decode` on the
# Llama-3-8B shape with vLLM's fp8 cache, for KIVI-2 of command 10 on the same machine
source /tmp/kivi-env.sh; mkdir -p $OUT/r; CUDA_VISIBLE_DEVICES=0 MODEL=benchmarks/llama3-8b BENCH_DIR=/tmp/e1 TIME_LIMIT=100 timeout 200 scripts/bench_gpu.sh decode fp8 > $OUT/r/bench-fp8.log 2>&1; echo "rc=$?"; cat /tmp/e1/results.md | head -8; rm -f $OUT/capacity.png $OUT/tpot_vs_concurrency.png
