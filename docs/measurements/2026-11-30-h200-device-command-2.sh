#!/usr/bin/env bash
# session 6, device command 2 (with the last bundle part): SmolLM2 engine, Triton ("tc" at 3 query heads per KV head)
# vs PyTorch path greedy tokens; tc/fma accuracy with sharper attention (rescaling exercised)
bash .devbundle/setup-on-device.sh > /tmp/setup.log 2>&1 || { tail -20 /tmp/setup.log; exit 1; }
source /tmp/kivi-env.sh
mkdir -p $OUT/r
timeout 120 python scripts/decode_kernels_check.py --kernels tc fma --wide --q-scale 8 > $OUT/r/check-q8.log 2>&1; tail -1 $OUT/r/check-q8.log
timeout 120 python scripts/decode_kernels_check.py --kernels tc --wide --q-scale 8 --rescale-slack 0 > $OUT/r/check-q8-slack0.log 2>&1; tail -1 $OUT/r/check-q8-slack0.log
timeout 360 python scripts/gpu_check.py --only kivi2_torch kivi2_triton kivi2_triton_graphs kivi4_torch kivi4_triton --out $OUT/r/gpu_check.jsonl 2>&1 | tail -14
tar czf $OUT/call2.tgz -C $OUT r && rm -rf $OUT/r
