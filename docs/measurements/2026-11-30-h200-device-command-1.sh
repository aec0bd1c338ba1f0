#!/usr/bin/env bash
# session 6, device command 1: tc/fma register caps and conditional rescaling (kernel-only, no vLLM)
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
T="timeout 150"
$T python scripts/decode_kernels_check.py --kernels tc --wide > $OUT/check-wide.log 2>&1; tail -1 $OUT/check-wide.log
$T python scripts/decode_kernels_check.py --kernels tc fma --wide --q-scale 30 > $OUT/check-wide-q30.log 2>&1; tail -1 $OUT/check-wide-q30.log
$T python scripts/decode_kernels_check.py --kernels tc --q-scale 30 --rescale-slack 0 --maxnreg 168 > $OUT/check-q30-s0-r168.log 2>&1; tail -1 $OUT/check-q30-s0-r168.log
B="--configs kivi2 --batches 64 256 --contexts 4096 16384"
run() { name=$1; shift; $T python benchmarks/decode_attention.py "$@" --out $OUT/$name.json > $OUT/$name.log 2>&1; echo "== $name"; grep -E "kivi[24]: " $OUT/$name.log; }
run tc-s0 $B --shapes gqa llama2-7b --kernel tc --rescale-slack 0
run tc-s8 $B --shapes gqa llama2-7b --kernel tc
run tc-s8-r200 $B --shapes gqa llama2-7b --kernel tc --maxnreg 200
run tc-s8-r168 $B --shapes gqa llama2-7b --kernel tc --maxnreg 168
run tc-s8-r144 $B --shapes gqa llama2-7b --kernel tc --maxnreg 144
run tc-s0-r168 $B --shapes gqa --kernel tc --rescale-slack 0 --maxnreg 168
run fma $B --configs kivi2 kivi4 --shapes llama2-7b --kernel fma
run fma-r104 $B --configs kivi2 kivi4 --shapes llama2-7b --kernel fma --maxnreg 104
run fma-r96 $B --configs kivi2 kivi4 --shapes llama2-7b --kernel fma --maxnreg 96
run qpk-fma $B --shapes gqa2 gqa3 gqa8 --kernel fma
run qpk-tc $B --shapes gqa2 gqa3 gqa8 --kernel tc --maxnreg 168
run small-tc --configs kivi2 --batches 16 64 --contexts 1024 4096 --shapes gqa --kernel tc --maxnreg 168
