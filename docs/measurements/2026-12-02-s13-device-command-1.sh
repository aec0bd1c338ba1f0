#!/usr/bin/env bash
# session 13, device command 1 (kernel-only): the transposed "tc" decode (decode_tc.TRANSPOSED: S^T = K q^T,
# O^T = V^T P^T) against the float64 reference (wide shapes), then its time against the 16-row form at the GQA
# shape (both in this run, and at 12 programs per SM: its 157 registers fit 12), and at the Llama-2-7B shape
# (1 query head per KV head) against "fma"
export PYTHONPATH=$PWD; mkdir -p $OUT/r
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
timeout 150 python scripts/decode_kernels_check.py --kernels tc --wide > $OUT/r/check.log 2>&1; echo "check rc=$?"; grep -c "rel err" $OUT/r/check.log; sort -k9 -g $OUT/r/check.log | tail -3; tail -2 $OUT/r/check.log
B="--batches 64 256 --contexts 4096 16384"
for t in 0 1; do
  timeout 75 python benchmarks/decode_attention.py --configs kivi2 --shapes gqa $B --tc-transposed $t --out $OUT/r/gqa-t$t.json > $OUT/r/gqa-t$t.log 2>&1; echo "gqa t$t rc=$?"; grep -E "^gqa|copy" $OUT/r/gqa-t$t.log
done
timeout 75 python benchmarks/decode_attention.py --configs kivi2 --shapes gqa $B --work-target 1584 --out $OUT/r/gqa-t1-w12.json > $OUT/r/gqa-t1-w12.log 2>&1; echo "gqa w12 rc=$?"; grep -E "^gqa" $OUT/r/gqa-t1-w12.log
for k in fma tc; do
  timeout 75 python benchmarks/decode_attention.py --configs kivi2 --shapes llama2-7b $B --kernel $k --out $OUT/r/l7-$k.json > $OUT/r/l7-$k.log 2>&1; echo "l7 $k rc=$?"; grep -E "^llama2" $OUT/r/l7-$k.log
done
