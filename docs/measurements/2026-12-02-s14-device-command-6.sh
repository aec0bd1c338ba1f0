#!/usr/bin/env bash
# session 14, device command 6 (with the last of the 6 bundle parts of 40 MiB; commands 1-5 copied the others, no
# script): the open group's launch now merges the tc/fma slots and writes the output (commit 5f004f3, no reduction
# launch). Accuracy on the GPU (tc wide, fma), the whole decode grid against vLLM's FA3 bf16 and fp8 in one run, and
# a per-kernel profile with the open group's launch at 4, 2 and 8 warps
bash .devbundle/setup-on-device.sh > /tmp/setup.log 2>&1 || { tail -20 /tmp/setup.log; exit 1; }
source /tmp/kivi-env.sh
mkdir -p $OUT/r
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem --format=csv,noheader
echo "== check tc wide"; timeout 120 python scripts/decode_kernels_check.py --kernels tc --wide > $OUT/r/check-tc.log 2>&1; echo "rc=$?"; grep -c "rel err" $OUT/r/check-tc.log; tail -1 $OUT/r/check-tc.log
echo "== check fma mma"; timeout 45 python scripts/decode_kernels_check.py --kernels fma mma > $OUT/r/check-fma.log 2>&1; echo "rc=$?"; grep -c "rel err" $OUT/r/check-fma.log; tail -1 $OUT/r/check-fma.log
D="python benchmarks/decode_attention.py"
run() { local name=$1 lim=$2; shift 2; echo "== $name"; timeout $lim $D "$@" --out $OUT/r/$name.json > $OUT/r/$name.log 2>&1; echo "rc=$?"; grep -E "^(gqa|llama2|copy)|kernels:" $OUT/r/$name.log | cut -c1-130; }
run all-shapes 170 --configs kivi2 kivi4 fa3-bf16 fa3-fp8 --shapes gqa llama2-7b
for w in 4 2 8; do run profile-w$w 45 --configs kivi2 --shapes gqa llama2-7b --batches 64 256 --contexts 4096 --profile --open-warps $w; done
