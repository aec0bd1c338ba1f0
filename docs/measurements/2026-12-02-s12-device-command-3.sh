#!/usr/bin/env bash
# session 12, device command 3 (kernel-only): the store's default rows per program (1 program per SM) at batch 256
# and 64; the KIVI-2 decode attention with the store timed against it (decode_attention.py, both shapes, no FA3:
# vLLM is not installed); then the kernel sweep's shapes after the 12 of command 2 (residual k, groups 16/64/128,
# head sizes 80/96/256)
export PYTHONPATH=$PWD; mkdir -p $OUT/r
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
timeout 90 python benchmarks/store_step.py --bits 2 --rows-per-program 0 1 4 16 --out $OUT/r/store256.json 2>&1 | tee $OUT/r/store256.log
timeout 60 python benchmarks/store_step.py --bits 2 --batch 64 --rows-per-program 0 1 4 16 --out $OUT/r/store64.json 2>&1 | tee $OUT/r/store64.log
timeout 150 python benchmarks/decode_attention.py --configs kivi2 --shapes gqa llama2-7b --out $OUT/r/decode.json > $OUT/r/decode.log 2>&1; echo "decode rc=$?"; grep -E "^(gqa|llama2)" $OUT/r/decode.log
timeout 170 python scripts/kernel_sweep.py --first-shape 12 --seed 1 --out $OUT/r/sweep.json > $OUT/r/sweep.log 2>&1; echo "sweep rc=$?"; grep -vc "^ok" $OUT/r/sweep.log; grep -c "^ok" $OUT/r/sweep.log; grep -v "^ok" $OUT/r/sweep.log | tail -5
