#!/usr/bin/env bash
# Download the wheels the GPU machine lacks into the git-ignored .whl/ folder, for the device
# call's `carry` (see docs/gpu.md). The GPU machine has no network: these travel with the tree.
#   flashinfer-python 0.5.3 + apache-tvm-ffi (its only runtime need for paged attention),
#   llguidance (constraints), gguf (the GGUF loader), and the versions of anyio (the engine
#   needs >= 4.11: anyio.lowlevel.current_token), attrs and typing_extensions (anyio 4.16
#   needs >= 4.16) that aiolm is tested with here; the machine's own may be older.
# Idempotent: pip skips wheels already in .whl/. Keep one version of each package there.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
PY=${PYTHON:-.venv/bin/python}
dl=("$PY" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all:
    --python-version 3.12 --implementation cp
    --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
    --platform manylinux1_x86_64 -d .whl)
"${dl[@]}" flashinfer-python==0.5.3
"${dl[@]}" "apache-tvm-ffi>=0.1,<0.2"
"${dl[@]}" "llguidance==${LLGUIDANCE_VERSION:-1.9.1}"
"${dl[@]}" "gguf==${GGUF_VERSION:-0.19.0}"
"${dl[@]}" anyio==4.16.0 attrs==26.1.0 typing_extensions==4.16.0
ls -l .whl
du -sh .whl
