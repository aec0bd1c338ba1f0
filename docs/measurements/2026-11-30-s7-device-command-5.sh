#!/usr/bin/env bash
# session 7, device command 5 (with the last bundle part): prefill="exact" first chunks through vLLM's FlashAttention:
# the float64 sweep, then per-layer time against the Triton exact prefill and FA3 bf16/fp8
bash .devbundle/setup-on-device.sh > /tmp/setup.log 2>&1 || { tail -20 /tmp/setup.log; exit 1; }
source /tmp/kivi-env.sh
mkdir -p $OUT/r
timeout 200 python scripts/kernel_sweep.py --prefill exact --flash-first-chunks --out $OUT/r/sweep-exact-fa.json > $OUT/r/sweep-exact-fa.log 2>&1; tail -4 $OUT/r/sweep-exact-fa.log
timeout 120 python benchmarks/prefill_attention.py --configs kivi2 kivi4 fa3-bf16 fa3-fp8 --exact --flash-first-chunks --out $OUT/r/prefill-exact-fa.json > $OUT/r/prefill-exact-fa.log 2>&1; grep -E " us |x the" $OUT/r/prefill-exact-fa.log | tail -24
timeout 90 python benchmarks/prefill_attention.py --configs kivi2 --exact --out $OUT/r/prefill-exact-triton.json > $OUT/r/prefill-exact-triton.log 2>&1; grep -E " us " $OUT/r/prefill-exact-triton.log | tail -6
tar czf $OUT/cmd5.tgz -C $OUT r && rm -rf $OUT/r
