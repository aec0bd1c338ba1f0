#!/usr/bin/env bash
# session 14, device command 9 (kernel-only, no vLLM): (1) the open group's launch as a light kernel
# (decode._open_group_kernel: float32 multiply-adds per query head, no 16-row dot padding) checked on the GPU and
# profiled against the former dot form (--open-kernel dot) and at 1 and 4 warps; (2) the prompt-chunk store with one
# listed row per program (the new default) against 2/4/16 (the twelfth session's rows_per_program_for gave 16 to
# steps with prompt chunks too; TTFT of kivi-bench decode went from 7.30 s (session 11) to 13.27 s (command 8))
export PYTHONPATH=$PWD; mkdir -p $OUT/r
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
echo "== check tc wide (light)"; timeout 100 python scripts/decode_kernels_check.py --kernels tc --wide > $OUT/r/check-tc.log 2>&1; echo "rc=$?"; grep -c "rel err" $OUT/r/check-tc.log; tail -1 $OUT/r/check-tc.log
echo "== check fma mma (light)"; timeout 40 python scripts/decode_kernels_check.py --kernels fma mma > $OUT/r/check-fma.log 2>&1; echo "rc=$?"; grep -c "rel err" $OUT/r/check-fma.log; tail -1 $OUT/r/check-fma.log
D="python benchmarks/decode_attention.py"
run() { local name=$1 lim=$2; shift 2; echo "== $name"; timeout $lim $D "$@" --out $OUT/r/$name.json > $OUT/r/$name.log 2>&1; echo "rc=$?"; grep -E "^(gqa|llama2)|kernels:" $OUT/r/$name.log | cut -c1-110; }
for v in "light 4" "light 1" "dot 4"; do set -- $v; run prof-$1-w$2 45 --configs kivi2 --shapes gqa llama2-7b --batches 64 256 --contexts 4096 --profile --open-kernel $1 --open-warps $2; done
echo "== prefill store"; timeout 80 python benchmarks/prefill_attention.py --configs kivi2 --shapes gqa llama2-7b --store-rows-per-program 1 2 4 16 --out $OUT/r/prefill.json > $OUT/r/prefill.log 2>&1; echo "rc=$?"; grep -vE "^\s*$" $OUT/r/prefill.log | grep -E "store|kivi2" | cut -c1-120
tar czf $OUT/r.tgz -C $OUT r && rm -rf $OUT/r
