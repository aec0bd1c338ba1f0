#!/usr/bin/env bash
# session 8, device command 4 (kernel-only): the decode work list (decode.decode_work; "tc" runs it by default now):
# accuracy against the float64 reference, then time at the grid and against the split grid (--work-target 0)
export PYTHONPATH=$PWD; mkdir -p $OUT/r
echo "== check tc, wide, work list 1024 (default)"; timeout 110 python scripts/decode_kernels_check.py --kernels tc --wide > $OUT/r/check-tc-wide.log 2>&1; tail -3 $OUT/r/check-tc-wide.log
echo "== check tc fma, work list 8"; timeout 40 python scripts/decode_kernels_check.py --kernels tc fma --work-target 8 > $OUT/r/check-work8.log 2>&1; tail -9 $OUT/r/check-work8.log
echo "== pytest decode_work"; timeout 40 python -m pytest -q tests/test_kernels.py -k "decode_work or decode_variants" 2>&1 | tail -1
D="python benchmarks/decode_attention.py"
run() { local name=$1 lim=$2; shift 2; echo "== $name"; timeout $lim $D "$@" --out $OUT/r/$name.json > $OUT/r/$name.log 2>&1; grep -E "^(gqa|llama2)" $OUT/r/$name.log | cut -c1-75; }
run gqa-work 70 --configs kivi2 kivi4 --shapes gqa --kernel tc
run gqa-long-work 20 --configs kivi2 --shapes gqa --kernel tc --batches 16 64 --contexts 1024 --long-context 16384
run gqa283-work 40 --configs kivi2 --shapes gqa2 gqa8 gqa3 --kernel tc --contexts 4096 16384
run gqa283-split 40 --configs kivi2 --shapes gqa2 gqa8 gqa3 --kernel tc --contexts 4096 16384 --work-target 0
run mha-split 35 --configs kivi2 --shapes llama2-7b --kernel fma --work-target 0
run mha-work1024 35 --configs kivi2 --shapes llama2-7b --kernel fma --work-target 1024
run mha-work4096 35 --configs kivi2 --shapes llama2-7b --kernel fma --work-target 4096
tar czf $OUT/cmd4.tgz -C $OUT r && rm -rf $OUT/r
