#!/usr/bin/env bash
# session 8, device command 13 (kernel-only): work_capacity without forced spare rows (whole waves of the requests):
# the GQA grid (kivi2) and one long request among short ones
export PYTHONPATH=$PWD; mkdir -p $OUT/r
D="python benchmarks/decode_attention.py"
run() { local name=$1 lim=$2; shift 2; echo "== $name"; timeout $lim $D "$@" --out $OUT/r/$name.json > $OUT/r/$name.log 2>&1; grep -E "^(gqa|llama2)" $OUT/r/$name.log | cut -c1-75; }
run gqa-work 40 --configs kivi2 --shapes gqa --kernel tc
run gqa-long-work 25 --configs kivi2 --shapes gqa --kernel tc --batches 16 64 256 --contexts 1024 --long-context 16384
tar czf $OUT/cmd13.tgz -C $OUT r && rm -rf $OUT/r
