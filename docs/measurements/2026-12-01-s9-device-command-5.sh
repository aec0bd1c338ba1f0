#!/usr/bin/env bash
# session 9, device command 5 (with the last of the 3 bundle parts; commands 3-4 copied the others): kivi-bench
# `decode` (512 x (1024 + 1024)) on the Llama-3-8B shape, KIVI-2 with the prefetching "tc" loop (compare: eighth
# session 11,510 output tok/s, sixth 11,988; fp8 11,610 in the sixth session), then fp8 the same day (command 6)
bash .devbundle/setup-on-device.sh > /tmp/setup.log 2>&1 || { tail -20 /tmp/setup.log; exit 1; }
source /tmp/kivi-env.sh
mkdir -p $OUT/r
CUDA_VISIBLE_DEVICES=0 MODEL=benchmarks/llama3-8b BENCH_DIR=/tmp/e1 TIME_LIMIT=100 scripts/bench_gpu.sh decode kivi2 > $OUT/r/bench.log 2>&1; grep -vE "^(INFO|WARNING|DEBUG|\(EngineCore)" $OUT/r/bench.log | tail -12
cp /tmp/e1/results.json /tmp/e1/results.md $OUT/r/ 2>/dev/null
tar czf $OUT/cmd5.tgz -C $OUT r && rm -rf $OUT/r
