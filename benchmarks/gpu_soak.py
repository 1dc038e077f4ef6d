#!/usr/bin/env python3
"""The GPU soak: real traffic's variety through one process, with the engine checked after
every piece of it (a section of benchmarks/gpu_suite.py; also runs alone).

For each attention backend (``triton``, ``flashinfer``, ``hybrid``; the flashinfer ones
where flashinfer imports), in ONE process over one set of dummy weights:

1. **workloads** — every ``aiolm bench`` workload at ``--size small`` (``api-spec`` where
   the ``openai`` client is installed), with every ablation (radix cache off, fcfs,
   jump-forward off), in ``aiolm bench``'s own order: one engine per settings, shared by
   consecutive workloads (the pattern that once crashed: ``select`` then
   ``tree-of-thought`` on one radix-off engine). After each workload: no error, the engine
   idle, ``Engine.check_integrity()`` clean (no used slot, no locked node);
2. **oracle** — fixed greedy requests (token ids, prompts of 5 to 3,000 tokens) on an
   engine of this backend, compared with the ``torch`` attention backend's tokens on the
   same weights (:func:`aiolm.bench.fuzz.first_greedy_mismatch`: a divergence counts
   only where the reference's top two tokens are not within ``margin`` of a tie);
3. **fuzz** — :func:`aiolm.bench.fuzz.fuzz_engine` for a fixed time on an engine whose KV
   pool is small enough that retraction happens: random programs (nested forks, select,
   constrained gens, dropped streams, cancellations, prompts near the context limit).

The tests run with ``AIOLM_DEBUG_CHECKS=1`` (every index checked before each pass); the soak
sets it too. It reports programs, requests, retractions and minutes per backend, and every
fault with what reproduces it (the fuzzer's program seed). ``--dry-run`` runs the same
plumbing on the CPU (tiny model, ``torch`` backend, tiny sizes).

    python benchmarks/gpu_soak.py --out DIR [--budget S] [--dry-run]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import attrs

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS_FILE = "gpu_soak.json"


@attrs.frozen(kw_only=True)
class SoakPlan:
    """Model, backends, sizes and time shares of one soak."""

    dry_run: bool
    device: str
    model: str
    backends: tuple[str, ...]
    size: str
    ablations: tuple[str, ...]
    fuzz_kv_tokens: int
    fuzz_concurrency: int
    fuzz_new_tokens: int
    fuzz_share: float  # of each backend's time, after its workloads and oracle
    margin: float
    oracle_lens: tuple[int, ...]
    oracle_tokens: int
    # Fewer CUDA-graph buckets to capture per engine (9 instead of 21): more soak per minute.
    max_running_requests: int = 64
    seed: int = 0

    @classmethod
    def make(cls, *, dry_run: bool, backends: str | None = None, seed: int = 0) -> SoakPlan:
        ablations = ("radix", "schedule", "jump-forward", "spec")
        if dry_run:
            return cls(dry_run=True, device="cpu", model="tiny-llama", backends=("torch",),
                       size="tiny", ablations=ablations, fuzz_kv_tokens=1024,
                       fuzz_concurrency=8, fuzz_new_tokens=16, fuzz_share=1.0, margin=1e-3, oracle_lens=(5, 40),
                       oracle_tokens=6, seed=seed)
        names = ("triton", "flashinfer", "hybrid")
        if importlib.util.find_spec("flashinfer") is None:
            names = ("triton",)
        if backends:
            names = tuple(b.strip() for b in backends.split(",") if b.strip())
        # bf16 logits of magnitude 16..32 are 0.125 apart: the same token's logit from two
        # kernels (or two batch compositions: other split counts, other summation orders)
        # can differ by a unit or two there, so greedy paths may part where the top two are
        # within 0.25 nats. A KV pool of 6,144 slots with 64-token bursts forces retraction.
        return cls(dry_run=False, device="cuda", model="llama-3-8b", backends=names,
                   size="small", ablations=ablations, fuzz_kv_tokens=6144,
                   fuzz_concurrency=24, fuzz_new_tokens=64, fuzz_share=1.0, margin=0.25,
                   oracle_lens=(5, 60, 700, 3000), oracle_tokens=32, seed=seed)


def _target(loaded: Any, plan: SoakPlan, backend: str) -> Any:
    """An ``EngineTarget`` pinned to one attention backend: engines open as ``aiolm bench``
    opens them (one per settings, shared by consecutive workloads)."""
    from aiolm.bench.targets import EngineTarget

    return EngineTarget(loaded, device=plan.device, seed=plan.seed, attention_backend=backend,
                        max_running_requests=plan.max_running_requests)


async def _settle(engine: Any, timeout: float = 30.0) -> Any:
    """Wait for the engine to go idle, then check its KV accounting (raises if broken)."""
    from aiolm.bench.fuzz import wait_idle

    await wait_idle(engine, timeout)
    report = await engine.check_integrity()
    if not report.idle:
        raise RuntimeError(f"not idle {timeout:.0f} s after the workload ended: {report}")
    return report


def _workloads(plan: SoakPlan) -> list[Any]:
    from aiolm.bench import WORKLOADS

    names = list(WORKLOADS)
    if importlib.util.find_spec("openai") is None:  # api-spec drives aiolm.OpenAI
        names.remove("api-spec")
    return [WORKLOADS[n] for n in names]


async def soak_workloads(loaded: Any, plan: SoakPlan, backend: str, out: dict[str, Any]) -> None:
    """Part 1: every workload and ablation, checked after each (fills ``out``)."""
    from aiolm.bench.harness import measure
    from aiolm.bench.harness import plan as make_plan
    from aiolm.bench.workload import RunOptions

    target = _target(loaded, plan, backend)
    steps = make_plan(_workloads(plan), target, size=plan.size, ablations=plan.ablations)
    runs: list[dict[str, Any]] = out.setdefault("runs", [])
    try:
        for step in steps:
            w, variant = step.workload, step.variant
            record: dict[str, Any] = {"workload": w.name, "variant": variant.name}
            runs.append(record)
            options = RunOptions(variant=variant.name, max_concurrency=w.max_concurrency,
                                 spec_tokens=variant.spec_tokens)
            try:
                async with target.open(step.engine_kwargs) as engine:
                    inputs = w.make_inputs(plan.size, plan.seed)
                    figures = await measure(w, engine, inputs, options,
                                            tokenize=engine.tokenizer.encode)
                    report = await _settle(engine)
                record.update(programs=int(figures["programs"]),
                              requests=int(figures["requests"]),
                              seconds=round(figures["wall_s"], 2),
                              cached_tokens=report.cached_tokens)
            except Exception as exc:  # noqa: BLE001 - a fault is a finding: record, go on
                record["fault"] = f"{type(exc).__name__}: {exc}"[:1000]
                out.setdefault("faults", []).append(
                    {"stage": "workloads", "workload": w.name, "variant": variant.name,
                     "reproduce": f"aiolm bench {w.name} --size {plan.size} --dummy "
                                  f"{plan.model} (attention_backend={backend})",
                     "error": record["fault"]})
    finally:
        await target.aclose()


def oracle_prompts(plan: SoakPlan, vocab_size: int) -> list[list[int]]:
    rnd = random.Random(plan.seed)
    return [[rnd.randrange(3, vocab_size) for _ in range(n)] for n in plan.oracle_lens]


async def soak_oracle(loaded: Any, plan: SoakPlan, backend: str) -> list[Any]:
    """Part 2: the greedy oracle requests on ``backend``, submitted together."""
    import anyio

    from aiolm.backends.engine import Engine

    prompts = oracle_prompts(plan, loaded.model_config.vocab_size)
    results: list[Any] = [None] * len(prompts)
    async with Engine(loaded, device=plan.device, attention_backend=backend, seed=plan.seed,
                      max_running_requests=plan.max_running_requests) as engine:
        async def one(i: int) -> None:
            results[i] = await engine.generate(
                input_ids=prompts[i], max_tokens=plan.oracle_tokens, ignore_eos=True,
                temperature=0.0, logprobs=True, top_logprobs=2)

        async with anyio.create_task_group() as tg:
            for i in range(len(prompts)):
                tg.start_soon(one, i)
        await _settle(engine)
    return results


async def soak_fuzz(loaded: Any, plan: SoakPlan, backend: str, seconds: float) -> dict[str, Any]:
    """Part 3: the random-program fuzzer for ``seconds`` on a small KV pool."""
    from aiolm.backends.engine import Engine
    from aiolm.bench.fuzz import fuzz_engine

    async with Engine(loaded, device=plan.device, attention_backend=backend, seed=plan.seed,
                      max_total_tokens=plan.fuzz_kv_tokens,
                      max_running_requests=plan.max_running_requests) as engine:
        report = await fuzz_engine(engine, seed=plan.seed, duration_s=seconds,
                                   concurrency=plan.fuzz_concurrency, margin=plan.margin,
                                   max_new_tokens=plan.fuzz_new_tokens)
        await _settle(engine)
    return report.as_dict()


def _compare(reference: list[Any], other: list[Any], margin: float) -> list[str]:
    from aiolm.bench.fuzz import first_greedy_mismatch

    problems = []
    for i, (ref, got) in enumerate(zip(reference, other, strict=True)):
        problem = first_greedy_mismatch(ref, got, margin)
        if problem is not None:
            problems.append(f"oracle prompt {i}: {problem}")
    return problems


def run_soak(plan: SoakPlan, deadline: float, results: dict[str, Any] | None = None,
             save: Any = None) -> dict[str, Any]:
    """Run the soak until ``deadline`` (``time.monotonic()``); returns (and fills) ``results``.

    ``save()`` is called after every part so a watchdog can write what exists.
    """
    import anyio

    from aiolm.bench.models import load_for_bench

    os.environ.setdefault("AIOLM_DEBUG_CHECKS", "1")
    results = results if results is not None else {}
    results.update(plan=attrs.asdict(plan), backends={}, faults=[], cross_backend={})
    save = save or (lambda: None)
    start = time.monotonic()
    loaded = load_for_bench(plan.model, load_format="dummy", device=plan.device, seed=plan.seed)
    reference = anyio.run(soak_oracle, loaded, plan, "torch")
    for i, backend in enumerate(plan.backends):
        out: dict[str, Any] = {"faults": []}
        results["backends"][backend] = out
        t0 = time.monotonic()
        share = (deadline - t0) / (len(plan.backends) - i)
        try:
            anyio.run(soak_workloads, loaded, plan, backend, out)
            save()
            got = anyio.run(soak_oracle, loaded, plan, backend)
            mismatches = _compare(reference, got, plan.margin)
            results["cross_backend"][backend] = {"vs": "torch", "prompts": len(got),
                                                 "mismatches": mismatches}
            out["faults"] += [{"stage": "oracle", "error": m} for m in mismatches]
            save()
            left = share - (time.monotonic() - t0)
            seconds = max(5.0, left * plan.fuzz_share - 10.0)
            out["fuzz"] = anyio.run(soak_fuzz, loaded, plan, backend, seconds)
            out["faults"] += [{"stage": "fuzz", **f} for f in out["fuzz"]["faults"]]
        except Exception as exc:  # noqa: BLE001 - the next backend still runs
            out["faults"].append({"stage": "backend", "error": f"{type(exc).__name__}: {exc}",
                                  "traceback": traceback.format_exc()[-3000:]})
        runs = out.get("runs", [])
        fuzz = out.get("fuzz", {})
        out["summary"] = {
            "workload_runs": len(runs),
            "programs": sum(r.get("programs", 0) for r in runs) + fuzz.get("programs", 0),
            "requests": sum(r.get("requests", 0) for r in runs) + fuzz.get("requests", 0),
            "retractions": fuzz.get("retractions", 0),
            "fuzz_programs": fuzz.get("programs", 0),
            "faults": len(out["faults"]),
            "minutes": round((time.monotonic() - t0) / 60, 2),
        }
        results["faults"] += [{"backend": backend, **f} for f in out["faults"]]
        save()
    results["minutes"] = round((time.monotonic() - start) / 60, 2)
    return results


def summary_lines(results: dict[str, Any]) -> list[str]:
    """One line per backend: programs, requests, retractions, minutes, faults."""
    lines = []
    for backend, out in results.get("backends", {}).items():
        s = out.get("summary", {})
        lines.append(f"  soak {backend:<10} {s.get('workload_runs', 0)} workload runs, "
                     f"{s.get('programs', 0)} programs ({s.get('fuzz_programs', 0)} fuzzed), "
                     f"{s.get('requests', 0)} requests, {s.get('retractions', 0)} retractions, "
                     f"{s.get('minutes', 0)} min, {s.get('faults', 0)} faults")
    for fault in results.get("faults", [])[:10]:
        lines.append(f"  !! {json.dumps(fault)[:300]}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="aiolm GPU soak (see the module docstring)")
    parser.add_argument("--out", required=True, help="folder for gpu_soak.json")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds for the soak")
    parser.add_argument("--backends", help="comma-separated attention backends")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, tiny sizes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = SoakPlan.make(dry_run=args.dry_run, backends=args.backends, seed=args.seed)
    results: dict[str, Any] = {}

    def save() -> None:
        (out / RESULTS_FILE).write_text(json.dumps(results, indent=1, default=str))

    run_soak(plan, time.monotonic() + args.budget, results, save)
    save()
    print("\n".join(summary_lines(results)), flush=True)
    return 1 if results["faults"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
