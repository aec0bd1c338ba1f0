#!/usr/bin/env bash
# session 16, device command 8 (same machine): kivi-bench `decode` on the Llama-3-8B shape, KIVI-2 (dependent store;
# the store's warm-up now compiles every launch of serving: the vLLM log should have no "JIT compilation during
# inference"), then vLLM's fp8 cache on the same machine
source /tmp/kivi-env.sh; mkdir -p $OUT/r
for c in kivi2 fp8; do
  CUDA_VISIBLE_DEVICES=0 MODEL=benchmarks/llama3-8b BENCH_DIR=/tmp/e-$c TIME_LIMIT=100 timeout 270 scripts/bench_gpu.sh decode $c > $OUT/r/bench-$c.log 2>&1; echo "$c rc=$?"
  head -8 /tmp/e-$c/results.md
  mkdir -p /tmp/l-$c && tar xzf /tmp/e-$c/logs.tar.gz -C /tmp/l-$c 2>/dev/null; echo "JIT warnings: $(cat /tmp/l-$c/logs/*.log 2>/dev/null | grep -c 'JIT compilation during inference')"
  cp /tmp/e-$c/results.md $OUT/r/results-$c.md 2>/dev/null
done
cd $OUT && tar czf r.tar.gz r && rm -rf r
