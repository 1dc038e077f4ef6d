"""Where a decode step's time goes on the GPU: kernels, gaps between them, host work.

``python benchmarks/gpu_profile.py --out DIR [--dry-run]`` loads the Llama-3-8B shape with
dummy bf16 weights (``--dry-run``: tiny-llama on the CPU) and writes ``DIR/profile.json``:

1. ``linear``: each projection of a layer (and the LM head) alone at one token — the time
   of ``F.linear`` on the device and the bandwidth it reaches as a fraction of the copy
   bandwidth (how far the GEMV kernels are from the roofline before anything else);
2. ``decode``: the engine decoding with ``torch.profiler`` on, at batch 1 and at batch 64:
   per step, the wall time, the GPU's busy time (the union of its kernels' intervals), the
   idle time between kernels, the kernel count and the kernels ranked by time;
3. ``host``: the engine thread's own Python time per step (``cProfile`` around each
   iteration of the loop), ranked by function.

``--json-decode`` profiles ``aiolm bench json-decode`` instead (its full shape: 256 programs;
``--dry-run``: the tiny shape), once with jump-forward on and once off: the wall time and
passes, the GPU's busy and idle time over the run, the engine thread's host time per pass
by function, and every thread's (Python 3.12's cProfile sees them all) by function.

``--image-qa`` profiles ``aiolm bench image-qa`` on ``llava-next-7b`` (``--model``: another
named multimodal config, e.g. ``llava-1.5-7b``, ``qwen2.5-vl-7b``; dummy weights;
``--dry-run``: the tiny shape on tiny-llava-next), radix cache on and off: the wall time, each
forward pass's kind and size with its device time (CUDA events around the model's forward,
read after the run: no synchronisation added), summed by kind, and the kernels ranked by time.

``--throughput`` profiles the suite's throughput workload (500 requests, prompts U[256,
1024], outputs U[64, 256], on the Llama-3-8B shape; ``--dry-run``: the tiny plan): the same
pass timeline — how much of the run is prefill, decode and mixed passes — and the kernels.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import json
import pstats
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_workloads as wl  # noqa: E402

from aiolm.bench.limits import median_seconds  # noqa: E402


def linear_figures(loaded: Any, bandwidth: float) -> list[dict[str, Any]]:
    """Each projection of layer 0 (and the LM head) at one token, alone on the device."""
    import torch
    import torch.nn.functional as F

    model = loaded.model
    layer = model.model.layers[0]
    parts = {"qkv_proj": layer.self_attn.qkv_proj, "o_proj": layer.self_attn.o_proj,
             "gate_up_proj": layer.mlp.gate_up_proj, "down_proj": layer.mlp.down_proj,
             "lm_head": model.lm_head}
    out = []
    for name, module in parts.items():
        weight = module.weight
        x = torch.randn(1, weight.shape[1], device=weight.device, dtype=weight.dtype)
        seconds = median_seconds(lambda w=weight, x=x: F.linear(x, w), weight.device,
                                 warmup=5, repeats=50)
        nbytes = weight.numel() * weight.element_size()
        out.append({"name": name, "shape": list(weight.shape), "us": seconds * 1e6,
                    "GBps": nbytes / seconds / 1e9, "of_bandwidth": nbytes / seconds / bandwidth})
    return out


def _kernel_table(prof: Any, steps: int) -> dict[str, Any]:
    """Kernel time by name per step, and the GPU's busy / idle time in the window."""
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    by_name: dict[str, list[float]] = defaultdict(list)
    spans = []
    for e in events:
        start = e.time_range.start
        end = e.time_range.end
        by_name[e.name].append(end - start)
        spans.append((start, end))
    spans.sort()
    busy = 0.0
    cur_start = cur_end = None
    for s, e in spans:
        if cur_end is None or s > cur_end:
            if cur_end is not None:
                busy += cur_end - cur_start
            cur_start, cur_end = s, e
        else:
            cur_end = max(cur_end, e)
    if cur_end is not None:
        busy += cur_end - cur_start
    window = (spans[-1][1] - spans[0][0]) if spans else 0.0
    ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))
    return {
        "steps": steps,
        "kernels_per_step": len(events) / max(steps, 1),
        "gpu_window_us_per_step": window / max(steps, 1),
        "gpu_busy_us_per_step": busy / max(steps, 1),
        "gpu_idle_us_per_step": (window - busy) / max(steps, 1),
        "kernels": [{"name": name[:120], "calls_per_step": len(ts) / max(steps, 1),
                     "us_per_step": sum(ts) / max(steps, 1), "us_each": statistics.median(ts)}
                    for name, ts in ranked[:30]],
    }


