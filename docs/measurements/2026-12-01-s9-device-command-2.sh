#!/usr/bin/env bash
# session 9, device command 2 (kernel-only): the tc loop with the next group's record prefetched into registers
# (decode_tc.PREFETCH) against without, same run: decode time at the GQA shape (KIVI-2, KIVI-4), the one-long-request
# batch, and accuracy against float64 (wide shapes) with the prefetch
export PYTHONPATH=$PWD; mkdir -p $OUT/r
D="python benchmarks/decode_attention.py"
run() { local name=$1 lim=$2; shift 2; echo "== $name"; timeout $lim $D "$@" --out $OUT/r/$name.json > $OUT/r/$name.log 2>&1; grep -E "^(gqa|llama2)" $OUT/r/$name.log | cut -c1-75; }
run gqa-prefetch 70 --configs kivi2 kivi4 --shapes gqa --kernel tc --tc-prefetch 1
run gqa-noprefetch 70 --configs kivi2 kivi4 --shapes gqa --kernel tc --tc-prefetch 0
run gqa-long-prefetch 30 --configs kivi2 --shapes gqa --kernel tc --batches 16 64 256 --contexts 1024 --long-context 16384 --tc-prefetch 1
chk() { local name=$1 lim=$2; shift 2; echo "== $name"; timeout $lim python scripts/decode_kernels_check.py --kernels tc "$@" > $OUT/r/$name.log 2>&1; echo "rc=$?"; tail -2 $OUT/r/$name.log; }
chk check-wide-prefetch 130 --wide --tc-prefetch 1
chk check-wide-q8-prefetch 110 --wide --q-scale 8 --tc-prefetch 1
tar czf $OUT/cmd2.tgz -C $OUT r && rm -rf $OUT/r
