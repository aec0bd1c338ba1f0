#!/usr/bin/env bash
# session 8, device command 12 (with the last of the 5 bundle parts): the work list with water-filling and spare rows
# (an intermediate decode.work_capacity that kept half a wave of spare rows; not committed): the GQA grid and one long request among short ones; then the
# engine: SmolLM2-135M greedy tokens, PyTorch path against the Triton path, eager and with CUDA graphs (work list in use)
bash .devbundle/setup-on-device.sh > /tmp/setup.log 2>&1 || { tail -20 /tmp/setup.log; exit 1; }
source /tmp/kivi-env.sh
mkdir -p $OUT/r
D="python benchmarks/decode_attention.py"
run() { local name=$1 lim=$2; shift 2; echo "== $name"; timeout $lim $D "$@" --out $OUT/r/$name.json > $OUT/r/$name.log 2>&1; grep -E "^(gqa|llama2)" $OUT/r/$name.log | cut -c1-95; }
run gqa-work 60 --configs kivi2 kivi4 fa3-fp8 --shapes gqa --kernel tc
run gqa-long-work 25 --configs kivi2 --shapes gqa --kernel tc --batches 16 64 256 --contexts 1024 --long-context 16384
run gqa-long-split 25 --configs kivi2 --shapes gqa --kernel tc --batches 16 64 256 --contexts 1024 --long-context 16384 --work-target 0
echo "== gpu_check"; timeout 270 python scripts/gpu_check.py --model /tmp/smollm2-135m --only kivi2_torch kivi2_triton kivi2_triton_graphs --out $OUT/r/gpu-check.jsonl > $OUT/r/gpu-check.log 2>&1; grep -E "^(kivi2_|matching prefix)" $OUT/r/gpu-check.log | cut -c1-300
tar czf $OUT/cmd12.tgz -C $OUT r && rm -rf $OUT/r
