"""The attention kernels compiled for an H100/H200 (sm_90) without a GPU: Triton's NVIDIA
backend runs on any machine, so the CPU suite checks what the GPU would run.

Each kernel is compiled as a launch would specialize it (pointers and strides divisible by
16, bf16 K/V) in a subprocess (the tests' process imports Triton in interpreter mode), and
its PTX must read K and V with 16-byte loads or asynchronous copies, never element by
element: a rewrite of the kernels that lost the vectorized loads would still pass every
numeric test and only show as a slower GPU run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

_COMPILE = textwrap.dedent('''
    import json, re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from aiolm.engine.attention import triton_kernels as tk

    POINTERS = {"Q": "*bf16", "Out": "*bf16", "KBuf": "*bf16", "VBuf": "*bf16",
                "ReqToToken": "*i32", "ReqPoolIdx": "*i64", "SeqLens": "*i32",
                "PrefixLens": "*i32", "ExtendLens": "*i32", "QStart": "*i32",
                "GroupRows": "*i32", "GroupLens": "*i32", "MidO": "*fp32", "MidLse": "*fp32"}
    out = {}
    for name, kernel, constexprs in json.loads(sys.argv[1]):
        fn = getattr(tk, kernel)
        params = fn.arg_names
        signature = {p: "constexpr" if p in constexprs else POINTERS.get(p, "fp32" if p == "qk_scale" else "i32")
                     for p in params}
        attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params)
                 if p in POINTERS or p.startswith("stride")}
        src = ASTSource(fn=fn, signature=signature, attrs=attrs,
                        constexprs={(params.index(k),): v for k, v in constexprs.items()})
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": 2, "num_stages": 2}).asm["ptx"]
        out[name] = {"scalar_2b": len(re.findall(r"ld\\.global(?:\\.\\w+)*\\.b16\\b", ptx)),
                     "wide": len(re.findall(r"cp\\.async\\.\\w+\\.shared\\.global|ld\\.global(?:\\.\\w+)*\\.v4", ptx))}
    print(json.dumps(out))
''')

_DECODE = dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_N=64, MIN_CHUNK=64, DOT_F32=False)
CASES = [
    ("stage1, Llama-3 heads", "_decode_stage1_kernel",
     dict(_DECODE, KV_GROUP=4, BLOCK_H=16, HEADS=1, HAS_PREFIX=False)),
    ("stage1, LLaVA heads, 4 a program", "_decode_stage1_kernel",
     dict(_DECODE, KV_GROUP=1, BLOCK_H=16, HEADS=4, HAS_PREFIX=True)),
    ("shared prefix, 16 members", "_decode_shared_kernel",
     dict(_DECODE, KV_GROUP=1, BLOCK_H=1, BLOCK_M=16)),
    ("extend, a query head a program", "_extend_kernel",
     dict(KV_GROUP=4, HEAD_DIM=128, BLOCK_D=128, BLOCK_M=128, BLOCK_N=64, DOT_F32=False)),
    ("extend, a KV head's queries a program", "_extend_grouped_kernel",
     dict(KV_GROUP=4, GROUP_P=4, HEAD_DIM=128, BLOCK_D=128, BLOCK_T=16, BLOCK_N=64,
          DOT_F32=False)),
]


def test_attention_kernels_read_kv_with_wide_loads_on_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        done = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(CASES)], env=env,
                              capture_output=True, text=True, timeout=600, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("compiling the kernels for sm_90 took over 10 minutes")
    if done.returncode and "ptxas" in done.stderr and "not found" in done.stderr.lower():
        pytest.skip("this Triton has no ptxas for sm_90")
    assert done.returncode == 0, done.stderr[-3000:]
    loads = json.loads(done.stdout.strip().splitlines()[-1])
    for name, _, _ in CASES:
        assert loads[name]["scalar_2b"] == 0, (name, loads[name])
        assert loads[name]["wide"] >= 16, (name, loads[name])
