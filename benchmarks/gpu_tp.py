#!/usr/bin/env python3
"""Tensor-parallel benchmarks (issue 13) for two GPUs (nvidia-h200-x2), in one process.

``python benchmarks/gpu_tp.py --out DIR`` measures, with dummy bfloat16 weights and token ids:

1. limits — each GPU's device-to-device copy bandwidth (bytes read + written), the median of
   CUDA-event timings;
2. llama-3-70b, ``tp_size=2`` — decode at batch 1 (tok/s, and as a fraction of the two-GPU
   roofline: the model's weight bytes / (2 × the measured copy bandwidth), i.e. each GPU
   reading its half of the weights once per token) and throughput on a short workload
   (every request submitted at once);
3. llama-3-8b, ``tp_size=2`` and ``tp_size=1`` — the same two figures, and their ratios.

Every part is failure-isolated (its error is recorded and the script goes on) and
time-boxed (a part past its budget is cancelled and marked), and a watchdog writes what
exists and exits at ``--budget`` seconds (default 450: the whole call within 8 minutes).
Results: ``DIR/gpu_tp.json``, and a short table printed last. ``--dry-run`` runs the same
plumbing on the CPU (gloo, two processes) with tiny configs and counts.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS_FILE = "gpu_tp.json"


def plan_for(dry_run: bool) -> dict[str, Any]:
    """Sizes and per-part budgets (seconds) of a run: the GPU's, or the CPU dry run's."""
    if dry_run:
        return {"device": "cpu", "dtype": "float32", "big": "tiny-llama", "small": "tiny-qwen3",
                "decode_prompt": 16, "decode_new": 16, "requests": 8, "prompt": (8, 24),
                "out": (4, 12), "max_running_requests": 8, "max_total_tokens": 2048,
                "copy_bytes": 1 << 22, "budgets": {"big": 90, "small-tp2": 60, "small-tp1": 45}}
    return {"device": "cuda", "dtype": "bfloat16", "big": "llama-3-70b", "small": "llama-3-8b",
            "decode_prompt": 128, "decode_new": 128, "requests": 64, "prompt": (64, 256),
            "out": (64, 192), "max_running_requests": 64, "max_total_tokens": None,
            "copy_bytes": 1 << 30, "budgets": {"big": 200, "small-tp2": 90, "small-tp1": 80}}


def measure_bandwidth(plan: dict[str, Any], gpus: int) -> dict[str, Any]:
    """Copy bandwidth (bytes read + written per second) of each device."""
    import torch

    out: dict[str, Any] = {}
    devices = [torch.device("cuda", i) for i in range(gpus)] if plan["device"] == "cuda" \
        else [torch.device("cpu")]
    for dev in devices:
        src = torch.randn(plan["copy_bytes"] // 4, device=dev)
        if dev.type == "cuda":
            src = src.to(torch.bfloat16)
        dst = torch.empty_like(src)
        times = []
        for i in range(23):
            if dev.type == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                dst.copy_(src)
                end.record()
                end.synchronize()
                seconds = start.elapsed_time(end) / 1e3
            else:
                t0 = time.perf_counter()
                dst.copy_(src)
                seconds = time.perf_counter() - t0
            if i >= 3:
                times.append(seconds)
        moved = 2 * src.numel() * src.element_size()
        out[str(dev)] = {"bytes": moved, "seconds": statistics.median(times),
                         "bandwidth_Bps": moved / statistics.median(times)}
    out["bandwidth_Bps"] = min(v["bandwidth_Bps"] for v in out.values())
    return out


def weight_bytes(model: str, dtype: str) -> int:
    """Bytes a decode step reads from the weights: every parameter but the embedding table
    (one row of it), counted on the meta device."""
    import torch

    from aiolm.engine.model_config import ModelConfig
    from aiolm.engine.models import model_class

    config = ModelConfig.named(model)
    with torch.device("meta"):
        module = model_class(config.architecture)(config)
    params = sum(p.numel() for p in module.parameters())
    embed = module.model.embed_tokens.weight.numel()
    return (params - embed) * torch.empty((), dtype=getattr(torch, dtype)).element_size()


async def engine_part(model: str, tp_size: int, plan: dict[str, Any]) -> dict[str, Any]:
    """Start an engine, then decode at batch 1 and run the throughput workload."""
    import anyio

    import aiolm

    record: dict[str, Any] = {"model": model, "tp_size": tp_size}
    rng = random.Random(tp_size * 1000 + len(model))
    vocab = 500 if plan["device"] == "cpu" else 32000

    def ids(n: int) -> list[int]:
        return [rng.randrange(10, vocab) for _ in range(n)]

    t0 = time.perf_counter()
    engine = aiolm.Engine(model, load_format="dummy", device=plan["device"], dtype=plan["dtype"],
                          tp_size=tp_size, max_running_requests=plan["max_running_requests"],
                          max_total_tokens=plan["max_total_tokens"],
                          cuda_graphs=plan["device"] == "cuda")
    async with engine:
        record["start_s"] = time.perf_counter() - t0
        await engine.generate(input_ids=ids(32), max_tokens=8, ignore_eos=True)  # warm-up
        tokens, first = 0, None
        t0 = time.perf_counter()
        async with engine.stream(input_ids=ids(plan["decode_prompt"]),
                                 max_tokens=plan["decode_new"], ignore_eos=True,
                                 temperature=0.0) as chunks:
            async for chunk in chunks:
                if chunk.token_ids and first is None:
                    first = time.perf_counter()
                tokens += len(chunk.token_ids)
        t1 = time.perf_counter()
        record["decode_bs1"] = {"new_tokens": tokens, "seconds": t1 - t0,
                                "tok_s": tokens / (t1 - t0),
                                "decode_tok_s": (tokens - 1) / (t1 - first)}
        requests = [(ids(rng.randint(*plan["prompt"])), rng.randint(*plan["out"]))
                    for _ in range(plan["requests"])]
        short: list[int] = []

        async def one(prompt: list[int], n: int) -> None:
            done = await engine.generate(input_ids=prompt, max_tokens=n, ignore_eos=True,
                                         temperature=0.0)
            if len(done.token_ids) != n:
                short.append(n)

        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for prompt, n in requests:
                tg.start_soon(one, prompt, n)
        seconds = time.perf_counter() - t0
        if short:
            raise RuntimeError(f"{len(short)} requests produced fewer tokens than asked")
        out = sum(n for _, n in requests)
        record["throughput"] = {"requests": len(requests), "seconds": seconds,
                                "output_tokens": out, "out_tok_s": out / seconds,
                                "prompt_tokens": sum(len(p) for p, _ in requests)}
    return record


def run_part(name: str, results: dict[str, Any], budget: float, fn: Any) -> None:
    """Run ``fn`` (an async callable) within ``budget`` seconds; record its result, its
    error or its time-out under ``results["parts"][name]``."""
    import anyio

    record: dict[str, Any] = {"budget_s": budget}
    results["parts"][name] = record
    started = time.perf_counter()

    async def bounded() -> Any:
        with anyio.move_on_after(budget) as scope:
            return await fn()
        if scope.cancelled_caught:
            raise TimeoutError(f"{name}: past its budget of {budget:g} s")
        return None

    try:
        record.update(status="ok", result=anyio.run(bounded))
    except Exception as exc:  # recorded; the next part runs
        record.update(status="error", error=f"{type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc()[-3000:])
    record["seconds"] = time.perf_counter() - started
    print(f"[{name}] {record['status']} in {record['seconds']:.1f} s", flush=True)


def figures(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's figures from the parts: fractions of the two-GPU roofline, tp 2 vs 1."""
    parts = results["parts"]

    def get(name: str, *keys: str) -> Any:
        value: Any = parts.get(name, {}).get("result")
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    bandwidth = get("limits", "bandwidth_Bps")
    out: dict[str, Any] = {}
    big_bytes = results["plan"]["weight_bytes"]["big"]
    roofline = 2 * bandwidth / big_bytes if bandwidth else None
    bs1 = get("big", "decode_bs1", "tok_s")
    out["big_decode_bs1_tok_s"] = bs1
    out["big_roofline_tok_s"] = roofline
    out["big_decode_bs1_of_roofline"] = bs1 / roofline if bs1 and roofline else None
    out["big_decode_only_of_roofline"] = (get("big", "decode_bs1", "decode_tok_s") / roofline
                                          if roofline and get("big", "decode_bs1") else None)
    out["big_throughput_out_tok_s"] = get("big", "throughput", "out_tok_s")
    for fig, keys in (("decode_bs1", ("decode_bs1", "tok_s")),
                      ("throughput", ("throughput", "out_tok_s"))):
        two, one = get("small-tp2", *keys), get("small-tp1", *keys)
        out[f"small_{fig}_tp2"], out[f"small_{fig}_tp1"] = two, one
        out[f"small_{fig}_tp2_over_tp1"] = two / one if two and one else None
    small_bytes = results["plan"]["weight_bytes"]["small"]
    if bandwidth and get("small-tp2", "decode_bs1"):
        out["small_tp2_decode_bs1_of_roofline"] = (get("small-tp2", "decode_bs1", "tok_s")
                                                   / (2 * bandwidth / small_bytes))
    return out


