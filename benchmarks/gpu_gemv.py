#!/usr/bin/env python3
"""One-token projections on one GPU: cuBLAS (``F.linear``) against a Triton GEMV (an
experiment: the engine keeps cuBLAS).

``python benchmarks/gpu_gemv.py --out gemv.json`` (a minute on an H200): for each
projection of Llama-3-8B (``qkv_proj``, ``o_proj``, ``gate_up_proj``, ``down_proj``,
``lm_head``) at batch 1, bf16, the time of one product inside a CUDA graph (50 products a
replay, so launches do not count), each product reading a different copy of the weight
(512 MB of copies: none is in the L2 cache, as in a decode step), for ``F.linear`` and for
the Triton GEMV below at each tile configuration swept; for ``down_proj`` also SiLU(gate) *
up computed on the fly inside the GEMV against ``silu_and_mul`` then ``F.linear``.

The GEMV gives each program ``block_n`` whole rows of the weight (no split of the
reduction, so no second kernel). What it showed on nvidia-h200
(docs/benchmarks/gpu-h200-gemv-rotating.json): only ``o_proj`` is faster than cuBLAS
(11.4 against 13.4 µs, its split-K reduction kernel gone); ``qkv_proj``, ``gate_up_proj``,
``down_proj`` and ``lm_head`` are within ±3%, and the fused activation is slower (37.8
against 33.1 µs). Timed without the copies (gpu-h200-gemv.json) the 34 MB ``o_proj`` sat in
the 50 MB L2 cache and looked 1.6x faster than it is. About 2 µs a layer of a 4.7 ms
decode step is below what decode-bs1 runs resolve (205-213 tok/s between runs of the same
code), so the engine was not changed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

class GemvConfig:
    """Tile sizes of :func:`gemv` (plain values)."""

    def __init__(self, *, block_n: int = 8, block_k: int = 512, warps: int = 4,
                 stages: int = 3) -> None:
        self.block_n = block_n
        self.block_k = block_k
        self.warps = warps
        self.stages = stages

    def __repr__(self) -> str:
        return f"n{self.block_n}-k{self.block_k}-w{self.warps}-s{self.stages}"


@triton.jit
def _gemv_kernel(X, W, Bias, Out, n_rows, n_cols, stride_w, SILU_INPUT: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr):
    # One program: BLOCK_N rows of the weight, each over the whole reduction.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    r_mask = rows < n_rows
    w_rows = W + rows.to(tl.int64)[:, None] * stride_w
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        if EVEN_K:
            x = tl.load(X + cols).to(tl.float32)
            if SILU_INPUT:   # X holds [gate | up]: the input is SiLU(gate) * up
                up = tl.load(X + n_cols + cols).to(tl.float32)
                x = x / (1.0 + tl.exp(-x)) * up
            w = tl.load(w_rows + cols[None, :], mask=r_mask[:, None], other=0.0)
        else:
            c_mask = cols < n_cols
            x = tl.load(X + cols, mask=c_mask, other=0.0).to(tl.float32)
            if SILU_INPUT:
                up = tl.load(X + n_cols + cols, mask=c_mask, other=0.0).to(tl.float32)
                x = x / (1.0 + tl.exp(-x)) * up
            w = tl.load(w_rows + cols[None, :], mask=r_mask[:, None] & c_mask[None, :],
                        other=0.0)
        if SILU_INPUT:
            # The unfused path rounds the activation to the weights' dtype: so does this.
            x = x.to(W.dtype.element_ty).to(tl.float32)
        acc += w.to(tl.float32) * x[None, :]
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(Bias + rows, mask=r_mask, other=0.0).to(tl.float32)
    tl.store(Out + rows, out.to(Out.dtype.element_ty), mask=r_mask)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         silu_input: bool = False, out: torch.Tensor | None = None,
         cfg: GemvConfig | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` for one row ``x`` ([1, K], or [1, 2K] with ``silu_input``:
    then the input is ``silu(x[:, :K]) * x[:, K:]``); ``weight`` [N, K], contiguous rows.
    Returns [1, N] in ``x``'s dtype."""
    if x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"x: expected one row [1, K], got {tuple(x.shape)}")
    n_rows, n_cols = weight.shape
    if x.shape[1] != (2 * n_cols if silu_input else n_cols):
        raise ValueError(f"x: {tuple(x.shape)} does not match the weight's {n_cols} columns"
                         f"{' (twice that with silu_input)' if silu_input else ''}")
    if weight.stride(1) != 1 or not x.is_contiguous():
        raise ValueError("gemv: the weight's rows and x must be contiguous")
    cfg = cfg or GemvConfig()
    if out is None:
        out = torch.empty((1, n_rows), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n_rows, cfg.block_n),)](
        x, weight, bias if bias is not None else weight, out, n_rows, n_cols,
        weight.stride(0), SILU_INPUT=silu_input, HAS_BIAS=bias is not None,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=n_cols % cfg.block_k == 0,
        num_warps=cfg.warps, num_stages=cfg.stages)
    return out


