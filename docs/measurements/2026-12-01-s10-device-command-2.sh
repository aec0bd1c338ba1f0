#!/usr/bin/env bash
# session 10, device command 2 (kernel-only): decode_tc.STAGES = 3 with a register cap (maxnreg 184: 11 programs per
# SM without spill at 2 bits; 168: 12 per SM, 108 bytes spilled) with work lists of 8 (default), 11 and 12 programs
# per SM; STAGES = 2 and 4; STAGES = 0 again as the same run's reference
export PYTHONPATH=$PWD; mkdir -p $OUT/r
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
D="python benchmarks/decode_attention.py"
run() { local name=$1 lim=$2; shift 2; echo "== $name"; timeout $lim $D "$@" --out $OUT/r/$name.json > $OUT/r/$name.log 2>&1; grep -E "^(gqa|llama2)" $OUT/r/$name.log | cut -c1-75; }
run gqa-stages0 80 --configs kivi2 kivi4 --shapes gqa --kernel tc --tc-stages 0
run gqa-stages3-r184 80 --configs kivi2 kivi4 --shapes gqa --kernel tc --tc-stages 3 --maxnreg 184
run gqa-stages3-r184-wave11 80 --configs kivi2 --shapes gqa --kernel tc --tc-stages 3 --maxnreg 184 --work-target 1452
run gqa-stages3-r168-wave12 80 --configs kivi2 --shapes gqa --kernel tc --tc-stages 3 --maxnreg 168 --work-target 1584
run gqa-stages2 80 --configs kivi2 kivi4 --shapes gqa --kernel tc --tc-stages 2
run gqa-stages4 80 --configs kivi2 --shapes gqa --kernel tc --tc-stages 4
run gqa-stages3 80 --configs kivi2 kivi4 --shapes gqa --kernel tc --tc-stages 3
tar czf $OUT/cmd2.tgz -C $OUT r && rm -rf $OUT/r
