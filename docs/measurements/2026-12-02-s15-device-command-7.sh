#!/usr/bin/env bash
# session 15, device command 7 (same machine as command 6): kivi-bench `decode` (512 x (1024 + 1024)) on the
# Llama-3-8B shape, KIVI-2 then vLLM's fp8 cache: the prompt-ramp fix of commit 7c1a3dc (listed store rows one per
# program, one compiled specialization) and the PDL open group, in the engine with torch.compile and CUDA graphs
source /tmp/kivi-env.sh; mkdir -p $OUT/r
for c in kivi2 fp8; do
  CUDA_VISIBLE_DEVICES=0 MODEL=benchmarks/llama3-8b BENCH_DIR=/tmp/e1 TIME_LIMIT=100 timeout 230 scripts/bench_gpu.sh decode $c > $OUT/r/bench-$c.log 2>&1; echo "rc=$?"
  grep -vE "^(INFO|WARNING|DEBUG|\(EngineCore)" $OUT/r/bench-$c.log | tail -3 | cut -c1-300
  grep -iE "JIT compilation during inference" $OUT/r/bench-$c.log | cut -c1-200 | head -5
done
cp /tmp/e1/results.json /tmp/e1/results.md $OUT/r/ 2>/dev/null; cat /tmp/e1/results.md 2>/dev/null | head -20
cd $OUT && tar czf r.tar.gz r && rm -rf r