def graph_us(fn: Callable[[], Any], *, per_replay: int = 50, replays: int = 10,
             repeats: int = 3) -> float:
    """Microseconds of one ``fn()`` on the current CUDA device, timed inside a CUDA graph of
    ``per_replay`` calls (launch costs excluded); the median of ``repeats`` timings."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_replay):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (replays * per_replay))
    del graph
    return sorted(times)[len(times) // 2]


def rotation(weight: torch.Tensor, nbytes: int = 512 << 20) -> list[torch.Tensor]:
    """``weight`` and copies of it, ``nbytes`` in all, for timings to cycle through."""
    size = weight.numel() * weight.element_size()
    return [weight, *(weight.clone() for _ in range(max(0, -(-nbytes // size) - 1)))]


SHAPES = {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (28672, 4096),
          "down_proj": (4096, 14336), "lm_head": (128256, 4096)}


def copy_bandwidth() -> float:
    """Bytes a second a device-to-device copy of 1 GiB moves (read plus write)."""
    a = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    us = graph_us(lambda: b.copy_(a), per_replay=5, replays=4)
    return 2 * a.numel() * a.element_size() / (us * 1e-6)


def shape_row(name: str, n_rows: int, n_cols: int, configs: list[Any],
              bandwidth: float) -> dict[str, Any]:
    """cuBLAS and every configuration of the Triton GEMV on one projection's shape."""
    import torch.nn.functional as F

    from aiolm.engine.layers.fused import silu_and_mul


    weight = torch.randn(n_rows, n_cols, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(1, n_cols, device="cuda", dtype=torch.bfloat16)
    nbytes = weight.numel() * weight.element_size()
    ref = F.linear(x, weight)
    out = torch.empty_like(ref)

    def rel_err(got: Any, want: Any) -> float:
        return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()

    # Each timed product reads a different copy of the weight (512 MB in all): none is
    # in the L2 cache, as in a decode step (timing one 34 MB weight alone measured
    # o_proj at 1.6x the copy bandwidth).
    turn = itertools.cycle(rotation(weight))
    row: dict[str, Any] = {"shape": [n_rows, n_cols], "weight_mb": nbytes / 1e6}
    us = graph_us(lambda: F.linear(x, next(turn)))
    row["cublas"] = {"us": us, "of_bandwidth": nbytes / (us * 1e-6) / bandwidth}
    sweep = {}
    for cfg in configs:
        try:
            err = rel_err(gemv(x, weight, out=out, cfg=cfg), ref)
            us = graph_us(lambda cfg=cfg: gemv(x, next(turn), out=out, cfg=cfg))
            sweep[repr(cfg)] = {"us": us, "of_bandwidth": nbytes / (us * 1e-6) / bandwidth,
                                "rel_err": err}
        except Exception as exc:   # a configuration the compiler refuses: recorded
            sweep[repr(cfg)] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
    timed = {k: v for k, v in sweep.items() if "us" in v}
    best = min(timed, key=lambda k: timed[k]["us"])
    row["triton_best"] = {"config": best, **timed[best]}
    row["triton"] = sweep
    if name == "down_proj":
        gate_up = torch.randn(1, 2 * n_cols, device="cuda", dtype=torch.bfloat16)
        cfg = GemvConfig(**dict(zip(("block_n", "block_k", "warps", "stages"), _parse(best),
                                    strict=True)))
        want = F.linear(silu_and_mul(gate_up), weight)
        row["silu_fused"] = {
            "unfused_us": graph_us(lambda: F.linear(silu_and_mul(gate_up), next(turn))),
            "fused_us": graph_us(lambda: gemv(gate_up, next(turn), silu_input=True, out=out,
                                              cfg=cfg)),
            "rel_err": rel_err(gemv(gate_up, weight, silu_input=True, out=out, cfg=cfg), want)}
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    from aiolm.bench.results import device_info, versions

    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    results: dict[str, Any] = {"device": device_info("cuda"), "versions": versions(),
                               "copy_bandwidth_Bps": bandwidth, "shapes": {}}
    configs = [GemvConfig(block_n=n, block_k=k, warps=w, stages=s)
               for n, k, w, s in itertools.product((4, 8, 16), (256, 512, 1024), (4, 8),
                                                   (1, 3))]
    for name, (n_rows, n_cols) in SHAPES.items():
        row = shape_row(name, n_rows, n_cols, configs, bandwidth)
        results["shapes"][name] = row
        print(name, json.dumps({k: v for k, v in row.items() if k != "triton"}), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


def _parse(name: str) -> tuple[int, int, int, int]:
    n, k, w, s = name.split("-")
    return int(n[1:]), int(k[1:]), int(w[1:]), int(s[1:])


if __name__ == "__main__":
    sys.exit(main())
