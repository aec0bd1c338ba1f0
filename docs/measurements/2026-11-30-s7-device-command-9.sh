#!/usr/bin/env bash
# session 7, device command 9 (kernel-only, fresh machine): the store with several KV heads per phase-1 program:
# GPU test against the reference, then store time per layer for prompt chunks
export PYTHONPATH=$PWD
mkdir -p $OUT/r
timeout 120 python -m pytest -q tests/test_kernels.py -k "store_heads or store_bit_exact" -p no:cacheprovider 2>&1 | tail -2
timeout 300 python benchmarks/prefill_attention.py --configs kivi2 --shapes llama2-7b gqa gqa8 --cases 4x4096 16x1024 2x512 \
  --store-heads 1 2 4 8 16 32 --out $OUT/r/store-heads.json > $OUT/r/store-heads.log 2>&1; grep -E "store|kivi2" $OUT/r/store-heads.log | tail -40
tar czf $OUT/cmd9.tgz -C $OUT r && rm -rf $OUT/r
