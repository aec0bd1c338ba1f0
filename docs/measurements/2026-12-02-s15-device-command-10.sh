#!/usr/bin/env bash
# session 15, device command 10 (a fresh machine; commands 10a-e before it copied the bundle's parts 00-04 again):
# (1) the store's listed-rows launches compiled in vLLM's warm-up (store.warm_listed_rows; counts not specialized):
# kivi-bench `decode` on the Llama-3-8B shape, KIVI-2 (fp8 from command 7 on the previous machine); the vLLM log
# should have no "JIT compilation during inference"; (2) the open group's "light" form at 2 warps
# (decode.OPEN_WARPS_FOR): tc wide accuracy (the 8 shapes at 1 query head per KV head come first), then the Llama-2-7B KIVI-2 grid, shipped default and all at 4 warps
bash .devbundle/setup-on-device.sh > /tmp/setup.log 2>&1 || { tail -20 /tmp/setup.log; exit 1; }
source /tmp/kivi-env.sh; mkdir -p $OUT/r
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem --format=csv,noheader
CUDA_VISIBLE_DEVICES=0 MODEL=benchmarks/llama3-8b BENCH_DIR=/tmp/e1 TIME_LIMIT=100 timeout 230 scripts/bench_gpu.sh decode kivi2 > $OUT/r/bench-kivi2.log 2>&1; echo "rc=$?"
grep -vE "^(INFO|WARNING|DEBUG|\(EngineCore)" $OUT/r/bench-kivi2.log | tail -3 | cut -c1-300
tar xzf $OUT/logs.tar.gz -C /tmp 2>/dev/null; echo "JIT warnings: $(grep -c 'JIT compilation during inference' /tmp/logs/*.log)"; grep -h 'JIT compilation during inference' /tmp/logs/*.log | cut -c1-200
echo "== check tc wide"; timeout 45 python scripts/decode_kernels_check.py --kernels tc --wide > $OUT/r/check-tc-wide.log 2>&1; echo "rc=$?"; grep -c "rel err" $OUT/r/check-tc-wide.log; grep -c "nan True" $OUT/r/check-tc-wide.log; grep -E "^1 " $OUT/r/check-tc-wide.log | cut -c1-100
D="python benchmarks/decode_attention.py"
run() { local name=$1 lim=$2; shift 2; echo "== $name"; timeout $lim $D "$@" --out $OUT/r/$name.json > $OUT/r/$name.log 2>&1; echo "rc=$?"; grep -E "^(gqa|llama2|copy)" $OUT/r/$name.log | cut -c1-120; }
run default 60 --configs kivi2 --shapes llama2-7b
run warps4 60 --configs kivi2 --shapes llama2-7b --open-warps 4
cd $OUT && tar czf r.tar.gz r && rm -rf r