def save(out: Path, results: dict[str, Any]) -> None:
    results["figures"] = figures(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=2, default=str))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the results directory")
    parser.add_argument("--dry-run", action="store_true",
                        help="the CPU (gloo, two processes) with tiny configs and counts")
    parser.add_argument("--budget", type=float, default=450.0,
                        help="seconds before the watchdog writes what exists and exits")
    parser.add_argument("--skip", action="append", default=[],
                        choices=["big", "small-tp2", "small-tp1"], help="a part not to run")
    args = parser.parse_args(argv)
    import torch

    plan = plan_for(args.dry_run)
    gpus = torch.cuda.device_count() if plan["device"] == "cuda" else 0
    if plan["device"] == "cuda" and gpus < 2:
        parser.error(f"needs two GPUs (found {gpus}); use --dry-run on the CPU")
    plan["weight_bytes"] = {"big": weight_bytes(plan["big"], plan["dtype"]),
                            "small": weight_bytes(plan["small"], plan["dtype"])}
    results: dict[str, Any] = {
        "plan": plan, "parts": {}, "torch": torch.__version__,
        "devices": [torch.cuda.get_device_name(i) for i in range(gpus)],
    }
    deadline = time.monotonic() + args.budget

    def watchdog() -> None:
        time.sleep(args.budget)
        results["watchdog"] = f"stopped at --budget {args.budget:g} s"
        save(args.out, results)
        print(f"watchdog: past {args.budget:g} s; results so far in {args.out}", flush=True)
        os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()

    async def limits() -> dict[str, Any]:
        return measure_bandwidth(plan, gpus)

    run_part("limits", results, 60, limits)
    save(args.out, results)
    for name, model, tp in (("big", plan["big"], 2), ("small-tp2", plan["small"], 2),
                            ("small-tp1", plan["small"], 1)):
        if name in args.skip:
            continue
        budget = min(plan["budgets"][name], deadline - time.monotonic() - 15)
        if budget < 20:
            results["parts"][name] = {"status": "skipped", "error": "no time left"}
            continue
        run_part(name, results, budget,
                 lambda model=model, tp=tp: engine_part(model, tp, plan))
        save(args.out, results)
        gc.collect()  # the closed engine's cycles hold its weights and KV pool
        if plan["device"] == "cuda":
            torch.cuda.empty_cache()
            results["parts"][name]["gpu_memory_after_close"] = [
                torch.cuda.memory_allocated(i) for i in range(gpus)]
    save(args.out, results)
    print(json.dumps(results["figures"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
