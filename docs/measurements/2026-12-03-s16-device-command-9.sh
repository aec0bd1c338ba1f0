#!/usr/bin/env bash
# session 16, device command 9 (same machine): what command 7 left before its limits: SmolLM2-135M KIVI-4 greedy
# tokens, PyTorch path against the Triton path (eager and FULL CUDA graphs, the dependent store), and the kernel
# sweep's last two shapes (20-21)
source /tmp/kivi-env.sh; mkdir -p $OUT/r
echo "== gpu_check smollm2 kivi4"; timeout 240 python scripts/gpu_check.py --model /tmp/smollm2-135m --only kivi4_torch kivi4_triton kivi4_triton_graphs --out $OUT/r/gpu-check4.jsonl > $OUT/r/gpu-check4.log 2>&1; echo "rc=$?"; grep -E "^(kivi|matching prefix)" $OUT/r/gpu-check4.log | cut -c1-300
echo "== sweep 20-"; timeout 60 python scripts/kernel_sweep.py --first-shape 20 --seed 2 --out $OUT/r/sweep3.json > $OUT/r/sweep3.log 2>&1; echo "rc=$?"; grep -c "^ok" $OUT/r/sweep3.log; grep -v "^ok" $OUT/r/sweep3.log | tail -4 | cut -c1-300
cd $OUT && tar czf r.tar.gz r && rm -rf r
