#!/usr/bin/env bash
# session 11, device command 10 (with the last of the 5 bundle parts; commands 1-4 and 6-9 copied the others, no
# script; command 5 found the bundle incomplete: the machine had been released after command 1): the
# default decode (tc with decode_tc.STAGES = 2 at 8 KV heads, fma at 32) against vLLM's FA3 bf16 and fp8 in one run,
# both shapes; then the engine: SmolLM2-135M greedy tokens, PyTorch path against the Triton path (KIVI-2, KIVI-4),
# eager and with CUDA graphs
bash .devbundle/setup-on-device.sh > /tmp/setup.log 2>&1 || { tail -20 /tmp/setup.log; exit 1; }
source /tmp/kivi-env.sh
mkdir -p $OUT/r
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem --format=csv,noheader
D="python benchmarks/decode_attention.py"
run() { local name=$1 lim=$2; shift 2; echo "== $name"; timeout $lim $D "$@" --out $OUT/r/$name.json > $OUT/r/$name.log 2>&1; echo "rc=$?"; grep -E "^(gqa|llama2|copy)" $OUT/r/$name.log | cut -c1-100; }
run all-shapes 150 --configs kivi2 kivi4 fa3-bf16 fa3-fp8 --shapes gqa llama2-7b
echo "== gpu_check"; timeout 330 python scripts/gpu_check.py --model /tmp/smollm2-135m --only kivi2_torch kivi2_triton kivi2_triton_graphs kivi4_torch kivi4_triton_graphs --out $OUT/r/gpu-check.jsonl > $OUT/r/gpu-check.log 2>&1; echo "rc=$?"; grep -E "^(kivi|matching prefix)" $OUT/r/gpu-check.log | cut -c1-300
tar czf $OUT/cmd5.tgz -C $OUT r && rm -rf $OUT/r
