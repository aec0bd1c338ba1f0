#!/usr/bin/env bash
# session 15, device command 8 (same machine): SmolLM2-135M greedy tokens, PyTorch path against the Triton path
# (PDL open group), KIVI-4 and KIVI-2, eager and CUDA graphs
source /tmp/kivi-env.sh; mkdir -p $OUT/r
echo "== gpu_check smollm2"; timeout 420 python scripts/gpu_check.py --model /tmp/smollm2-135m --only kivi4_torch kivi4_triton kivi4_triton_graphs kivi2_torch kivi2_triton kivi2_triton_graphs --out $OUT/r/gpu-check.jsonl > $OUT/r/gpu-check.log 2>&1; echo "rc=$?"; grep -E "^(kivi|matching prefix)" $OUT/r/gpu-check.log | cut -c1-300
cd $OUT && tar czf r.tar.gz r && rm -rf r
