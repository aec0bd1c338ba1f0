#!/usr/bin/env bash
# session 16, device command 6 (with the last of the 6 bundle parts): the decode step's store as a programmatic
# dependent of the attention's open group (store(pdl=True), the open group's launch_dependents). Bytes and outputs
# of every kernel against the reference on the GPU (kernel_sweep: mixed steps and now a pure-decode step per shape,
# the PDL store's path), the decode checks, then the KIVI-2 grid with the step's time (decode + steady store, the
# store as launched and as a plain launch, same run)
bash .devbundle/setup-on-device.sh > /tmp/setup.log 2>&1 || { tail -20 /tmp/setup.log; exit 1; }
source /tmp/kivi-env.sh
mkdir -p $OUT/r
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem --format=csv,noheader
echo "== sweep"; timeout 170 python scripts/kernel_sweep.py --out $OUT/r/sweep.json > $OUT/r/sweep.log 2>&1; echo "rc=$?"; grep -c "^ok" $OUT/r/sweep.log; grep -v "^ok" $OUT/r/sweep.log | tail -4 | cut -c1-300
echo "== check tc"; timeout 60 python scripts/decode_kernels_check.py --kernels tc > $OUT/r/check-tc.log 2>&1; echo "rc=$?"; grep -c "rel err" $OUT/r/check-tc.log; tail -1 $OUT/r/check-tc.log
echo "== check fma mma"; timeout 45 python scripts/decode_kernels_check.py --kernels fma mma > $OUT/r/check-fma.log 2>&1; echo "rc=$?"; grep -c "rel err" $OUT/r/check-fma.log; tail -1 $OUT/r/check-fma.log
D="python benchmarks/decode_attention.py"
run() { local name=$1 lim=$2; shift 2; echo "== $name"; timeout $lim $D "$@" --out $OUT/r/$name.json > $OUT/r/$name.log 2>&1; echo "rc=$?"; grep -E "^(gqa|llama2|copy)" $OUT/r/$name.log | cut -c1-200; }
run grid 200 --configs kivi2 --shapes gqa llama2-7b
cd $OUT && tar czf r.tar.gz r && rm -rf r
