#!/usr/bin/env bash
# session 13, device command 2 (kernel-only): the new defaults ("tc" transposed at every GQA ratio, also 1 query
# head per KV head) over the whole decode grid, KIVI-2 and KIVI-4, both shapes; "fma" at the Llama-2-7B shape in the
# cells command 1 did not time; the sharp-attention check (q x 8) of the transposed loop; the kernel sweep of mixed
# batches (store bytes, prefill and decode against float64) until its time limit
export PYTHONPATH=$PWD; mkdir -p $OUT/r
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
timeout 230 python benchmarks/decode_attention.py --configs kivi2 kivi4 --shapes gqa llama2-7b --out $OUT/r/decode.json > $OUT/r/decode.log 2>&1; echo "decode rc=$?"; grep -E "^(gqa|llama2)|copy b" $OUT/r/decode.log
timeout 50 python benchmarks/decode_attention.py --configs kivi2 --shapes llama2-7b --kernel fma --batches 16 --out $OUT/r/l7-fma16.json > $OUT/r/l7-fma16.log 2>&1; echo "fma16 rc=$?"; grep -E "^llama2" $OUT/r/l7-fma16.log
timeout 40 python benchmarks/decode_attention.py --configs kivi2 --shapes llama2-7b --kernel fma --batches 64 256 --contexts 1024 --out $OUT/r/l7-fma1k.json > $OUT/r/l7-fma1k.log 2>&1; echo "fma1k rc=$?"; grep -E "^llama2" $OUT/r/l7-fma1k.log
timeout 60 python scripts/decode_kernels_check.py --kernels tc --wide --q-scale 8 > $OUT/r/check-q8.log 2>&1; echo "check q8 rc=$?"; grep -c "rel err" $OUT/r/check-q8.log; tail -1 $OUT/r/check-q8.log
timeout 100 python scripts/kernel_sweep.py --out $OUT/r/sweep.json > $OUT/r/sweep.log 2>&1; echo "sweep rc=$?"; grep -c "^ok" $OUT/r/sweep.log; grep -v "^ok" $OUT/r/sweep.log | tail -4
