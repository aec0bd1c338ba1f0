#!/usr/bin/env bash
# session 9, device command 1 (kernel-only): the tc key fold (decode_tc.KEY_FOLD) against the fp16-dequantized keys:
# Applied as docs/measurements/2026-12-01-s9-h200-command-1/key-fold.diff on 2c9a77c (not committed: measured no faster
# for KIVI-2, 5% slower for KIVI-4, and less accurate; docs/benchmarks.md "Ninth session")
# accuracy against float64 (wide shapes, q-scale 1 and 8) and decode time at the GQA shape, same run
export PYTHONPATH=$PWD; mkdir -p $OUT/r
D="python benchmarks/decode_attention.py"
run() { local name=$1 lim=$2; shift 2; echo "== $name"; timeout $lim $D "$@" --out $OUT/r/$name.json > $OUT/r/$name.log 2>&1; grep -E "^(gqa|llama2)" $OUT/r/$name.log | cut -c1-75; }
run gqa-fold 60 --configs kivi2 kivi4 --shapes gqa --kernel tc --tc-key-fold 1
run gqa-nofold 60 --configs kivi2 kivi4 --shapes gqa --kernel tc --tc-key-fold 0
chk() { local name=$1 lim=$2; shift 2; echo "== $name"; timeout $lim python scripts/decode_kernels_check.py --kernels tc "$@" > $OUT/r/$name.log 2>&1; echo "rc=$?"; tail -4 $OUT/r/$name.log; }
chk check-wide-fold 130 --wide --tc-key-fold 1
chk check-wide-q8-fold 110 --wide --q-scale 8 --tc-key-fold 1
chk check-wide-q8-nofold 110 --wide --q-scale 8 --tc-key-fold 0
tar czf $OUT/cmd1.tgz -C $OUT r && rm -rf $OUT/r
