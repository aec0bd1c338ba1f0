#!/usr/bin/env bash
# session 12, device command 1 (kernel-only): the store of one decode step by batch state (steady, worst, heavy
# rows only, light rows only, empty, one request) and num_warps, GQA and Llama-2-7B shapes, KIVI-2 and KIVI-4
export PYTHONPATH=$PWD; mkdir -p $OUT/r
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
timeout 400 python benchmarks/store_step.py --bits 2 4 --num-warps 4 1 2 8 --out $OUT/r/store.json 2>&1 | tee $OUT/r/store.log
