#!/usr/bin/env bash
# session 14, device command 7 (same machine as command 6): the engine with the kernels of commit 5f004f3 (transposed
# "tc" loop, 3-instruction dequantization, the open group's launch merging the slots). SmolLM2-135M greedy tokens,
# PyTorch path against the Triton path (KIVI-2, KIVI-4), eager and with CUDA graphs; then the Llama-2-7B shape (dummy
# weights, default compilation with FULL graphs) serving 1024 requests of 1024 + 256 tokens
source /tmp/kivi-env.sh
mkdir -p $OUT/r
echo "== gpu_check smollm2"; timeout 330 python scripts/gpu_check.py --model /tmp/smollm2-135m --only kivi2_torch kivi2_triton kivi2_triton_graphs kivi4_torch kivi4_triton_graphs --out $OUT/r/gpu-check.jsonl > $OUT/r/gpu-check.log 2>&1; echo "rc=$?"; grep -E "^(kivi|matching prefix)" $OUT/r/gpu-check.log | cut -c1-300
echo "== llama7b load"; timeout 240 python scripts/gpu_check.py --only llama7b_kivi2_load --out $OUT/r/llama7b.jsonl > $OUT/r/llama7b.log 2>&1; echo "rc=$?"; tail -c 1500 $OUT/r/llama7b.jsonl
