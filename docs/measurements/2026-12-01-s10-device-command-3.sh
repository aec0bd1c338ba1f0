#!/usr/bin/env bash
# session 10, device command 3 (kernel-only): the new default decode_tc.STAGES = 2 (group size <= 32 only) checked
# against float64 on the wide shapes at q-scale 1 and 8, the kernel sweep of the tc path, and timed again at the
# GQA shape and with one long request (16k) among 1k ones, against STAGES = 0 in the same run
export PYTHONPATH=$PWD; mkdir -p $OUT/r
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
chk() { local name=$1 lim=$2; shift 2; echo "== $name"; timeout $lim python scripts/decode_kernels_check.py --kernels tc "$@" > $OUT/r/$name.log 2>&1; echo "rc=$?"; tail -2 $OUT/r/$name.log; }
chk check-wide 150 --wide
chk check-wide-q8 150 --wide --q-scale 8
echo "== sweep"; timeout 150 python scripts/kernel_sweep.py --decode-kernel tc --out $OUT/r/sweep.json > $OUT/r/sweep.log 2>&1; echo "rc=$?"; tail -3 $OUT/r/sweep.log
D="python benchmarks/decode_attention.py"
run() { local name=$1 lim=$2; shift 2; echo "== $name"; timeout $lim $D "$@" --out $OUT/r/$name.json > $OUT/r/$name.log 2>&1; grep -E "^(gqa|llama2)" $OUT/r/$name.log | cut -c1-75; }
run gqa-default 80 --configs kivi2 kivi4 --shapes gqa --kernel tc
run gqa-stages0 80 --configs kivi2 kivi4 --shapes gqa --kernel tc --tc-stages 0
run gqa-long-default 40 --configs kivi2 --shapes gqa --kernel tc --batches 16 64 256 --contexts 1024 --long-context 16384
run gqa-long-stages0 40 --configs kivi2 --shapes gqa --kernel tc --batches 16 64 256 --contexts 1024 --long-context 16384 --tc-stages 0
tar czf $OUT/cmd3.tgz -C $OUT r && rm -rf $OUT/r
