#!/usr/bin/env bash
# Download the wheels the GPU machine lacks into the git-ignored .whl/ folder, for the device
# call's `carry` (see docs/gpu.md). The GPU machine has no network: these travel with the tree.
#   flashinfer-python 0.5.3 + apache-tvm-ffi (its only runtime need for paged attention),
#   llguidance (constraints), gguf (the GGUF loader), and the versions of anyio (the engine
#   needs >= 4.11: anyio.lowlevel.current_token), attrs and typing_extensions (anyio 4.16
#   needs >= 4.16) that aiolm is tested with here; the machine's own may be older; and the
#   runtime needs added since (issue 15/16): prometheus-client (/metrics), httpx-sse and
#   tenacity (the OpenAI backend), pydantic (request bodies), jsonschema with its
#   format-nongpl checkers (constraints checked on the finished value).
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
"${dl[@]}" prometheus-client==0.26.0 httpx-sse==0.4.3 tenacity==9.2.1
"${dl[@]}" pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
"${dl[@]}" jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
"${dl[@]}" fqdn==1.6.0 isoduration==20.11.0 arrow==1.4.0 python-dateutil==4.0.0 six==1.17.0 \
    jsonpointer==3.12 rfc3339-validator==0.1.4 rfc3986-validator==0.1.1 rfc3987-syntax==1.1.0 \
    lark==1.3.1 uri-template==1.3.0 webcolors==25.10.0 tzdata==2026.6
# aiolm serve and the openai client, for `aiolm bench serving --backend server` there.
"${dl[@]}" starlette==1.10.0 uvicorn==0.54.0 h11==0.16.0 click==8.5.1 openai==3.57.0 \
    jiter==0.19.0 distro==1.9.0 sniffio==1.3.1 httpx==0.28.1 httpcore==1.0.9 \
    certifi==2026.10.19.post1 idna==3.20 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5
# Images for the multimodal models (PyAV is not carried: 35 MB, and the GPU tests pass frames).
"${dl[@]}" pillow==13.0.0
ls -l .whl
du -sh .whl
