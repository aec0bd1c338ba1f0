#!/usr/bin/env bash
# session 16, device command 7 (same machine): the engine with the dependent store in FULL CUDA graphs: SmolLM2-135M
# greedy tokens, PyTorch path against the Triton path (eager and graphs), KIVI-2 and KIVI-4; then the tc decode
# accuracy over the --wide shapes; the kernel sweep's shapes 15-21 (command 6 ran 0-14 before its limit)
source /tmp/kivi-env.sh; mkdir -p $OUT/r
echo "== gpu_check smollm2"; timeout 330 python scripts/gpu_check.py --model /tmp/smollm2-135m --only kivi2_torch kivi2_triton kivi2_triton_graphs kivi4_torch kivi4_triton kivi4_triton_graphs --out $OUT/r/gpu-check.jsonl > $OUT/r/gpu-check.log 2>&1; echo "rc=$?"; grep -E "^(kivi|matching prefix)" $OUT/r/gpu-check.log | cut -c1-300
echo "== check tc wide"; timeout 150 python scripts/decode_kernels_check.py --kernels tc --wide > $OUT/r/check-tc-wide.log 2>&1; echo "rc=$?"; grep -c "rel err" $OUT/r/check-tc-wide.log; grep -c "nan True" $OUT/r/check-tc-wide.log; tail -2 $OUT/r/check-tc-wide.log | cut -c1-200
echo "== sweep 15-"; timeout 80 python scripts/kernel_sweep.py --first-shape 15 --seed 1 --out $OUT/r/sweep2.json > $OUT/r/sweep2.log 2>&1; echo "rc=$?"; grep -c "^ok" $OUT/r/sweep2.log; grep -v "^ok" $OUT/r/sweep2.log | tail -4 | cut -c1-300
cd $OUT && tar czf r.tar.gz r && rm -rf r