async def _decode_profile(engine: Any, prompts: list[list[int]], new: int,
                          device: str) -> dict[str, Any]:
    import anyio
    import torch
    from torch.profiler import ProfilerActivity, profile

    async def run_all() -> None:
        async with anyio.create_task_group() as tg:
            for p in prompts:
                tg.start_soon(lambda p=p: engine.generate(input_ids=p, max_tokens=new,
                                                          ignore_eos=True, temperature=0.0))

    await run_all()  # warm: graphs, kernels
    core = engine._core  # noqa: SLF001 - the engine's loop object (profiling only)
    passes0 = core.runner.forward_passes
    t0 = time.perf_counter()
    await run_all()
    wall = time.perf_counter() - t0
    steps = core.runner.forward_passes - passes0
    record: dict[str, Any] = {"batch": len(prompts), "new_tokens": new, "wall_s": wall,
                              "passes": steps, "wall_us_per_pass": wall / steps * 1e6,
                              "tok_s": len(prompts) * new / wall}
    if device == "cuda":
        activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
        passes0 = core.runner.forward_passes
        with profile(activities=activities) as prof:
            await run_all()
            torch.cuda.synchronize()
        record["profile"] = _kernel_table(prof, core.runner.forward_passes - passes0)

    # Host time per iteration of the engine loop, by function.
    passes0 = core.runner.forward_passes
    with _loop_profiled(core) as profiler:
        await run_all()
    passes = core.runner.forward_passes - passes0
    record["host"] = {"note": "cProfile adds overhead: compare rows with each other",
                      **_ranked(profiler, passes)}
    return record


@contextlib.contextmanager
def _loop_profiled(core: Any) -> Iterator[cProfile.Profile]:
    """cProfile around each iteration of the engine loop (on its thread), while inside."""
    profiler = cProfile.Profile()
    original = core._run_once  # noqa: SLF001

    def profiled() -> bool:
        profiler.enable()
        try:
            return original()
        finally:
            profiler.disable()

    core._run_once = profiled  # noqa: SLF001
    try:
        yield profiler
    finally:
        del core._run_once  # the class's method again  # noqa: SLF001


def _ranked(profiler: cProfile.Profile, passes: int, top: int = 25) -> dict[str, Any]:
    stats = pstats.Stats(profiler)
    rows = []
    for (file, line, func), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(file).name}:{line}:{func}", "calls_per_pass": nc / passes,
                     "own_us_per_pass": tt / passes * 1e6, "cum_us_per_pass": ct / passes * 1e6})
    total = sum(r["own_us_per_pass"] for r in rows)
    rows.sort(key=lambda r: -r["own_us_per_pass"])
    return {"own_us_per_pass_total": total, "by_own_time": rows[:top],
            "by_cumulative": sorted(rows, key=lambda r: -r["cum_us_per_pass"])[:top]}


def _batch_runner(engine: Any, program: Any,
                  inputs: list[dict[str, Any]]) -> Callable[[], Awaitable[tuple[float, int]]]:
    """``run()``: the prefix cache emptied, ``program`` over ``inputs`` on ``engine``;
    returns the wall seconds and the forward passes (raises the first program error)."""
    core = engine._core  # noqa: SLF001 - profiling only

    async def run() -> tuple[float, int]:
        await engine.flush_cache()
        passes0 = core.runner.forward_passes
        t0 = time.perf_counter()
        states = await program.run_batch(list(inputs), backend=engine)
        wall = time.perf_counter() - t0
        errors = [st.error for st in states if st.error is not None]
        if errors:
            raise errors[0]
        return wall, core.runner.forward_passes - passes0

    return run


