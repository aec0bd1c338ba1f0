#!/usr/bin/env bash
# session 7, device command 1 (with bundle part.00; kernel-only, PYTHONPATH): "tc" with the query unscaled in fp16
# (softmax scale on the float32 scores): time, then the float64 check at q-scale 8 and 1
mkdir -p /tmp/kivi-parts && cp .devbundle/part.* /tmp/kivi-parts/
export PYTHONPATH=$PWD
mkdir -p $OUT/r
timeout 200 python benchmarks/decode_attention.py --configs kivi2 --shapes gqa gqa2 --batches 64 256 --contexts 4096 16384 \
  --kernel tc --out $OUT/r/decode-tc-qfp16.json > $OUT/r/decode-tc.log 2>&1; grep -v "^\s*$" $OUT/r/decode-tc.log | tail -10
if python -c "import pytest" 2>/dev/null; then
  timeout 170 python scripts/decode_kernels_check.py --kernels tc --wide --q-scale 8 > $OUT/r/check-q8.log 2>&1; tail -3 $OUT/r/check-q8.log
  timeout 150 python scripts/decode_kernels_check.py --kernels tc --wide > $OUT/r/check-q1.log 2>&1; tail -3 $OUT/r/check-q1.log
else
  echo "no pytest here: checks wait for the bundle"
fi
tar czf $OUT/cmd1.tgz -C $OUT r && rm -rf $OUT/r
