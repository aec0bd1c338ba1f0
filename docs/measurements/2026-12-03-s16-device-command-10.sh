#!/usr/bin/env bash
# session 16, device command 10 (same machine): Llama-2-7B shape, dummy weights, FULL CUDA graphs, the dependent
# store: 1,024 requests of 1,024 + 256 tokens
source /tmp/kivi-env.sh; mkdir -p $OUT/r
echo "== llama7b load"; timeout 250 python scripts/gpu_check.py --only llama7b_kivi2_load --out $OUT/r/load.jsonl > $OUT/r/load.log 2>&1; echo "rc=$?"; grep -E "^(llama|matching)" $OUT/r/load.log | cut -c1-300; tail -2 $OUT/r/load.jsonl | cut -c1-400
cd $OUT && tar czf r.tar.gz r && rm -rf r
