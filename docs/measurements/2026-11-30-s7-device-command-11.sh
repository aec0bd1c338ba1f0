#!/usr/bin/env bash
# session 7, device command 11 (kernel-only, fresh machine): "tc" decode at GQA (32 query / 8 KV heads), KIVI-2, the
# cells still slower than fp8 (batches 16/64, contexts 1k/4k), against the split count (default there: 32)
export PYTHONPATH=$PWD
mkdir -p $OUT/r
for s in 4 8 16; do
  timeout 60 python benchmarks/decode_attention.py --configs kivi2 --shapes gqa --batches 16 64 --contexts 1024 4096 \
    --kernel tc --num-splits $s --out $OUT/r/splits-$s.json > $OUT/r/splits-$s.log 2>&1
  echo "splits $s"; grep -E "^gqa" $OUT/r/splits-$s.log
done
timeout 60 python benchmarks/decode_attention.py --configs kivi2 --shapes gqa --batches 16 64 --contexts 1024 4096 \
  --kernel tc --out $OUT/r/splits-default.json > $OUT/r/splits-default.log 2>&1; echo "default"; grep -E "^gqa" $OUT/r/splits-default.log
tar czf $OUT/cmd11.tgz -C $OUT r && rm -rf $OUT/r
