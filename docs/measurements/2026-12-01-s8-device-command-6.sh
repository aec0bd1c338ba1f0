#!/usr/bin/env bash
# session 8, device command 6 (kernel-only): is the work list slower because of its unused rows (empty programs) or
# its order (request-major)? --work-variant at batch 64 and 256, 4k, "tc", per-kernel times
export PYTHONPATH=$PWD; mkdir -p $OUT/r
D="python benchmarks/decode_attention.py --configs kivi2 --shapes gqa --kernel tc --contexts 4096 --profile --work-target 1024"
for b in 64 256; do for v in no-empty slot-major no-empty-slot-major; do echo "== b$b $v"; timeout 40 $D --batches $b --work-variant $v --out $OUT/r/b$b-$v.json > $OUT/r/b$b-$v.log 2>&1; grep -E "^gqa|kernels:" $OUT/r/b$b-$v.log | cut -c1-200; done; done
tar czf $OUT/cmd6.tgz -C $OUT r && rm -rf $OUT/r
