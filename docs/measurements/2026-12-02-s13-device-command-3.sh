#!/usr/bin/env bash
# session 13, device command 3 (kernel-only): the tc loop's 3-instruction dequantization (codes where they lie,
# a per-position exponent; key scale/min pairs built once per group): accuracy (wide shapes, then sharp attention),
# the decode grid, KIVI-2 and KIVI-4, both shapes; the kernel sweep until its limit
export PYTHONPATH=$PWD; mkdir -p $OUT/r
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
timeout 120 python scripts/decode_kernels_check.py --kernels tc --wide > $OUT/r/check.log 2>&1; echo "check rc=$?"; grep -c "rel err" $OUT/r/check.log; sort -k9 -g $OUT/r/check.log | grep "rel err" | tail -2; tail -1 $OUT/r/check.log
timeout 100 python benchmarks/decode_attention.py --configs kivi2 kivi4 --shapes gqa llama2-7b --out $OUT/r/decode.json > $OUT/r/decode.log 2>&1; echo "decode rc=$?"; grep -E "^(gqa|llama2)|copy b" $OUT/r/decode.log
timeout 45 python scripts/decode_kernels_check.py --kernels tc --wide --q-scale 8 > $OUT/r/check-q8.log 2>&1; echo "check q8 rc=$?"; grep -c "rel err" $OUT/r/check-q8.log; sort -k9 -g $OUT/r/check-q8.log | grep "rel err" | tail -1
timeout 60 python scripts/kernel_sweep.py --out $OUT/r/sweep.json > $OUT/r/sweep.log 2>&1; echo "sweep rc=$?"; grep -c "^ok" $OUT/r/sweep.log; grep -v "^ok" $OUT/r/sweep.log | tail -3
