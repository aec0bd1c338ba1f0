#!/usr/bin/env bash
# session 7, device command 10 (kernel-only, fresh machine): the store's warps per program (Triton num_warps; the
# default 4 compiles to 112 registers, 4 programs per SM): time per layer for prompt chunks, bytes compared
export PYTHONPATH=$PWD
mkdir -p $OUT/r
timeout 300 python benchmarks/prefill_attention.py --configs kivi2 --shapes llama2-7b gqa gqa8 --cases 4x4096 16x1024 2x512 \
  --store-warps 1 2 4 8 16 --out $OUT/r/store-warps.json > $OUT/r/store-warps.log 2>&1; grep -E "store|kivi2" $OUT/r/store-warps.log | tail -40
tar czf $OUT/cmd10.tgz -C $OUT r && rm -rf $OUT/r
