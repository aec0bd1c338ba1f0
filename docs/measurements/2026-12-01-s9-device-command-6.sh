#!/usr/bin/env bash
# session 9, device command 6: kivi-bench `decode` on the Llama-3-8B shape with vLLM's fp8 cache, the same day and
# machine as command 5's KIVI-2
source /tmp/kivi-env.sh
mkdir -p $OUT/r
CUDA_VISIBLE_DEVICES=0 MODEL=benchmarks/llama3-8b BENCH_DIR=/tmp/e1 TIME_LIMIT=100 scripts/bench_gpu.sh decode fp8 > $OUT/r/bench.log 2>&1; grep -vE "^(INFO|WARNING|DEBUG|\(EngineCore)" $OUT/r/bench.log | tail -12
cp /tmp/e1/results.json /tmp/e1/results.md $OUT/r/ 2>/dev/null
tar czf $OUT/cmd6.tgz -C $OUT r && rm -rf $OUT/r
