#!/usr/bin/env bash
# session 7, device command 6: SmolLM2 engine with prefill="exact": cache-read perplexity on the Triton path (first
# chunks in FlashAttention) and on the PyTorch path; the start-up line names the prefill path
source /tmp/kivi-env.sh
mkdir -p $OUT/r
EV='from kivi_vllm.eval.cli import main; main()'
timeout 240 python -c "$EV" --model /tmp/smollm2-135m --configs kivi2-prefill-exact kivi4-prefill-exact --windows 4 --tasks perplexity --out $OUT/r/eval-exact-triton.json > $OUT/r/eval-triton.log 2>&1; grep -m2 "KIVI attention" $OUT/r/eval-triton.log | cut -c1-400; tail -6 $OUT/r/eval-triton.log
KIVI_ATTENTION_PATH=torch timeout 300 python -c "$EV" --model /tmp/smollm2-135m --configs kivi2-prefill-exact kivi4-prefill-exact --windows 4 --tasks perplexity --out $OUT/r/eval-exact-torch.json > $OUT/r/eval-torch.log 2>&1; tail -6 $OUT/r/eval-torch.log
tar czf $OUT/cmd6.tgz -C $OUT r && rm -rf $OUT/r
