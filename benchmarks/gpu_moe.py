#!/usr/bin/env python3
"""Mixture-of-Experts figures on one GPU: Mixtral-8x7B shape, dummy bf16 weights.

``python benchmarks/gpu_moe.py --out moe.json`` (about 5 minutes on an H200; every part
time-boxed, the JSON rewritten after each part so a killed run keeps what it measured):

1. limits — device-to-device copy bandwidth and the bf16 matmul rate
   (:func:`aiolm.bench.limits.measure_limits`);
2. decode-bs1 — ``aiolm.Engine`` streaming one request (prompt 256, 128 new tokens), best
   of two; its fraction of the MoE roofline: bandwidth / (the bytes a step reads: the
   weights but the embedding table, with only the ``top_k`` experts of each layer a token
   uses — :func:`aiolm.bench.limits.weight_figures` — plus the KV cache at the mean context);
3. throughput — 200 requests, prompts U[256, 1024] and outputs U[64, 256] random token ids,
   all submitted at once (greedy, ``ignore_eos``);
4. peer — transformers' ``MixtralForCausalLM`` sharing the very weight tensors
   (:func:`aiolm.bench.models.to_transformers`): left-padded static batches of ``generate``
   over the same requests (benchmarks/hf_peer.py), as many batches as its budget allows,
   and batch-1 decode;
5. kernels — one layer's experts, the fused Triton path against the plain torch loop at a
   few token counts (CUDA-event medians).

``--dry-run`` runs the same plumbing on the CPU with ``tiny-mixtral`` and tiny counts (the
fused kernels under Triton's interpreter).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for _path in (str(ROOT), str(ROOT / "benchmarks")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from gpu_workloads import time_limit  # noqa: E402

GOALS = {"decode_bs1_of_roofline": 0.75, "throughput_x_peer": 3.0}


class Plan:
    """Sizes and budgets of a run (the GPU's or the CPU dry run's)."""

    def __init__(self, dry_run: bool) -> None:
        self.dry_run = dry_run
        self.device = "cpu" if dry_run else "cuda"
        self.model = "tiny-mixtral" if dry_run else "mixtral-8x7b"
        self.dtype = "float32" if dry_run else "bfloat16"
        self.decode_prompt = 16 if dry_run else 256
        self.decode_new = 8 if dry_run else 128
        self.requests = 6 if dry_run else 200
        self.prompt_range = (8, 32) if dry_run else (256, 1024)
        self.output_range = (4, 8) if dry_run else (64, 256)
        self.max_total_tokens = 4096 if dry_run else 131072
        self.hf_batch = 2 if dry_run else 16
        self.kernel_tokens = (1, 8) if dry_run else (1, 8, 64, 512, 4096)
        self.budgets = ({"load": 60, "limits": 30, "engine_start": 60, "warm_up": 60,
                         "decode_bs1": 60, "throughput": 60, "peer": 60, "kernels": 60}
                        if dry_run else
                        {"load": 60, "limits": 20, "engine_start": 90, "warm_up": 120,
                         "decode_bs1": 30, "throughput": 75, "peer": 150, "kernels": 30})


class Run:
    """The results, written to ``out`` after every part; a part's error is recorded."""

    def __init__(self, out: Path, plan: Plan) -> None:
        self.out = out
        self.plan = plan
        self.results: dict[str, Any] = {
            "plan": {k: v for k, v in vars(plan).items()}, "parts": {},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def part(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` and record its result or error; returns the result (None on error)."""
        print(f"-- {name} ({self.plan.budgets.get(name, 0)} s)", flush=True)
        t0 = time.perf_counter()
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - record, go on to the next part
            return self._failed(name, exc, t0)
        return self._done(name, result, t0)

    async def async_part(self, name: str, fn: Callable[[], Any]) -> Any:
        """:meth:`part` for a coroutine function, cancelled at its budget."""
        import anyio

        print(f"-- {name} ({self.plan.budgets[name]} s)", flush=True)
        t0 = time.perf_counter()
        try:
            with anyio.fail_after(self.plan.budgets[name]):
                result = await fn()
        except Exception as exc:  # noqa: BLE001 - record, go on to the next part
            return self._failed(name, exc, t0)
        return self._done(name, result, t0)

    def _done(self, name: str, result: Any, t0: float) -> Any:
        self.results["parts"][name] = {"result": result, "seconds": time.perf_counter() - t0}
        self.save()
        return result

    def _failed(self, name: str, exc: Exception, t0: float) -> None:
        self.results["parts"][name] = {
            "error": f"{type(exc).__name__}: {exc}"[:2000],
            "traceback": traceback.format_exc()[-4000:], "seconds": time.perf_counter() - t0}
        print(f"!! {name}: {type(exc).__name__}: {exc}", flush=True)
        self.save()

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        tmp.replace(self.out)


class Workload:
    """Random token ids: the decode prompt and the throughput requests."""

    def __init__(self, plan: Plan, vocab: int) -> None:
        rnd = random.Random(0)
        self.decode_prompts = [[rnd.randrange(3, vocab) for _ in range(plan.decode_prompt)]
                               for _ in range(2)]
        self.prompts = [[rnd.randrange(3, vocab) for _ in range(rnd.randint(*plan.prompt_range))]
                        for _ in range(plan.requests)]
        self.outputs = [rnd.randint(*plan.output_range) for _ in range(plan.requests)]


def _sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- engine


async def engine_figures(loaded: Any, plan: Plan, data: Workload, run: Run) -> None:
    """decode-bs1 and throughput on one engine (its CUDA graphs captured once)."""
    import anyio

    from aiolm.backends.engine import Engine

    with anyio.fail_after(plan.budgets["engine_start"]):
        engine = Engine(loaded, device=plan.device, cuda_graphs=plan.device == "cuda",
                        max_total_tokens=plan.max_total_tokens)
        await engine.__aenter__()
    try:
        # Warm-up: every kernel compiled at decode and prefill sizes before timing.
        await run.async_part("warm_up", lambda: _warm_up(engine, data))
        await run.async_part("decode_bs1", lambda: _decode_bs1(engine, plan, data))
        await run.async_part("throughput", lambda: _throughput(engine, data))
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(60):
            await engine.__aexit__(None, None, None)


async def _warm_up(engine: Any, data: Workload) -> dict[str, Any]:
    import anyio

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for prompt in data.prompts[:16]:
            tg.start_soon(lambda p=prompt: engine.generate(
                input_ids=p, max_tokens=4, ignore_eos=True, temperature=0.0))
    await engine.generate(input_ids=data.decode_prompts[1][:32], max_tokens=8,
                          ignore_eos=True, temperature=0.0)
    return {"seconds": time.perf_counter() - t0}


async def _decode_bs1(engine: Any, plan: Plan, data: Workload) -> dict[str, Any]:
    runs = []
    for prompt in data.decode_prompts:
        t0 = time.perf_counter()
        first = None
        count = 0
        async with engine.stream(input_ids=prompt, max_tokens=plan.decode_new,
                                 ignore_eos=True, temperature=0.0) as chunks:
            async for chunk in chunks:
                if chunk.token_ids and first is None:
                    first = time.perf_counter()
                count += len(chunk.token_ids)
        t1 = time.perf_counter()
        runs.append({"tok_s": count / (t1 - t0), "ttft_s": first - t0,
                     "decode_tok_s": (count - 1) / (t1 - first), "new_tokens": count})
    best = max(runs, key=lambda r: r["tok_s"])
    return dict(best, runs=[round(r["tok_s"], 2) for r in runs])


async def _throughput(engine: Any, data: Workload) -> dict[str, Any]:
    import anyio

    short: list[int] = []

    async def one(i: int) -> None:
        done = await engine.generate(input_ids=data.prompts[i], max_tokens=data.outputs[i],
                                     ignore_eos=True, temperature=0.0)
        if len(done.token_ids) != data.outputs[i]:
            short.append(i)

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(len(data.prompts)):
            tg.start_soon(one, i)
    seconds = time.perf_counter() - t0
    if short:
        raise RuntimeError(f"{len(short)} requests produced fewer tokens than asked")
    out_tokens = sum(data.outputs)
    in_tokens = sum(len(p) for p in data.prompts)
    return {"requests": len(data.prompts), "seconds": seconds, "out_tok_s": out_tokens / seconds,
            "total_tok_s": (out_tokens + in_tokens) / seconds, "input_tokens": in_tokens,
            "output_tokens": out_tokens}


def roofline(loaded: Any, limits: dict[str, Any], decode: dict[str, Any],
             plan: Plan) -> dict[str, Any]:
    """The decode-bs1 roofline: bytes one step reads (touched experts only) over bandwidth."""
    from aiolm.bench.limits import weight_figures
    from aiolm.cache.pool import kv_bytes_per_token

    model, cfg = loaded.model, loaded.model_config
    figures = weight_figures(model, decode_batch_size=1)
    embedding = model.model.embed_tokens.weight
    # A decode step reads one row of the embedding table, not all of it.
    weights_per_step = figures["decode_weight_bytes"] - embedding.numel() * embedding.element_size()
    kv = kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.torch_dtype)
    mean_context = plan.decode_prompt + decode["new_tokens"] / 2
    step_bytes = weights_per_step + mean_context * kv
    bandwidth = limits["copy_bandwidth_gbps"] * 1e9
    limit = bandwidth / step_bytes
    return {**figures, "weight_bytes_per_step": weights_per_step, "kv_bytes_per_token": kv,
            "step_bytes": step_bytes, "roofline_tok_s": limit,
            "of_roofline": decode["tok_s"] / limit,
            "decode_only_of_roofline": decode["decode_tok_s"] / limit,
            "dense_roofline_tok_s": bandwidth / (figures["weight_bytes"]
                                                 - embedding.numel() * embedding.element_size()
                                                 + mean_context * kv)}


# ------------------------------------------------------------------------- the peer


def peer(loaded: Any, plan: Plan, data: Workload) -> dict[str, Any]:
    """transformers on the same weight tensors: static batches (as many as the budget
    allows) and batch-1 decode."""
    import hf_peer

    from aiolm.bench.models import to_transformers

    deadline = time.monotonic() + plan.budgets["peer"]
    model = to_transformers(loaded)
    out: dict[str, Any] = {"experts_implementation": str(
        getattr(model.config, "_experts_implementation", "?"))}
    with time_limit(max(deadline - time.monotonic(), 1.0)):  # warm-up, not timed
        hf_peer.static_batch(model, [p[:16] for p in data.prompts[:2]], [2, 2], batch_size=2)
    # A probe first: the first batch's prompts decoding 8 and then 24 tokens gives the
    # seconds of its prefill and of one decode step, so a run whose whole batches do not
    # fit the budget still has a figure (marked as an estimate).
    batch = plan.hf_batch
    probe = {}
    for new in (8, 24):
        with time_limit(max(deadline - time.monotonic(), 1.0)):
            probe[new] = hf_peer.static_batch(model, data.prompts[:batch], [new] * batch,
                                              batch_size=batch)["seconds"]
    step = (probe[24] - probe[8]) / 16
    prefill = max(probe[8] - 8 * step, 0.0)
    total_s = sum(prefill + step * max(data.outputs[i:i + batch])
                  for i in range(0, len(data.prompts), batch))
    out["probe"] = {"batch_size": batch, "seconds": probe, "decode_step_s": step,
                    "prefill_s": prefill,
                    "estimated_out_tok_s": sum(data.outputs) / total_s}
    batches = []
    for start in range(0, len(data.prompts), batch):
        left = deadline - time.monotonic()
        expected = prefill + step * max(data.outputs[start:start + batch])
        if left < 1.3 * expected:
            break
        with time_limit(max(left, 1.0)):
            batches.append(hf_peer.static_batch(model, data.prompts[start:start + batch],
                                                data.outputs[start:start + batch],
                                                batch_size=batch))
    if batches:
        seconds = sum(b["seconds"] for b in batches)
        useful = sum(b["out_tok_s"] * b["seconds"] for b in batches)
        out["static_batch"] = {"out_tok_s": useful / seconds, "seconds": seconds,
                               "requests": sum(b["requests"] for b in batches),
                               "batch_size": batch, "measured": True}
    else:
        out["static_batch"] = {"out_tok_s": out["probe"]["estimated_out_tok_s"],
                               "batch_size": batch, "measured": False,
                               "note": "no whole batch fitted the budget: the probe's estimate"}
    left = deadline - time.monotonic()
    if left > 10 or plan.dry_run:
        with time_limit(max(left, 5.0)):
            bs1 = hf_peer.decode_bs1(model, data.decode_prompts[0], min(plan.decode_new, 64),
                                     compiled=False, static=False)
        out["decode_bs1"] = {k: v for k, v in bs1.items() if k != "tokens"}
    del model
    return out


# ---------------------------------------------------------------------------- kernels


def kernels(loaded: Any, plan: Plan) -> dict[str, Any]:
    """Layer 0's experts: the fused path vs the torch loop, median milliseconds."""
    import torch

    from aiolm.engine.layers.fused_moe import fused_experts, route, torch_experts

    block = loaded.model.model.layers[0].mlp
    w13, w2 = block.experts.gate_up_proj, block.experts.down_proj
    device = w13.device
    deadline = time.monotonic() + plan.budgets["kernels"]
    out = {}
    for tokens in plan.kernel_tokens:
        if time.monotonic() > deadline:
            out[str(tokens)] = {"status": "skipped", "reason": "budget spent"}
            continue
        gen = torch.Generator(device=device).manual_seed(tokens)
        x = torch.randn(tokens, w13.shape[2], device=device, generator=gen).to(w13.dtype)
        weights, ids = route(block.gate(x), block.top_k, block.renormalize)
        row = {}
        for name, fn in (("fused_ms", fused_experts), ("torch_ms", torch_experts)):
            args = (x, w13, w2, weights, ids)
            row[name] = _median_ms(lambda fn=fn, args=args: fn(*args), device,
                                   repeats=3 if plan.dry_run else 20)
        fused = fused_experts(x, w13, w2, weights, ids).float()
        ref = torch_experts(x, w13, w2, weights, ids).float()
        row["max_abs_diff_over_scale"] = ((fused - ref).abs().max() / ref.abs().max()).item()
        row["speedup"] = row["torch_ms"] / row["fused_ms"]
        out[str(tokens)] = row
    return out


def _median_ms(fn: Callable[[], Any], device: Any, repeats: int) -> float:
    import torch

    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if torch.device(device).type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ------------------------------------------------------------------------------- main


def summary(results: dict[str, Any]) -> dict[str, Any]:
    parts = results["parts"]

    def get(*keys: str) -> Any:
        node: Any = parts
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node

    of_roofline = get("roofline", "result", "of_roofline")
    ours = get("throughput", "result", "out_tok_s")
    theirs = get("peer", "result", "static_batch", "out_tok_s")
    ratio = ours / theirs if ours and theirs else None
    return {
        "decode_bs1_tok_s": get("decode_bs1", "result", "tok_s"),
        "decode_bs1_of_roofline": of_roofline,
        "decode_bs1_goal": GOALS["decode_bs1_of_roofline"],
        "throughput_out_tok_s": ours, "peer_out_tok_s": theirs, "throughput_x_peer": ratio,
        "throughput_goal": GOALS["throughput_x_peer"],
        "meets_goals": {
            "decode_bs1": None if of_roofline is None
            else of_roofline >= GOALS["decode_bs1_of_roofline"],
            "throughput": None if ratio is None else ratio >= GOALS["throughput_x_peer"]},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON results file")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny-mixtral on the CPU (kernels under Triton's interpreter)")
    args = parser.parse_args(argv)
    if args.dry_run:
        # Before triton is first imported: the fused kernels run on CPU tensors.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import anyio
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --dry-run")
    plan = Plan(args.dry_run)
    run = Run(args.out, plan)
    if not args.dry_run:
        run.results["device"] = torch.cuda.get_device_name()

    def load() -> dict[str, Any]:
        from aiolm.bench.models import load_for_bench

        with time_limit(plan.budgets["load"]):
            run.loaded = load_for_bench(plan.model, load_format="dummy", device=plan.device,
                                        dtype=plan.dtype, seed=0)
        _sync(plan.device)
        cfg = run.loaded.model_config
        return {"model": plan.model, "architecture": cfg.architecture,
                "experts": cfg.num_experts, "top_k": cfg.num_experts_per_tok,
                "parameters": sum(p.numel() for p in run.loaded.model.parameters())}

    if run.part("load", load) is None:
        return 1
    loaded = run.loaded
    data = Workload(plan, loaded.model_config.vocab_size)

    def limits() -> dict[str, Any]:
        from aiolm.bench.limits import measure_limits

        with time_limit(plan.budgets["limits"]):
            return measure_limits(loaded.device, loaded.model_config.torch_dtype)

    measured = run.part("limits", limits)
    run.part("engine", lambda: anyio.run(engine_figures, loaded, plan, data, run))
    decode = run.results["parts"].get("decode_bs1", {}).get("result")
    if measured and decode:
        run.part("roofline", lambda: roofline(loaded, measured, decode, plan))
    gc.collect()
    if plan.device == "cuda":
        torch.cuda.empty_cache()
    run.part("peer", lambda: peer(loaded, plan, data))
    gc.collect()
    run.part("kernels", lambda: kernels(loaded, plan))
    run.results["summary"] = summary(run.results)
    run.save()
    print(json.dumps(run.results["summary"], indent=1), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
