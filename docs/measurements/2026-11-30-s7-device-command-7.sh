#!/usr/bin/env bash
# session 7, device command 7: kivi-bench long (256 x (3584+512), Llama-2-7B shape, dummy weights): streaming vs
# exact prefill (first chunks in FlashAttention), same machine
source /tmp/kivi-env.sh
TIME_LIMIT=150 scripts/bench_gpu.sh long kivi2-prefill-exact kivi2 2>&1 | grep -vE "^\s*$|it/s|Processed prompts" | tail -25
