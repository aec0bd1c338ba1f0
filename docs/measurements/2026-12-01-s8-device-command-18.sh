#!/usr/bin/env bash
# session 8, device command 18 (with the last of the 3 bundle parts): the decode store at batch 256 (find_request's
# direct path for decode rows), then kivi-bench `decode` (512 x (1024 + 1024)) on the Llama-3-8B shape with KIVI-2:
# the engine with the decode work list and the listed store rows (compare: sixth session, 11,988 output tok/s)
bash .devbundle/setup-on-device.sh > /tmp/setup.log 2>&1 || { tail -20 /tmp/setup.log; exit 1; }
source /tmp/kivi-env.sh
mkdir -p $OUT/r
timeout 30 python benchmarks/decode_attention.py --configs kivi2 --shapes gqa llama2-7b --batches 256 --contexts 4096 --out $OUT/r/store-decode.json > $OUT/r/store-decode.log 2>&1; grep -E "^(gqa|llama2)" $OUT/r/store-decode.log
CUDA_VISIBLE_DEVICES=0 MODEL=benchmarks/llama3-8b BENCH_DIR=/tmp/e1 TIME_LIMIT=100 scripts/bench_gpu.sh decode kivi2 > $OUT/r/bench.log 2>&1; grep -vE "^(INFO|WARNING|DEBUG|\(EngineCore)" $OUT/r/bench.log | tail -12
cp /tmp/e1/results.json /tmp/e1/results.md $OUT/r/ 2>/dev/null
tar czf $OUT/cmd18.tgz -C $OUT r && rm -rf $OUT/r
