#!/usr/bin/env bash
# session 8, device command 5 (kernel-only): why the work list is slower than a fixed split count with the same
# partition: per-kernel GPU times (--profile) for the split grid and the work list, slots 3/33 (batch 64) and 2/9 (256)
export PYTHONPATH=$PWD; mkdir -p $OUT/r
D="python benchmarks/decode_attention.py --configs kivi2 --shapes gqa --kernel tc --contexts 4096 --profile"
run() { local name=$1; shift; echo "== $name"; timeout 40 $D "$@" --out $OUT/r/$name.json > $OUT/r/$name.log 2>&1; grep -E "^gqa|kernels:" $OUT/r/$name.log | cut -c1-400; }
run b64-split2 --batches 64 --num-splits 2 --work-target 0
run b64-work-s2 --batches 64 --num-splits 2 --work-target 1024
run b64-work --batches 64 --work-target 1024
run b64-split32 --batches 64 --work-target 0
run b256-split1 --batches 256 --num-splits 1 --work-target 0
run b256-work-s1 --batches 256 --num-splits 1 --work-target 1024
run b256-work --batches 256 --work-target 1024
tar czf $OUT/cmd5.tgz -C $OUT r && rm -rf $OUT/r
