#!/usr/bin/env bash
# session 11, device command 11: kivi-bench `decode` (512 x (1024 + 1024)) on the Llama-3-8B shape, KIVI-2 with the
# staged "tc" loop (ninth session: 12,166 output tok/s with the register prefetch), then vLLM's fp8 cache, same machine
source /tmp/kivi-env.sh
mkdir -p $OUT/r
for c in kivi2 fp8; do
  CUDA_VISIBLE_DEVICES=0 MODEL=benchmarks/llama3-8b BENCH_DIR=/tmp/e1 TIME_LIMIT=100 scripts/bench_gpu.sh decode $c > $OUT/r/bench-$c.log 2>&1; echo "rc=$?"
  grep -vE "^(INFO|WARNING|DEBUG|\(EngineCore)" $OUT/r/bench-$c.log | tail -4 | cut -c1-400
done
cp /tmp/e1/results.json /tmp/e1/results.md $OUT/r/ 2>/dev/null
tar czf $OUT/cmd6.tgz -C $OUT r && rm -rf $OUT/r
