#!/usr/bin/env bash
# session 10, device command 1 (kernel-only): the tc loop with key codes, key scale/min and value codes staged
# through shared memory by cp.async (decode_tc.STAGES = 3, 5) against the register prefetch (STAGES = 0, the
# default), same run: decode time at the GQA shape (KIVI-2, KIVI-4); STAGES = 3 with a 9-programs-per-SM work list
# (202 registers: 9 fit); accuracy against float64 on the wide shapes with STAGES = 3
export PYTHONPATH=$PWD; mkdir -p $OUT/r
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
D="python benchmarks/decode_attention.py"
run() { local name=$1 lim=$2; shift 2; echo "== $name"; timeout $lim $D "$@" --out $OUT/r/$name.json > $OUT/r/$name.log 2>&1; grep -E "^(gqa|llama2)" $OUT/r/$name.log | cut -c1-75; }
run gqa-stages0 80 --configs kivi2 kivi4 --shapes gqa --kernel tc --tc-stages 0
run gqa-stages3 80 --configs kivi2 kivi4 --shapes gqa --kernel tc --tc-stages 3
run gqa-stages5 80 --configs kivi2 kivi4 --shapes gqa --kernel tc --tc-stages 5
run gqa-stages3-wave9 80 --configs kivi2 --shapes gqa --kernel tc --tc-stages 3 --work-target 1188
chk() { local name=$1 lim=$2; shift 2; echo "== $name"; timeout $lim python scripts/decode_kernels_check.py --kernels tc "$@" > $OUT/r/$name.log 2>&1; echo "rc=$?"; tail -2 $OUT/r/$name.log; }
chk check-wide-stages3 150 --wide --tc-stages 3
tar czf $OUT/cmd1.tgz -C $OUT r && rm -rf $OUT/r
