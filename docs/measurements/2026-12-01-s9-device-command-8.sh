#!/usr/bin/env bash
# session 9, device command 8: kivi-bench `long` with 768 requests (768 x (3584 + 512), 3.1M tokens: more than
# fp8's 1.78M-token cache holds, within KIVI-2's 3.74M) on the Llama-3-8B shape, fp8 (commands 7 and 8 the same day)
source /tmp/kivi-env.sh
mkdir -p $OUT/r
CUDA_VISIBLE_DEVICES=0 MODEL=benchmarks/llama3-8b BENCH_DIR=/tmp/e2 NUM_REQUESTS=768 TIME_LIMIT=230 scripts/bench_gpu.sh long fp8 > $OUT/r/bench.log 2>&1; grep -vE "^(INFO|WARNING|DEBUG|\(EngineCore)" $OUT/r/bench.log | tail -6 | cut -c1-600
cp /tmp/e2/results.json /tmp/e2/results.md $OUT/r/ 2>/dev/null
tar czf $OUT/cmd8.tgz -C $OUT r && rm -rf $OUT/r
