#!/usr/bin/env bash
# session 8, device command 3 (with the last bundle part): decode split rule against the default split count at the
# issue's grid at the GQA shape ("tc"), FA3 bf16/fp8 in the same run; one long request among short ones; the store probe.
bash .devbundle/setup-on-device.sh > /tmp/setup.log 2>&1 || { tail -20 /tmp/setup.log; exit 1; }
source /tmp/kivi-env.sh
mkdir -p $OUT/r
D="python benchmarks/decode_attention.py"
run() { local name=$1 lim=$2; shift 2; echo "== $name"; timeout $lim $D "$@" --out $OUT/r/$name.json > $OUT/r/$name.log 2>&1; grep -E "^(gqa|llama2|copy)" $OUT/r/$name.log | cut -c1-150; }
run gqa-default 160 --configs kivi2 kivi4 fa3-fp8 fa3-bf16 --shapes gqa --kernel tc
run gqa-split1024 90 --configs kivi2 kivi4 --shapes gqa --kernel tc --split-target 1024
run gqa-long-default 30 --configs kivi2 --shapes gqa --kernel tc --batches 16 64 --contexts 1024 --long-context 16384
run gqa-long-split1024 30 --configs kivi2 --shapes gqa --kernel tc --batches 16 64 --contexts 1024 --long-context 16384 --split-target 1024
echo "== store probe"
timeout 80 python benchmarks/prefill_attention.py --configs kivi2 --shapes llama2-7b gqa --cases 4x4096 4x2048+2048 16x1024 --store-probe --out $OUT/r/store-probe.json > $OUT/r/store-probe.log 2>&1; grep -E "probe| us " $OUT/r/store-probe.log | tail -12
tar czf $OUT/cmd3.tgz -C $OUT r && rm -rf $OUT/r
