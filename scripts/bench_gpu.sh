#!/usr/bin/env bash
# kivi-bench on the lent H200: one workload, some configurations, Llama-2-7B shape with dummy weights.
#
#   scripts/bench_gpu.sh WORKLOAD [CONFIG ...]      WORKLOAD: decode (512 x (1024+1024)) or long (256 x (3584+512));
#                                                   CONFIGs default to: auto fp8 kivi2 kivi4
#
# On the device, after the bundle of ../shared/device/README.md:
#   bash .devbundle/setup-on-device.sh && source /tmp/kivi-env.sh && scripts/bench_gpu.sh decode auto fp8
#
# Each configuration runs in its own subprocess (engine start about 40-60 s with torch.compile and CUDA graphs for
# bf16 and fp8, not yet timed for KIVI at these batch sizes, then the timed run). TIME_LIMIT (default 200 s) aborts a
# configuration's timed run that takes longer and marks it "truncated". Two bf16/fp8 configurations fit a 10-minute
# device command; run KIVI configurations one per command.
# Results accumulate in $BENCH_DIR (default out/bench-gpu, ignored by git; it survives between commands only while the
# machine stays warm), and results.json, results.md, the three PNGs and a tarball of the vLLM logs are copied to $OUT
# (7 files, under the device's 8-file limit). Merge the results.json of several commands here with
#   python -m kivi_vllm.bench --report-only --merge A/results.json B/results.json --out docs/measurements/bench-h200
#
# Environment: OUT, BENCH_DIR, MODEL (default benchmarks/llama2-7b; benchmarks/llama3-8b is the GQA shape: give it
# its own BENCH_DIR, results of different models must not be merged), TIME_LIMIT, NUM_REQUESTS (overrides the
# workload's request count), PYTHON (default
# python3), BENCH_ARGS (more kivi-bench flags, e.g. "--baseline").
set -euo pipefail
cd "$(dirname "$0")/.."
WORKLOAD=${1:?usage: scripts/bench_gpu.sh WORKLOAD [CONFIG ...]}
shift
CONFIGS=("$@")
[ ${#CONFIGS[@]} -gt 0 ] || CONFIGS=(auto fp8 kivi2 kivi4)
BENCH_DIR=${BENCH_DIR:-out/bench-gpu}
PY=${PYTHON:-python3}
ARGS=(--workloads "$WORKLOAD" --configs "${CONFIGS[@]}" --model "${MODEL:-benchmarks/llama2-7b}" --max-model-len 4096
      --gpu-memory-utilization 0.9 --time-limit "${TIME_LIMIT:-200}" --out "$BENCH_DIR")
[ -z "${NUM_REQUESTS:-}" ] || ARGS+=(--num-requests "$NUM_REQUESTS")
# shellcheck disable=SC2206  # BENCH_ARGS is split on purpose
[ -z "${BENCH_ARGS:-}" ] || ARGS+=($BENCH_ARGS)
rc=0
PYTHONUNBUFFERED=1 "$PY" -m kivi_vllm.bench "${ARGS[@]}" || rc=$?
if [ -n "${OUT:-}" ]; then
  cp "$BENCH_DIR"/results.json "$BENCH_DIR"/results.md "$BENCH_DIR"/*.png "$OUT"/ 2>/dev/null || true
  tar -C "$BENCH_DIR" -czf "$OUT"/logs.tar.gz logs 2>/dev/null || true
fi
exit $rc
