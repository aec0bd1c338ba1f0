#!/usr/bin/env bash
# session 7, device command 12 (run right after command 11 on the warm machine; its stdout is
# 2026-11-30-s7-h200-tc-splits/command-12-stdout.txt, the JSON stayed on the device): "tc" at GQA, KIVI-2, batches 64/256,
# contexts 4k/16k, against the split count, then gqa2/gqa8 at 4 splits
export PYTHONPATH=$PWD
for s in 1 2 4 8; do echo "splits $s"; timeout 50 python benchmarks/decode_attention.py --configs kivi2 --shapes gqa --batches 64 256 --contexts 4096 16384 --kernel tc --num-splits $s --out /tmp/s$s.json 2>&1 | grep -E "^gqa"; done
echo "gqa2/gqa8 splits 4"; timeout 50 python benchmarks/decode_attention.py --configs kivi2 --shapes gqa2 gqa8 --batches 64 --contexts 4096 --kernel tc --num-splits 4 --out /tmp/x.json 2>&1 | grep -E "^gqa"
