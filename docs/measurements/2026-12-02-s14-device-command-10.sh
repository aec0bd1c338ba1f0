#!/usr/bin/env bash
# session 14, device command 10 (kernel-only, the last of the session's device time): the shipped default
# (open_kernel_for: "light" open group at 1 query head per KV head, "dot" above) checked over the wide shapes, and
# its step time at batch 256 / 4k on both shapes
export PYTHONPATH=$PWD; mkdir -p $OUT/r
echo "== check tc wide (default open group)"; timeout 100 python scripts/decode_kernels_check.py --kernels tc --wide > $OUT/r/check-tc.log 2>&1; echo "rc=$?"; grep -c "rel err" $OUT/r/check-tc.log; sort -k12 -g $OUT/r/check-tc.log | grep "rel err" | tail -1; grep -c "nan True" $OUT/r/check-tc.log
echo "== decode"; timeout 45 python benchmarks/decode_attention.py --configs kivi2 --shapes gqa llama2-7b --batches 256 --contexts 4096 --profile --out $OUT/r/decode.json > $OUT/r/decode.log 2>&1; echo "rc=$?"; grep -E "^(gqa|llama2)|kernels:" $OUT/r/decode.log | cut -c1-110
