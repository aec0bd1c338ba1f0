#!/usr/bin/env bash
# session 7, device command 13 (kernel-only): "tc" at 2, 3 and 8 query heads per KV head (gqa2 / gqa3 / gqa8),
# KIVI-2, batches 16/64/256 at 4k context, against the split count; JSON per split count in cmd13.tgz
export PYTHONPATH=$PWD; mkdir -p $OUT/r
for s in 1 2 4 8; do echo "splits $s"; timeout 40 python benchmarks/decode_attention.py --configs kivi2 --shapes gqa2 gqa8 gqa3 --batches 16 64 256 --contexts 4096 --kernel tc --num-splits $s --out $OUT/r/s$s.json 2>&1 | grep -E "^gqa"; done
tar czf $OUT/cmd13.tgz -C $OUT r; rm -rf $OUT/r
