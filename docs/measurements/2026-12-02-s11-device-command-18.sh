#!/usr/bin/env bash
# session 11, device command 18 (with the last of 6 bundle parts of 40 MiB: 50 MiB parts and the tree passed 64 MiB;
# commands 13-17 copied the others, no script; command 12 found the bundle incomplete):
# the staged "tc" loop where the earlier checks did not reach: decode_kernels_check --wide (now with head 64 at group
# 16 and 4-bit values, whose copy layouts have more lanes than key-code words), and SmolLM2-135M KIVI-4 in the engine
# (head 64, 4-bit values: the one SmolLM2 configuration that stages; its KIVI-2 runs without stages), PyTorch path
# against Triton eager and Triton with CUDA graphs
bash .devbundle/setup-on-device.sh > /tmp/setup.log 2>&1 || { tail -20 /tmp/setup.log; exit 1; }
source /tmp/kivi-env.sh
mkdir -p $OUT/r
echo "== check-wide"; timeout 150 python scripts/decode_kernels_check.py --kernels tc --wide > $OUT/r/check-wide.log 2>&1; echo "rc=$?"
grep -E "D=64 G=16|worst" $OUT/r/check-wide.log; wc -l < $OUT/r/check-wide.log
echo "== gpu_check"; timeout 330 python scripts/gpu_check.py --model /tmp/smollm2-135m --only kivi4_torch kivi4_triton kivi4_triton_graphs --out $OUT/r/gpu-check.jsonl > $OUT/r/gpu-check.log 2>&1; echo "rc=$?"; grep -E "^(kivi|matching prefix)" $OUT/r/gpu-check.log | cut -c1-300
tar czf $OUT/cmd17.tgz -C $OUT r && rm -rf $OUT/r
