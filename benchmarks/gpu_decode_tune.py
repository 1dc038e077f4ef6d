#!/usr/bin/env python3
"""Sweep the Triton decode kernels' tile sizes on one GPU (the ``KernelConfig`` decode fields).

``python benchmarks/gpu_decode_tune.py --out tune.json`` (a minute or two on an H200): for
each shape, decode attention of one layer timed with CUDA events at every combination of
``decode_block_n`` (32, 64, 128), ``decode_warps`` (2, 4), ``decode_stages`` (1, 2) and
``decode_heads`` (the KV heads one program reads: 1, 2, 4),
as the engine plans its splits (a CUDA graph's plan for the batch-1 shapes):

- ``gqa-bs1-ctx1k``: Llama-3-8B heads (32 x 8 of 128), one request, 1,024 tokens (decode-bs1);
- ``gqa-bs64-ctx1k``: the same heads, 64 requests of 300–1,300 tokens (throughput);
- ``mha-bs64-image``: LLaVA's 32 x 32 heads, 64 requests in 12 groups of 5 sharing 2,340
  tokens (image-qa), plain and shared-prefix decode.

Reports each configuration's time and the best per shape beside the current defaults.

``--deep``: deeper pipelines instead (``decode_stages`` 2, 3 and 4; ``decode_heads`` 1 and
2), two more shapes — ``mha-bs120-image`` (every image-qa question at once: 24 groups of 5)
and ``gqa-bs256-ctx1k`` (the throughput workload's running batch) — and, as a reference
for each shape, flashinfer's paged decode kernel on the same page table (page size 1) with
the bytes of K/V each reads and its rate.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def plain_case(*, geometry: tuple[int, int, int], lens: list[int], device: Any,
               dtype: Any) -> dict[str, Any]:
    import torch

    hq, hkv, d = geometry
    total = sum(lens)
    slots = torch.randperm(total + 1, device=device)[1:].to(torch.int32)
    table = torch.zeros((len(lens), max(lens)), dtype=torch.int32, device=device)
    at = 0
    for b, n in enumerate(lens):
        table[b, :n] = slots[at:at + n]
        at += n
    gen = torch.Generator(device=device).manual_seed(0)
    return {"q": torch.randn((len(lens), hq, d), generator=gen, device=device).to(dtype),
            "k_buf": torch.randn((total + 1, hkv, d), generator=gen, device=device).to(dtype),
            "v_buf": torch.randn((total + 1, hkv, d), generator=gen, device=device).to(dtype),
            "table": table, "rows": torch.arange(len(lens), dtype=torch.int32, device=device),
            "seq_lens": torch.tensor(lens, dtype=torch.int32, device=device), "lens": lens,
            "groups": None}


def sweep(case: dict[str, Any], *, device: Any, graph_plan: bool, repeat: int,
          configs: list[tuple[int, int, int, int]]) -> dict[str, Any]:
    import torch
    from gpu_shared_prefix import time_ms

    from aiolm.engine.attention import triton_kernels as tk
    from aiolm.engine.attention.triton import MAX_DECODE_SPLITS, SHARED_SPLITS

    q, k_buf, v_buf = case["q"], case["k_buf"], case["v_buf"]
    bs, hq, d = q.shape
    hkv = k_buf.shape[1]
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    scale = d ** -0.5
    out = torch.empty_like(q)
    mid_o = torch.empty((bs, hq, 64, d), dtype=torch.float32, device=device)
    mid_lse = torch.empty(mid_o.shape[:3], dtype=torch.float32, device=device)
    g = case["groups"]
    results: dict[str, Any] = {}
    for block_n, warps, stages, heads in configs:
        cfg = tk.kernel_config(device, d)
        cfg.decode_block_n, cfg.decode_warps, cfg.decode_stages = block_n, warps, stages
        cfg.decode_heads = heads
        name = f"n{block_n}-w{warps}-s{stages}-h{heads}"
        programs = hkv // tk.decode_heads(cfg, hkv)   # a request's programs per chunk
        splits = tk.plan_decode_splits(bs, programs, None if graph_plan else max(case["lens"]),
                                       sms, MAX_DECODE_SPLITS, cfg.decode_min_chunk)

        def plain(cfg=cfg, splits=splits) -> None:
            tk.decode_attention(q, out, k_buf, v_buf, case["table"], case["rows"],
                                case["seq_lens"], mid_o, mid_lse, splits, scale, cfg)

        try:
            row = {"plain_ms": time_ms(plain, device=device, repeat=repeat)}
            if g is not None:
                own = tk.plan_decode_splits(bs, programs, g.max_suffix, sms, MAX_DECODE_SPLITS,
                                            cfg.decode_min_chunk)
                shared = tk.plan_shared_splits(g.count, hkv, g.max_len, sms, SHARED_SPLITS,
                                               cfg.decode_min_chunk)

                def grouped(cfg=cfg, own=own, shared=shared) -> None:
                    tk.decode_attention_shared(
                        q, out, k_buf, v_buf, case["table"], case["rows"], case["seq_lens"],
                        g.prefix_lens, g.rows, g.lens, mid_o, mid_lse, own, shared, scale, cfg)

                row["shared_ms"] = time_ms(grouped, device=device, repeat=repeat)
            # The kernels shrink a tile that does not fit: say what actually ran.
            row["ran"] = (f"n{cfg.decode_block_n}-w{cfg.decode_warps}-s{cfg.decode_stages}"
                          f"-h{cfg.decode_heads}")
        except Exception as exc:   # a configuration the compiler refuses: recorded, skipped
            row = {"error": f"{type(exc).__name__}: {exc}"[:200]}
        results[name] = row
    return results


def flashinfer_reference(case: dict[str, Any], *, device: Any) -> dict[str, Any]:
    """flashinfer's decode on ``case``'s page table (page size 1), timed like the sweep; the
    K/V bytes every request reads (no sharing) and the rate."""
    import torch
    from gpu_shared_prefix import time_ms

    try:
        import flashinfer
    except ImportError as exc:
        return {"error": f"flashinfer: {exc}"}
    q, k_buf, v_buf = case["q"], case["k_buf"], case["v_buf"]
    bs, hq, d = q.shape
    hkv = k_buf.shape[1]
    lens = [int(n) for n in case["seq_lens"].tolist()]
    rows = case["rows"].tolist()
    indptr = torch.zeros(bs + 1, dtype=torch.int32)
    indptr[1:] = torch.tensor(lens, dtype=torch.int32).cumsum(0)
    indices = torch.cat([case["table"][r, :n] for r, n in zip(rows, lens, strict=True)])
    workspace = torch.zeros(256 << 20, dtype=torch.uint8, device=device)
    pages = (k_buf.view(-1, 1, hkv, d), v_buf.view(-1, 1, hkv, d))
    out: dict[str, Any] = {}
    for tensor_cores in (False, True):
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            workspace, "NHD", use_tensor_cores=tensor_cores)
        wrapper.plan(indptr, indices.to(device), torch.ones(bs, dtype=torch.int32),
                     hq, hkv, d, 1, q_data_type=q.dtype, kv_data_type=k_buf.dtype,
                     sm_scale=d ** -0.5)
        try:
            ms = time_ms(lambda w=wrapper: w.run(q, pages), device=device, repeat=30)
        except Exception as exc:   # a shape flashinfer refuses: recorded
            out["tensor_cores" if tensor_cores else "cuda_cores"] = {
                "error": f"{type(exc).__name__}: {exc}"[:200]}
            continue
        nbytes = sum(lens) * hkv * d * k_buf.element_size() * 2
        out["tensor_cores" if tensor_cores else "cuda_cores"] = {
            "ms": ms, "kv_mb": nbytes / 1e6, "gb_s": nbytes / ms / 1e6}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--quick", action="store_true",
                        help="only the default tiles and four warps (seconds)")
    parser.add_argument("--deep", action="store_true",
                        help="stages 2-4, heads 1-2, two more shapes, flashinfer's decode")
    args = parser.parse_args(argv)

    import torch
    from gpu_shared_prefix import make_case

    from aiolm.bench.results import device_info, versions
    from aiolm.engine.attention import triton_kernels as tk

    device, dtype = torch.device("cuda"), torch.bfloat16
    default = tk.kernel_config(device, 128)
    configs = list(itertools.product((32, 64, 128), (2, 4), (1, 2), (1, 2, 4)))
    if args.quick:
        configs = [(default.decode_block_n, warps, default.decode_stages, 1)
                   for warps in (2, 4)]
    if args.deep:
        configs = list(itertools.product((32, 64, 128), (2, 4), (2, 3, 4), (1, 2)))
    rnd = random.Random(0)
    shapes = {
        "gqa-bs1-ctx1k": (plain_case(geometry=(32, 8, 128), lens=[1024], device=device,
                                     dtype=dtype), True),
        "gqa-bs64-ctx1k": (plain_case(geometry=(32, 8, 128),
                                      lens=[rnd.randrange(300, 1300) for _ in range(64)],
                                      device=device, dtype=dtype), True),
        "mha-bs64-image": (make_case(geometry=(32, 32, 128), shared=2340, groups=12, members=5,
                                     alone=4, device=device, dtype=dtype), False),
    }
    if args.deep:
        shapes["mha-bs120-image"] = (make_case(geometry=(32, 32, 128), shared=2340, groups=24,
                                               members=5, alone=0, device=device,
                                               dtype=dtype), False)
        shapes["gqa-bs256-ctx1k"] = (plain_case(
            geometry=(32, 8, 128), lens=[rnd.randrange(300, 1300) for _ in range(256)],
            device=device, dtype=dtype), True)
    results: dict[str, Any] = {
        "device": device_info("cuda"), "versions": versions(),
        "default": (f"n{default.decode_block_n}-w{default.decode_warps}"
                    f"-s{default.decode_stages}-h{default.decode_heads}"),
    }
    for name, (case, graph_plan) in shapes.items():
        rows = sweep(case, device=device, graph_plan=graph_plan, repeat=30, configs=configs)
        timed = {k: v for k, v in rows.items() if "plain_ms" in v}
        best = min(timed, key=lambda k: timed[k]["plain_ms"])
        summary = {"rows": rows, "best_plain": best, "best_plain_ms": timed[best]["plain_ms"],
                   "default_plain_ms": rows[results["default"]].get("plain_ms")}
        for heads in (1, 2, 4):   # the best tiles at each head count
            mine = {k: v for k, v in timed.items() if k.endswith(f"-h{heads}")}
            if mine:
                top = min(mine, key=lambda k: mine[k]["plain_ms"])
                summary[f"best_plain_h{heads}"] = [top, mine[top]["plain_ms"]]
                if "shared_ms" in mine[top]:
                    top_s = min(mine, key=lambda k: mine[k]["shared_ms"])
                    summary[f"best_shared_h{heads}"] = [top_s, mine[top_s]["shared_ms"]]
        if any("shared_ms" in v for v in timed.values()):
            best_s = min(timed, key=lambda k: timed[k]["shared_ms"])
            summary.update(best_shared=best_s, best_shared_ms=timed[best_s]["shared_ms"],
                           default_shared_ms=rows[results["default"]].get("shared_ms"))
        if args.deep:
            summary["flashinfer"] = flashinfer_reference(case, device=device)
        results[name] = summary
        print(name, json.dumps({k: v for k, v in summary.items() if k != "rows"}), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