async def _gpu_kernels(run: Callable[[], Awaitable[tuple[float, int]]], *,
                       top: int) -> dict[str, Any]:
    """One ``run()`` under torch.profiler: the GPU's busy and idle time per pass and the
    ``top`` kernels by time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _, passes = await run()
        torch.cuda.synchronize()
    table = _kernel_table(prof, passes)
    return {**{k: v for k, v in table.items() if k != "kernels"},
            "kernels": table["kernels"][:top]}


async def _json_decode_profile(loaded: Any, plan: Any, jump_forward: bool,
                               backend: str) -> dict[str, Any]:
    """One variant of the json-decode workload: timed, then under each profiler in turn."""
    import aiolm
    from aiolm.bench import json_decode

    size = "tiny" if plan.dry_run else "full"
    inputs = json_decode.make_inputs(size, 0)
    warm = json_decode.make_inputs("tiny", 1)
    program = json_decode.extract_record
    async with aiolm.Engine(loaded, jump_forward=jump_forward,
                            **wl.engine_options(plan, backend)) as engine:
        core = engine._core  # noqa: SLF001 - profiling only
        run = _batch_runner(engine, program, inputs)
        await program.run_batch(warm, backend=engine)
        await run()  # warm: graphs, kernels, the schemas' grammars
        wall, passes = await run()
        record: dict[str, Any] = {"jump_forward": jump_forward, "programs": len(inputs),
                                  "wall_s": wall, "passes": passes,
                                  "programs_per_s": len(inputs) / wall,
                                  "wall_ms_per_pass": wall / passes * 1e3}
        if plan.device == "cuda":
            record["gpu"] = await _gpu_kernels(run, top=15)

        with _loop_profiled(core) as engine_prof:
            _, prof_passes = await run()
        record["engine_thread"] = _ranked(engine_prof, prof_passes)
        # NOTE: from Python 3.12 cProfile sees every thread (sys.monitoring), the engine's too.
        every_prof = cProfile.Profile()
        every_prof.enable()
        try:
            _, prof_passes = await run()
        finally:
            every_prof.disable()
        record["all_threads"] = _ranked(every_prof, prof_passes)
        core = None  # the engine's objects go with the engine
    return record


class _PassTimeline:
    """Each forward pass of ``runner`` while inside: its kind, size and device time."""

    def __init__(self, runner: Any, cuda: bool) -> None:
        self.runner = runner
        self.cuda = cuda
        self.passes: list[dict[str, Any]] = []
        self._events: list[tuple[Any, Any]] = []

    def __enter__(self) -> _PassTimeline:
        import torch

        original = self.runner.forward

        def forward(fb: Any) -> Any:
            graphs = self.runner.graph_runner
            if fb.is_decode:
                kind = "decode"
                graphed = graphs is not None and graphs.can_run(fb)
            else:
                kind = "extend-images" if fb.mm_embeds is not None else "extend"
                graphed = graphs is not None and graphs.can_run_extend(fb)
            riders = sum(1 for n in fb.extend_seq_lens_cpu if n == 1)
            self.passes.append({
                "kind": kind, "graphed": bool(graphed), "requests": fb.batch_size,
                "tokens": fb.num_tokens, "riders": riders,
                "kv_tokens": sum(fb.seq_lens_cpu),
                "groups": fb.prefix_groups.count if fb.prefix_groups is not None else 0})
            if not self.cuda:
                t0 = time.perf_counter()
                out = original(fb)
                self.passes[-1]["ms"] = (time.perf_counter() - t0) * 1e3
                return out
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            out = original(fb)
            end.record()
            self._events.append((start, end))
            return out

        self.runner.forward = forward
        return self

    def __exit__(self, *exc_info: object) -> None:
        del self.runner.forward  # the class's method again
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            for rec, (start, end) in zip(self.passes, self._events, strict=True):
                rec["ms"] = start.elapsed_time(end)

    def summary(self) -> dict[str, Any]:
        by_kind: dict[str, dict[str, float]] = {}
        for rec in self.passes:
            key = rec["kind"] + (" (graph)" if rec["graphed"] else "")
            row = by_kind.setdefault(key, {"passes": 0, "ms": 0.0, "tokens": 0, "requests": 0,
                                           "riders": 0, "kv_tokens": 0})
            row["passes"] += 1
            for k in ("ms", "tokens", "requests", "riders", "kv_tokens"):
                row[k] += rec[k]
        for row in by_kind.values():
            row["ms_per_pass"] = row["ms"] / row["passes"]
        return {"device_ms_total": sum(r["ms"] for r in self.passes), "by_kind": by_kind}


async def _image_qa_profile(loaded: Any, plan: Any, radix: bool) -> dict[str, Any]:
    """The image-qa workload once timed, once with a pass timeline, once under torch.profiler."""
    import aiolm
    from aiolm.bench import image_qa
    from aiolm.bench.vision_timer import VisionTimer

    size = "tiny" if plan.dry_run else "full"
    inputs = image_qa.make_inputs(size, 0)
    warm = image_qa.make_inputs("tiny", 1)
    program = image_qa.answer_question
    async with aiolm.Engine(loaded, enable_radix_cache=radix, seed=0) as engine:
        core = engine._core  # noqa: SLF001 - profiling only
        run = _batch_runner(engine, program, inputs)
        await program.run_batch(warm, backend=engine)
        await run()  # warm: graphs, kernels
        with VisionTimer(engine) as vision:
            wall, passes = await run()
        record: dict[str, Any] = {"radix": radix, "programs": len(inputs), "wall_s": wall,
                                  "passes": passes, "programs_per_s": len(inputs) / wall,
                                  **vision.figures()}
        with _PassTimeline(core.runner, plan.device == "cuda") as timeline:
            record["timeline_wall_s"], _ = await run()
        record["passes_by_kind"] = timeline.summary()
        record["timeline"] = timeline.passes
        if plan.device == "cuda":
            record["gpu"] = await _gpu_kernels(run, top=25)
        core = None  # the engine's objects go with the engine
    return record


async def image_qa_main(args: argparse.Namespace) -> dict[str, Any]:
    from aiolm.bench.models import load_for_bench

    plan = wl.Plan.make(dry_run=args.dry_run)
    model = "tiny-llava-next" if plan.dry_run else (args.model or "llava-next-7b")
    out: dict[str, Any] = {"plan": {"model": model, "workload": "image-qa"}}
    if not plan.dry_run:
        import torch

        out["device"] = torch.cuda.get_device_name()
        out["kind"] = args.kind or wl.kind_from_device(out["device"])
    loaded = load_for_bench(out["plan"]["model"], load_format="dummy")
    for radix in (True, False):
        key = "radix_on" if radix else "radix_off"
        out[key] = await _image_qa_profile(loaded, plan, radix)
        if not plan.dry_run:
            gc.collect()
            wl.empty_device_cache()
    return out


async def throughput_main(args: argparse.Namespace) -> dict[str, Any]:
    """The throughput workload once timed, once with the pass timeline, once profiled."""
    import aiolm

    plan = wl.Plan.make(dry_run=args.dry_run, backends=args.backend)
    backend = plan.backends[0]
    out: dict[str, Any] = {"plan": {"model": plan.model, "dtype": plan.dtype,
                                    "backend": backend, "workload": "throughput",
                                    "requests": plan.throughput_requests}}
    if not plan.dry_run:
        import torch

        out["device"] = torch.cuda.get_device_name()
        out["kind"] = args.kind or wl.kind_from_device(out["device"])
    loaded = wl.load_dummy(plan)
    data = wl.Workloads(plan)
    requests = data.throughput
    output_tokens = sum(n for _, n in requests)
    async with aiolm.Engine(loaded, **wl.engine_options(plan, backend)) as engine:
        runner = engine._core.runner  # noqa: SLF001 - profiling only

        async def run() -> tuple[float, int]:
            await engine.flush_cache()
            passes0 = runner.forward_passes
            seconds = await wl._generate_all(engine, requests)  # noqa: SLF001
            return seconds, runner.forward_passes - passes0

        await wl._warm_up(engine, data)  # noqa: SLF001
        seconds, passes = await run()
        out["wall_s"], out["passes"] = seconds, passes
        out["out_tok_s"] = output_tokens / seconds
        with _PassTimeline(runner, plan.device == "cuda") as timeline:
            out["timeline_wall_s"], _ = await run()
        out["passes_by_kind"] = timeline.summary()
        out["timeline"] = timeline.passes
        if plan.device == "cuda":
            out["gpu"] = await _gpu_kernels(run, top=25)
    return out


async def json_decode_main(args: argparse.Namespace) -> dict[str, Any]:
    from aiolm.bench.models import load_for_bench

    plan = wl.Plan.make(dry_run=args.dry_run, backends=args.backend)
    out: dict[str, Any] = {"plan": {"model": plan.model, "dtype": plan.dtype,
                                    "backend": plan.backends[0], "workload": "json-decode"}}
    if not plan.dry_run:
        import torch

        out["device"] = torch.cuda.get_device_name()
        out["kind"] = args.kind or wl.kind_from_device(out["device"])
    loaded = load_for_bench(None if plan.dry_run else "llama-3-8b",
                            load_format="auto" if plan.dry_run else "dummy")
    for jump_forward in (True, False):
        key = "jump_forward_on" if jump_forward else "jump_forward_off"
        out[key] = await _json_decode_profile(loaded, plan, jump_forward, plan.backends[0])
        if not plan.dry_run:  # the next engine sizes its KV pool from the free memory
            gc.collect()
            wl.empty_device_cache()
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    import aiolm

    plan = wl.Plan.make(dry_run=args.dry_run, backends=args.backend)
    out: dict[str, Any] = {"plan": {"model": plan.model, "dtype": plan.dtype,
                                    "backend": plan.backends[0]}}
    if not plan.dry_run:
        import torch

        out["device"] = torch.cuda.get_device_name()
        out["kind"] = args.kind or wl.kind_from_device(out["device"])
        out["limits"] = wl.measure_limits(plan)
    loaded = wl.load_dummy(plan)
    if not plan.dry_run:
        out["linear"] = linear_figures(loaded, out["limits"]["bandwidth_Bps"])
    data = wl.Workloads(plan)
    backend = plan.backends[0]
    async with aiolm.Engine(loaded, **wl.engine_options(plan, backend)) as engine:
        bs1_new = 8 if plan.dry_run else 128
        out["decode_bs1"] = await _decode_profile(
            engine, [data.decode_prompts[0]], bs1_new, plan.device)
        batch = 4 if plan.dry_run else 64
        prompts = [data.ids(16 if plan.dry_run else 512) for _ in range(batch)]
        out["decode_bs64"] = await _decode_profile(
            engine, prompts, 8 if plan.dry_run else 64, plan.device)
    return out


def _print_passes(by_kind: dict[str, Any]) -> None:
    for kind, row in by_kind["by_kind"].items():
        print(f"   {kind:22s} {row['passes']:4d} passes {row['ms']:8.1f} ms "
              f"({row['ms_per_pass']:.1f}/pass) tokens {row['tokens']} requests "
              f"{row['requests']} (decode riders {row['riders']}) kv {row['kv_tokens']}")


def _print_kernels(gpu: dict[str, Any], top: int = 20) -> None:
    for k in gpu.get("kernels", [])[:top]:
        print(f"   {k['us_per_step'] * gpu['steps'] / 1e3:9.1f} ms "
              f"{k['calls_per_step'] * gpu['steps']:7.0f}x  {k['name'][:90]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--backend", default=None)
    parser.add_argument("--kind", default=None)
    parser.add_argument("--json-decode", action="store_true",
                        help="profile the json-decode workload, jump-forward on and off")
    parser.add_argument("--image-qa", action="store_true",
                        help="profile the image-qa workload on llava-next-7b, radix on and off")
    parser.add_argument("--throughput", action="store_true",
                        help="profile the suite's throughput workload (pass timeline, kernels)")
    parser.add_argument("--model", help="the named multimodal config --image-qa loads "
                                        "(default llava-next-7b)")
    args = parser.parse_args()
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    # Which profile: (its coroutine, its file, its printout); the decode step by default.
    modes = {"throughput": (throughput_main, "profile-throughput.json", _report_throughput),
             "image_qa": (image_qa_main, "profile-image-qa.json", _report_image_qa),
             "json_decode": (json_decode_main, "profile-json-decode.json", _report_json_decode)}
    chosen = next((modes[name] for name in modes if getattr(args, name)),
                  (main_async, "profile.json", _report_decode))
    run, filename, report = chosen
    result = asyncio.run(run(args))
    (path / filename).write_text(json.dumps(result, indent=1))
    report(result)


def _report_throughput(result: dict[str, Any]) -> None:
    print(f"throughput: {result['out_tok_s']:.0f} out tok/s, {result['wall_s']:.2f} s, "
          f"{result['passes']} passes; timeline {result['timeline_wall_s']:.2f} s wall, "
          f"device {result['passes_by_kind']['device_ms_total'] / 1e3:.2f} s")
    _print_passes(result["passes_by_kind"])
    _print_kernels(result.get("gpu", {}))


def _report_image_qa(result: dict[str, Any]) -> None:
    for key in ("radix_on", "radix_off"):
        rec = result[key]
        gpu = rec.get("gpu", {})
        print(f"{key}: {rec['programs_per_s']:.2f} programs/s, {rec['wall_s']:.2f} s, "
              f"{rec['passes']} passes, vision {rec.get('vision_s', 0):.2f} s; timeline "
              f"{rec['timeline_wall_s']:.2f} s wall, device "
              f"{rec['passes_by_kind']['device_ms_total'] / 1e3:.2f} s; gpu busy "
              f"{gpu.get('gpu_busy_us_per_step', 0) * gpu.get('steps', 0) / 1e6:.2f} s")
        _print_passes(rec["passes_by_kind"])
        _print_kernels(gpu)


def _report_json_decode(result: dict[str, Any]) -> None:
    for key in ("jump_forward_on", "jump_forward_off"):
        rec = result[key]
        gpu = rec.get("gpu", {})
        print(f"{key}: {rec['programs_per_s']:.1f} programs/s, {rec['passes']} passes, "
              f"{rec['wall_ms_per_pass']:.1f} ms/pass, gpu busy "
              f"{gpu.get('gpu_busy_us_per_step', 0) / 1e3:.1f} ms/pass, idle "
              f"{gpu.get('gpu_idle_us_per_step', 0) / 1e3:.1f} ms/pass, engine host own "
              f"{rec['engine_thread']['own_us_per_pass_total'] / 1e3:.1f} ms/pass, all threads "
              f"{rec['all_threads']['own_us_per_pass_total'] / 1e3:.1f} ms/pass")
        for part in ("engine_thread", "all_threads"):
            for row in rec[part]["by_own_time"][:10]:
                print(f"   {part} {row['own_us_per_pass']:9.0f} us {row['calls_per_pass']:8.1f}x "
                      f"{row['function'][:80]}")


def _report_decode(result: dict[str, Any]) -> None:
    for key in ("decode_bs1", "decode_bs64"):
        rec = result[key]
        prof = rec.get("profile", {})
        print(f"{key}: {rec['tok_s']:.1f} tok/s, {rec['wall_us_per_pass']:.0f} us/pass, "
              f"gpu busy {prof.get('gpu_busy_us_per_step', 0):.0f} us, idle "
              f"{prof.get('gpu_idle_us_per_step', 0):.0f} us, "
              f"{prof.get('kernels_per_step', 0):.0f} kernels/step, host own "
              f"{rec['host']['own_us_per_pass_total']:.0f} us/pass")
        for k in prof.get("kernels", [])[:12]:
            print(f"   {k['us_per_step']:8.1f} us {k['calls_per_step']:6.1f}x  {k['name'][:90]}")
    for row in result.get("linear", []):
        print(f"linear {row['name']}: {row['us']:.1f} us, {row['of_bandwidth']:.2f} of bandwidth")


if __name__ == "__main__":
    main()
