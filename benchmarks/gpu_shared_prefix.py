#!/usr/bin/env python3
"""Decode attention with and without shared-prefix groups, one layer, on one GPU.

``python benchmarks/gpu_shared_prefix.py --out sp.json`` (seconds on an H200): the Triton
decode kernels timed with CUDA events on a batch shaped like ``aiolm bench image-qa``'s
steady state — 64 running requests, in groups of 5 sharing an image's prefix (LLaVA-NeXT-7B:
2,340 tokens; LLaVA-1.5-7B: 600), each with its own 40–160 tokens past it — for LLaVA's
multi-head geometry (32 query and 32 KV heads of 128) and a grouped-query one (32 x 8).

Reports per layer: the plain kernel (each request reads its whole sequence), the
shared-prefix kernels (each group reads its prefix once; at the planned split count of the
prefix and at 1–16 splits), the K/V bytes each must read and the rate each reads them at. ``--dry-run``: tiny shapes on the CPU
(Triton's interpreter), to check the plumbing.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def make_case(*, geometry: tuple[int, int, int], shared: int, groups: int, members: int,
              alone: int, device: Any, dtype: Any, seed: int = 0) -> dict[str, Any]:
    import torch

    from aiolm.engine.shared_prefix import max_members, prefix_groups

    hq, hkv, d = geometry
    rnd = random.Random(seed)
    lens, plan = [], []
    for _ in range(groups):
        first = len(lens)
        lens += [shared + rnd.randrange(40, 160) for _ in range(members)]
        plan.append((shared, list(range(first, first + members))))
    lens += [shared + rnd.randrange(40, 160) for _ in range(alone)]
    bs = len(lens)
    total = sum(lens)
    width = max_members(hq, hkv)   # the engine's fixed width: one compiled kernel
    slots = torch.randperm(total + 1, device=device)[1:].to(torch.int32)
    table = torch.zeros((bs, max(lens)), dtype=torch.int32, device=device)
    at = 0
    for b, n in enumerate(lens):
        table[b, :n] = slots[at:at + n]
        at += n
    for _, rows in plan:   # members share their group's prefix slots
        for b in rows[1:]:
            table[b, :shared] = table[rows[0], :shared]
    gen = torch.Generator(device=device).manual_seed(seed)
    k_buf = torch.randn((total + 1, hkv, d), generator=gen, device=device).to(dtype)
    v_buf = torch.randn((total + 1, hkv, d), generator=gen, device=device).to(dtype)
    q = torch.randn((bs, hq, d), generator=gen, device=device).to(dtype)
    groups_t = prefix_groups(plan, lens, device, width=width)
    distinct = total - sum(shared * (len(rows) - 1) for _, rows in plan)
    return {"q": q, "k_buf": k_buf, "v_buf": v_buf, "table": table,
            "rows": torch.arange(bs, dtype=torch.int32, device=device),
            "seq_lens": torch.tensor(lens, dtype=torch.int32, device=device),
            "lens": lens, "groups": groups_t, "bs": bs,
            "kv_bytes_plain": total * hkv * d * 2 * k_buf.element_size(),
            "kv_bytes_shared": distinct * hkv * d * 2 * k_buf.element_size()}


def time_ms(fn: Any, *, device: Any, repeat: int) -> float:
    import torch

    fn()
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        start.record()
        for _ in range(repeat):
            fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / repeat)
    return best


def measure(case: dict[str, Any], *, device: Any, repeat: int) -> dict[str, Any]:
    import torch

    from aiolm.engine.attention import triton_kernels as tk
    from aiolm.engine.attention.triton import MAX_DECODE_SPLITS, SHARED_SPLITS

    q, k_buf, v_buf = case["q"], case["k_buf"], case["v_buf"]
    bs, hq, d = q.shape
    hkv = k_buf.shape[1]
    sms = (torch.cuda.get_device_properties(device).multi_processor_count
           if device.type == "cuda" else 4)
    cfg = tk.kernel_config(device, d)
    scale = d ** -0.5
    out_plain = torch.empty_like(q)
    out_shared = torch.empty_like(q)
    g = case["groups"]
    plain_splits = tk.plan_decode_splits(bs, hkv, max(case["lens"]), sms, MAX_DECODE_SPLITS,
                                         cfg.decode_min_chunk)
    own = tk.plan_decode_splits(bs, hkv, g.max_suffix, sms, MAX_DECODE_SPLITS,
                                cfg.decode_min_chunk)
    shared = tk.plan_shared_splits(g.count, hkv, g.max_len, sms, SHARED_SPLITS,
                                   cfg.decode_min_chunk)
    mid_o = torch.empty((bs, hq, MAX_DECODE_SPLITS + MAX_DECODE_SPLITS, d),
                        dtype=torch.float32, device=device)
    mid_lse = torch.empty(mid_o.shape[:3], dtype=torch.float32, device=device)

    def plain() -> None:
        tk.decode_attention(q, out_plain, k_buf, v_buf, case["table"], case["rows"],
                            case["seq_lens"], mid_o, mid_lse, plain_splits, scale, cfg)

    def grouped(splits: int = shared) -> None:
        tk.decode_attention_shared(q, out_shared, k_buf, v_buf, case["table"], case["rows"],
                                   case["seq_lens"], g.prefix_lens, g.rows, g.lens, mid_o,
                                   mid_lse, own, splits, scale, cfg)

    plain_ms = time_ms(plain, device=device, repeat=repeat)
    # The prefix's split count by hand (the plan's choice is ``shared_splits``).
    sweep = {n: time_ms(lambda n=n: grouped(n), device=device, repeat=repeat)
             for n in (1, 2, 4, 8, 16)}
    shared_ms = time_ms(grouped, device=device, repeat=repeat)
    err = ((out_plain.float() - out_shared.float()).norm()
           / out_plain.float().norm().clamp_min(1e-12)).item()
    return {"batch": bs, "groups": g.count, "shared_tokens": g.max_len,
            "plain_splits": plain_splits, "own_splits": own, "shared_splits": shared,
            "plain_ms": plain_ms, "shared_ms": shared_ms, "shared_ms_by_splits": sweep,
            "speedup": plain_ms / shared_ms if shared_ms == shared_ms else None,
            "kv_mb_plain": case["kv_bytes_plain"] / 1e6,
            "kv_mb_shared": case["kv_bytes_shared"] / 1e6,
            "plain_gb_s": case["kv_bytes_plain"] / plain_ms / 1e6 if plain_ms == plain_ms
            else None,
            "shared_gb_s": case["kv_bytes_shared"] / shared_ms / 1e6 if shared_ms == shared_ms
            else None,
            "relative_error": err}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    args = parser.parse_args(argv)

    import torch

    from aiolm.bench.limits import measure_limits
    from aiolm.bench.results import device_info, versions

    if args.dry_run:
        device, dtype, repeat = torch.device("cpu"), torch.float32, 1
        cases = [("dry", (4, 2, 16), 40, 2, 3, 1)]
    else:
        device, dtype, repeat = torch.device("cuda"), torch.bfloat16, 50
        cases = [
            ("llava-next-7b", (32, 32, 128), 2340, 12, 5, 4),
            ("llava-1.5-7b", (32, 32, 128), 600, 12, 5, 4),
            ("gqa-32x8", (32, 8, 128), 2340, 12, 5, 4),
            ("llava-next-7b-groups-of-16", (32, 32, 128), 2340, 4, 16, 0),
        ]
    results: dict[str, Any] = {"device": device_info(str(device)), "versions": versions(),
                               "dtype": str(dtype)}
    if device.type == "cuda":
        results["limits"] = measure_limits(device, dtype)
    for name, geometry, shared, groups, members, alone in cases:
        case = make_case(geometry=geometry, shared=shared, groups=groups, members=members,
                         alone=alone, device=device, dtype=dtype)
        results[name] = {"geometry": list(geometry), "members": members,
                         **measure(case, device=device, repeat=repeat)}
        print(name, json.dumps(results[name]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
