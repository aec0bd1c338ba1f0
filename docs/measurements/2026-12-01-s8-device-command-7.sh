#!/usr/bin/env bash
# session 8, device command 7 (kernel-only): the work list in whole waves (decode.work_capacity; "tc" by default):
# accuracy, then the grid at GQA (kivi2/kivi4), one long request among short ones, 2/3/8 query heads per KV
# head, and "fma" at the MHA shape with a work list of 16 / 20 programs per SM
export PYTHONPATH=$PWD; mkdir -p $OUT/r
echo "== check tc wide (work list)"; timeout 100 python scripts/decode_kernels_check.py --kernels tc --wide > $OUT/r/check-tc-wide.log 2>&1; tail -2 $OUT/r/check-tc-wide.log
echo "== check tc fma mma, work 8 / fma 2112"; timeout 30 python scripts/decode_kernels_check.py --kernels tc fma --work-target 8 > $OUT/r/check-work8.log 2>&1; tail -1 $OUT/r/check-work8.log
timeout 30 python scripts/decode_kernels_check.py --kernels fma --work-target 2112 > $OUT/r/check-fma-work.log 2>&1; tail -1 $OUT/r/check-fma-work.log
D="python benchmarks/decode_attention.py"
run() { local name=$1 lim=$2; shift 2; echo "== $name"; timeout $lim $D "$@" --out $OUT/r/$name.json > $OUT/r/$name.log 2>&1; grep -E "^(gqa|llama2)" $OUT/r/$name.log | cut -c1-75; }
run gqa-work 70 --configs kivi2 kivi4 --shapes gqa --kernel tc
run gqa-long-work 20 --configs kivi2 --shapes gqa --kernel tc --batches 16 64 256 --contexts 1024 --long-context 16384
run gqa283-work 40 --configs kivi2 --shapes gqa2 gqa8 gqa3 --kernel tc --contexts 4096 16384
run mha-work2112 35 --configs kivi2 --shapes llama2-7b --kernel fma --work-target 2112
run mha-work2640 35 --configs kivi2 --shapes llama2-7b --kernel fma --work-target 2640
tar czf $OUT/cmd7.tgz -C $OUT r && rm -rf $OUT/r
