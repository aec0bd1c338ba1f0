#!/usr/bin/env bash
# session 12, device command 2 (kernel-only): the store with a reciprocal per group instead of a division per
# element, and R rows per program (R = 1 ... 16, 0 = store()'s default), 4 and 8 warps, by batch state; then the
# kernel sweep (store bytes against the reference, attention against float64) for 150 s
export PYTHONPATH=$PWD; mkdir -p $OUT/r
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
timeout 200 python benchmarks/store_step.py --bits 2 --num-warps 4 8 --rows-per-program 0 1 2 4 8 16 --out $OUT/r/store2.json 2>&1 | tee $OUT/r/store2.log
timeout 60 python benchmarks/store_step.py --bits 4 --out $OUT/r/store4.json 2>&1 | tee $OUT/r/store4.log
timeout 150 python scripts/kernel_sweep.py --out $OUT/r/sweep.json > $OUT/r/sweep.log 2>&1; echo "sweep rc=$?"; tail -4 $OUT/r/sweep.log
