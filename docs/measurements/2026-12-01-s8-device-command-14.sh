#!/usr/bin/env bash
# session 8, device command 14 (kernel-only): the stores over the rows with work only (store.store_rows, as the
# metadata builder lists them for steps with prompt chunks) against one program per row (same bytes checked)
export PYTHONPATH=$PWD; mkdir -p $OUT/r
timeout 100 python benchmarks/prefill_attention.py --configs kivi2 --shapes llama2-7b gqa --cases 4x4096 4x2048+2048 16x1024 --store-probe --out $OUT/r/store-rows.json > $OUT/r/store-rows.log 2>&1; grep -E "probe| us " $OUT/r/store-rows.log | cut -c1-260
tar czf $OUT/cmd14.tgz -C $OUT r && rm -rf $OUT/r
