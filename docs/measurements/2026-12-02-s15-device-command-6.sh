#!/usr/bin/env bash
# session 15, device command 6 (with the last of the 6 bundle parts): the open group's launch as a programmatic
# dependent of the "tc"/"fma" kernel (decode.PDL). Accuracy on the GPU with it (tc, fma, mma), then the decode grid
# with PDL on (KIVI-2, KIVI-4, fp8 FA3 in one run) and off (KIVI-2), and the open group's warps with PDL on
bash .devbundle/setup-on-device.sh > /tmp/setup.log 2>&1 || { tail -20 /tmp/setup.log; exit 1; }
source /tmp/kivi-env.sh
mkdir -p $OUT/r
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem --format=csv,noheader
echo "== check tc"; timeout 60 python scripts/decode_kernels_check.py --kernels tc > $OUT/r/check-tc.log 2>&1; echo "rc=$?"; grep -c "rel err" $OUT/r/check-tc.log; tail -1 $OUT/r/check-tc.log
echo "== check fma mma"; timeout 45 python scripts/decode_kernels_check.py --kernels fma mma > $OUT/r/check-fma.log 2>&1; echo "rc=$?"; grep -c "rel err" $OUT/r/check-fma.log; tail -1 $OUT/r/check-fma.log
D="python benchmarks/decode_attention.py"
run() { local name=$1 lim=$2; shift 2; echo "== $name"; timeout $lim $D "$@" --out $OUT/r/$name.json > $OUT/r/$name.log 2>&1; echo "rc=$?"; grep -E "^(gqa|llama2|copy)" $OUT/r/$name.log | cut -c1-120; }
run grid-pdl1 150 --configs kivi2 kivi4 fa3-fp8 --shapes gqa llama2-7b --pdl 1
run grid-pdl0 90 --configs kivi2 --shapes gqa llama2-7b --pdl 0
for w in 2 8; do run warps-$w 40 --configs kivi2 --shapes gqa llama2-7b --batches 16 256 --contexts 4096 --pdl 1 --open-warps $w; done
echo "== check tc wide"; timeout 100 python scripts/decode_kernels_check.py --kernels tc --wide > $OUT/r/check-tc-wide.log 2>&1; echo "rc=$?"; grep -c "rel err" $OUT/r/check-tc-wide.log; tail -1 $OUT/r/check-tc-wide.log
cd $OUT && tar czf r.tar.gz r && rm -rf r
