#!/usr/bin/env bash
# NOT RUN: no device machine could be started for it (about 120 s of device time lost); command 10 ran its light-form
# check and grid on a fresh machine, together with the engine re-run.
# session 15, device command 9 (a fresh machine, no vLLM: kernel-only): the open group's launch at 2 warps in its
# "light" form (decode.OPEN_WARPS_FOR, after command 6's --open-warps 2). Accuracy (tc wide, every shape at 1 query
# head per KV head runs "light"), then the KIVI-2 grid with the shipped defaults and, in the same run, all at 4 warps
export PYTHONPATH=$PWD; mkdir -p $OUT/r
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem --format=csv,noheader
echo "== check tc wide"; timeout 150 python scripts/decode_kernels_check.py --kernels tc --wide > $OUT/r/check-tc-wide.log 2>&1; echo "rc=$?"; grep -c "rel err" $OUT/r/check-tc-wide.log; grep -c "nan True" $OUT/r/check-tc-wide.log; tail -1 $OUT/r/check-tc-wide.log
D="python benchmarks/decode_attention.py"
run() { local name=$1 lim=$2; shift 2; echo "== $name"; timeout $lim $D "$@" --out $OUT/r/$name.json > $OUT/r/$name.log 2>&1; echo "rc=$?"; grep -E "^(gqa|llama2|copy)" $OUT/r/$name.log | cut -c1-120; }
run default 90 --configs kivi2 --shapes llama2-7b gqa
run warps4 90 --configs kivi2 --shapes llama2-7b --open-warps 4
cd $OUT && tar czf r.tar.gz r && rm -rf r
