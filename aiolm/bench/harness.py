"""Run a workload once per variant and measure the same figures for each.

Variants: ``aiolm`` (everything on), one per ablation (``radix-off``, ``fcfs``,
``jump-forward-off``, ``spec-off``), and the transformers peer (``hf``). Each variant runs
the same inputs after a warm-up program (of the tiny shape), from a flushed cache. Figures:

- ``programs``, ``wall_s``, ``programs_per_s``;
- ``requests`` (generate and score calls the backend received), ``prompt_tokens``,
  ``completion_tokens``, ``cached_tokens``, ``output_tok_per_s``, ``total_tok_per_s``;
- ``cache_hit_rate`` = cached prompt tokens / prompt tokens, over the measured requests
  (from the engine's statistics where it has them: they include prefills), and
  ``forward_passes`` for the engine;
- for ``vs_optimal`` workloads, ``optimal_hit_rate`` (the offline DFS order's, over the same
  requests) and ``hit_rate_vs_optimal`` (achieved / optimal);
- whatever the workload's own runner adds (``ttft_*`` …).

``ratios`` compare the headline figure of ``aiolm`` with each other variant's, oriented so
that a ratio above 1 means aiolm is better (throughput divided, call counts inverted).

A failing variant is recorded and the plan goes on, except after a CUDA fault that leaves
the process's CUDA context unusable (:func:`cuda_context_lost`): every later step would fail
or, worse, measure a broken device. :func:`run_plan` then records that variant's error and
raises :class:`ContextLost` with the records so far; the rest of the plan can run in a fresh
process from ``ContextLost.next_step`` (``run_plan(..., start=K)``), as ``aiolm bench`` does.

Testing hook: ``AIOLM_BENCH_INJECT_CUDA_FAULT="WORKLOAD/VARIANT[,WORKLOAD/VARIANT...]"`` makes
the step of that workload and variant raise :class:`InjectedCudaFault` (a ``RuntimeError``
with CUDA's illegal-memory-access message) instead of running, and
:func:`cuda_context_lost` treats it as a lost context. It exercises the fault path without
a GPU.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from .recording import RecordingBackend
from .synth import Size
from .targets import ABLATION_ENGINE_KWARGS, Target
from .workload import ABLATIONS, RunOptions, Workload

if TYPE_CHECKING:
    from ..backends.base import Backend

__all__ = [
    "HIGHER_IS_BETTER", "INJECT_FAULT_ENV", "ContextLost", "InjectedCudaFault", "PlanProgress", "Step",
    "Variant", "cuda_context_lost", "injected_faults", "measure", "merge_records", "new_record", "plan", "ratios",
    "run_plan", "run_workload", "variants",
]

#: Figures where more is better; the others (``requests``, ``wall_s``, ``ttft_*``) are costs.
HIGHER_IS_BETTER = frozenset({
    "programs_per_s", "output_tok_per_s", "total_tok_per_s", "cache_hit_rate",
    "hit_rate_vs_optimal", "bandwidth_roofline_fraction", "matmul_roofline_fraction",
})


@attrs.frozen(kw_only=True)
class Variant:
    """One way of running a workload: its name in results, engine settings, speculation."""

    name: str
    engine_kwargs: dict[str, Any] = attrs.field(factory=dict)
    spec_tokens: int | None = None
    peer: bool = False


def variants(workload: Workload, target: Target, ablations: Sequence[str], peer: Target | None) -> list[Variant]:
    """``aiolm``, then each requested ablation that applies to the workload and target,
    then the peer (when given and the workload has one)."""
    out = [Variant(name="aiolm", spec_tokens=workload.spec_tokens)]
    for ablation in ablations:
        if ablation not in workload.ablations:
            continue
        if ablation == "spec":
            out.append(Variant(name=ABLATIONS[ablation], spec_tokens=None))
        elif target.supports(ablation):
            out.append(Variant(name=ABLATIONS[ablation], engine_kwargs=ABLATION_ENGINE_KWARGS[ablation],
                               spec_tokens=workload.spec_tokens))
    if peer is not None and workload.peer:
        out.append(Variant(name=peer.kind, peer=True, spec_tokens=workload.spec_tokens))
    return out


def _run_batch_runner(workload: Workload, on_programs_done: Callable[[int], None] | None) -> Callable[..., Any]:
    on_done = None if on_programs_done is None else (lambda _index, _state: on_programs_done(1))

    async def run(backend: Backend, inputs: Sequence[dict[str, Any]], options: RunOptions) -> dict[str, float]:
        from .openai_bridge import served_if

        async with served_if(backend, options) as programs_backend:
            states = await workload.program.run_batch(
                list(inputs), backend=programs_backend, max_concurrency=options.max_concurrency,
                on_done=on_done,
            )
        failed = [st.error for st in states if st.error is not None]
        if failed:
            raise failed[0]
        return {}

    return run


async def measure(
    workload: Workload,
    backend: Backend,
    inputs: Sequence[dict[str, Any]],
    options: RunOptions,
    *,
    tokenize: Callable[[str], Sequence[int]],
    on_programs_done: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Run ``inputs`` on ``backend`` once and return the figures (see the module docstring).

    ``on_programs_done(n)``: ``n`` more programs finished; called as each one finishes
    under ``run_batch``, and once with them all after a workload's own runner.
    """
    recorder = RecordingBackend(backend, tokenize)
    runner = workload.runner or _run_batch_runner(workload, on_programs_done)
    before = _engine_counters(backend)
    start = time.perf_counter()
    extra = await runner(recorder, inputs, options)
    wall = time.perf_counter() - start
    if workload.runner is not None and on_programs_done is not None:
        on_programs_done(len(inputs))
    after = _engine_counters(backend)
    usage = recorder.usage_totals()
    figures: dict[str, float] = {
        "programs": len(inputs),
        "wall_s": wall,
        "programs_per_s": len(inputs) / wall,
        "requests": recorder.calls,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cached_tokens": usage.cached_tokens,
        "output_tok_per_s": usage.completion_tokens / wall,
        "total_tok_per_s": (usage.prompt_tokens + usage.completion_tokens) / wall,
        "cache_hit_rate": usage.cache_hit_rate,
    }
    if before is not None and after is not None:
        names_counted = ("prompt_tokens", "cached_tokens", "forward_passes")
        # The engine's own totals also count what usage cannot show (prefills of fork
        # prefixes and of select prompts): the hit rate over everything it computed.
        delta = {k: after[k] - before[k] for k in names_counted}
        figures["cache_hit_rate"] = (
            delta["cached_tokens"] / delta["prompt_tokens"] if delta["prompt_tokens"] else 0.0)
        figures["forward_passes"] = delta["forward_passes"]
        # The KV pool it ran with: variants compare fairly only with pools alike.
        figures["kv_pool_tokens"] = after["total_kv_slots"]
    if workload.vs_optimal:
        from ..cache.dfs_optimal import dfs_optimal_hit_rate

        # The engine computes at least the last token of every request (for its logits).
        optimal = dfs_optimal_hit_rate(recorder.token_sequences(), compute_last_token=True)
        figures["optimal_hit_rate"] = optimal
        figures["hit_rate_vs_optimal"] = figures["cache_hit_rate"] / optimal if optimal else math.nan
    figures.update(extra)
    return figures


def _engine_counters(backend: Backend) -> dict[str, int] | None:
    """The engine's running totals (prompt, cached tokens, forward passes), if it has them."""
    stats = getattr(backend, "statistics", None)
    if stats is None:
        return None
    snapshot = stats()
    names = ("prompt_tokens", "cached_tokens", "forward_passes")
    if not all(hasattr(snapshot, n) for n in names):
        return None
    return {n: getattr(snapshot, n) for n in (*names, "total_kv_slots")}


def ratios(headline: str, runs: dict[str, dict[str, float]]) -> dict[str, float]:
    """``aiolm`` against every other variant on ``headline``; above 1 means aiolm is better."""
    base = runs.get("aiolm", {}).get(headline)
    out: dict[str, float] = {}
    if base is None:
        return out
    for name, figures in runs.items():
        other = figures.get(headline)
        if name == "aiolm" or other is None:
            continue
        num, den = (base, other) if headline in HIGHER_IS_BETTER else (other, base)
        out[f"aiolm/{name}"] = num / den if den else math.inf
    return out


@attrs.frozen(kw_only=True)
class Step:
    """One measured run: a workload's variant, where it runs and with which engine settings."""

    workload: Workload
    variant: Variant
    where: Target
    engine_kwargs: dict[str, Any]
    #: The workload's position on the command line (results come back in this order).
    position: int = 0
    #: Programs run on ``aiolm.OpenAI`` against aiolm's server over the backend.
    via_openai: bool = False
    #: Run only the first this many programs (None: all).
    max_programs: int | None = None

    @property
    def name(self) -> str:
        """``WORKLOAD/VARIANT``, as progress, errors and the fault-injection hook name it."""
        return f"{self.workload.name}/{self.variant.name}"

    @property
    def key(self) -> tuple[int, str]:
        import json

        return id(self.where), json.dumps(self.engine_kwargs, sort_keys=True)


def plan(workloads: Sequence[Workload], target: Target, *, size: Size, ablations: Sequence[str] = (),
         peer: Target | None = None, by_workload: bool = False, via_openai: bool = False,
         peer_programs: int | None = None) -> list[Step]:
    """Every variant of every workload.

    ``by_workload``: each workload's variants back to back (aiolm, ablations, peer), so
    that a shared machine's drift hits the runs that are compared in the same minutes; for
    the CPU, where opening an engine over loaded weights is cheap. Otherwise runs sharing a
    backend and its settings are adjacent (an engine opens once per group, which matters
    where opening one captures CUDA graphs) and the peer runs last. ``via_openai``: the
    programs go through aiolm's server and ``aiolm.OpenAI`` (the recorder and the engine's
    statistics stay on the server's side, so the figures count what the engine saw).
    ``peer_programs``: the peer runs only the first that many programs of each workload (it
    runs them one call at a time, so its rate does not depend on how many; this keeps
    the paper's shapes affordable on a GPU).
    """
    steps = []
    for position, workload in enumerate(workloads):
        base = workload.engine_kwargs(size)
        for variant in variants(workload, target, ablations, peer):
            where = peer if variant.peer and peer is not None else target
            steps.append(Step(workload=workload, variant=variant, where=where,
                              engine_kwargs={**base, **variant.engine_kwargs}, position=position,
                              via_openai=via_openai,
                              max_programs=peer_programs if variant.peer else None))
    if by_workload:
        return steps
    order: dict[tuple[int, str], int] = {}
    for step in steps:
        order.setdefault(step.key, len(order))
    return sorted(steps, key=lambda st: (st.variant.peer, order[st.key]))


#: Environment variable of the fault-injection testing hook (see the module docstring).
INJECT_FAULT_ENV = "AIOLM_BENCH_INJECT_CUDA_FAULT"

#: Words of CUDA's messages for its sticky errors: after one, every later CUDA call in the
#: process fails too, so nothing more can be measured here. Ordinary CUDA errors (out of
#: memory, a bad argument) leave the context usable and are not listed.
_STICKY_CUDA_FAULTS = (
    "illegal memory access",       # cudaErrorIllegalAddress: a kernel read or wrote out of bounds
    "illegal instruction",         # cudaErrorIllegalInstruction
    "misaligned address",          # cudaErrorMisalignedAddress
    "unspecified launch failure",  # cudaErrorLaunchFailure: a kernel crashed
    "device-side assert",          # cudaErrorAssert: a kernel's assert fired (e.g. an index check)
)


class InjectedCudaFault(RuntimeError):
    """The fault that the testing hook raises at a step (see the module docstring)."""


class ContextLost(Exception):
    """A step left the process's CUDA context unusable; :func:`run_plan` stopped after it.

    ``records``: one record per workload reached, with the figures measured before the fault
    and the faulted variant's error (JSON-ready, as :func:`run_plan` returns them). ``index``:
    the faulted step's index in the plan; ``next_step``: the first step not run; ``not_run``:
    the names (``WORKLOAD/VARIANT``) of the steps not run. Nothing more should touch CUDA in
    this process: run ``steps[next_step:]`` in a fresh one.
    """

    def __init__(self, *, records: list[dict[str, Any]], steps: Sequence[Step], index: int,
                 error: str) -> None:
        self.records = records
        self.index = index
        self.step = steps[index]
        self.error = error
        self.not_run = [step.name for step in steps[index + 1:]]
        super().__init__(f"{self.step.name} (step {index}): {error}; not run in this process: "
                         f"{', '.join(self.not_run) or 'none'}")

    @property
    def next_step(self) -> int:
        """The index of the first step that was not run."""
        return self.index + 1


def injected_faults(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The steps (``WORKLOAD/VARIANT``) where the testing hook injects a CUDA fault."""
    return [name.strip() for name in environ.get(INJECT_FAULT_ENV, "").split(",") if name.strip()]


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, its causes and contexts, and the members of exception groups among them."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__]
        if isinstance(current, BaseExceptionGroup):
            todo += current.exceptions


def cuda_context_lost(exc: BaseException) -> bool:
    """Whether ``exc`` means this process's CUDA context is unusable (a sticky CUDA fault).

    True for :class:`InjectedCudaFault` anywhere in ``exc``'s chain. Otherwise only when torch
    is imported already and has initialised CUDA (this never imports torch), and then when
    a device synchronisation fails or the text of ``exc`` (its causes and contexts included)
    names a sticky fault. Waits for the current device's queued work (the probe).
    """
    chain = list(_chain(exc))
    if any(isinstance(e, InjectedCudaFault) for e in chain):
        return True
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return False
    try:
        torch.cuda.synchronize()
    except Exception:  # the probe failing is the answer
        return True
    # The probe can pass while the fault is on another device (or on its way): trust the text.
    text = " ".join(str(e) for e in chain).lower()
    return any(fault in text for fault in _STICKY_CUDA_FAULTS)


def new_record(workload: Workload, size: Size) -> dict[str, Any]:
    """An empty result record of ``workload`` (JSON-ready): no runs, no errors yet."""
    return {
        "name": workload.name, "summary": workload.summary, "shape": attrs.asdict(workload.shape(size)),
        "engine_kwargs": workload.engine_kwargs(size), "headline": workload.headline,
        "higher_is_better": workload.headline in HIGHER_IS_BETTER, "runs": {}, "ratios": {},
        "errors": {},
    }


def _finish_record(record: dict[str, Any]) -> dict[str, Any]:
    """Put ``aiolm``'s run first and compute the ratios (in place); return ``record``."""
    order = ["aiolm", *(n for n in record["runs"] if n != "aiolm")]
    record["runs"] = {n: record["runs"][n] for n in order if n in record["runs"]}
    record["ratios"] = ratios(record["headline"], record["runs"])
    return record


def merge_records(parts: Sequence[Sequence[dict[str, Any]]], order: Sequence[str]) -> list[dict[str, Any]]:
    """Join the records of runs of parts of one plan: one record per workload, its runs and
    errors joined by variant name (a later part wins), ratios recomputed; sorted by the
    workloads' places in ``order`` (their names). Mutates the records of the first part that
    names each workload."""
    merged: dict[str, dict[str, Any]] = {}
    for part in parts:
        for record in part:
            into = merged.setdefault(record["name"], record)
            if into is not record:
                into["runs"].update(record["runs"])
                into["errors"].update(record["errors"])
    return sorted((_finish_record(r) for r in merged.values()), key=lambda r: order.index(r["name"]))


class PlanProgress(Protocol):
    """What :func:`run_plan` reports as it goes (``aiolm bench``'s progress bar)."""

    def planned(self, programs: int) -> None:
        """The measured programs of every step to run, in all (called once, first)."""

    def stage(self, text: str) -> None:
        """What runs now: ``WORKLOAD/VARIANT: opening engine``, ``...: warm-up``, then
        ``WORKLOAD/VARIANT`` while its programs are measured."""

    def advance(self, programs: int) -> None:
        """``programs`` more measured programs finished (or, after a failed step, will
        not run): the calls of a plan add up to the total it ``planned``."""


async def _run_step(step: Step, inputs: Sequence[dict[str, Any]], *, seed: int, inject: bool,
                    progress: _StepCounter) -> dict[str, float]:
    """Warm up, flush the cache, then measure ``inputs`` on ``step``'s target; return the figures.

    Raises whatever the run raises; :class:`InjectedCudaFault` when ``inject``.
    """
    if inject:
        raise InjectedCudaFault(f"CUDA error: an illegal memory access was encountered "
                                f"(injected at {step.name} by {INJECT_FAULT_ENV})")
    w = step.workload
    options = RunOptions(variant=step.variant.name, max_concurrency=w.max_concurrency,
                         spec_tokens=step.variant.spec_tokens, via_openai=step.via_openai)
    progress.stage(f"{step.name}: opening {step.where.kind}")
    async with step.where.open(step.engine_kwargs) as backend:
        tokenize = step.where.tokenizer(backend)
        progress.stage(f"{step.name}: warm-up")
        # Warm up on one program of the tiny shape: same code paths, little time.
        await measure(w, backend, w.make_inputs("tiny", seed)[:1], options, tokenize=tokenize)
        await step.where.reset(backend)
        progress.stage(step.name)
        return await measure(w, backend, inputs[: step.max_programs], options, tokenize=tokenize,
                             on_programs_done=progress.advance)


async def run_plan(steps: Sequence[Step], *, size: Size, seed: int = 0,
                   on_step_done: Callable[[Step], None] | None = None, start: int = 0,
                   progress: PlanProgress | None = None) -> list[dict[str, Any]]:
    """Run ``steps[start:]`` in order; return one result record per workload they reach
    (JSON-ready), in the order of the workloads' positions. Steps before ``start`` are not
    run, nor are their inputs made. ``on_step_done(step)`` follows each step; ``progress``
    hears the plan's program count, each stage and each measured program.

    A failing variant is recorded under ``errors`` with its message; the others still run.
    Raises :class:`ContextLost` (carrying the records so far) when a failure left the CUDA
    context unusable: that variant's error says so, and no later step runs.
    """
    records: dict[str, dict[str, Any]] = {}
    positions = {step.workload.name: step.position for step in steps}
    inputs: dict[str, list[dict[str, Any]]] = {}
    for step in steps[start:]:
        if step.workload.name not in inputs:
            inputs[step.workload.name] = step.workload.make_inputs(size, seed)
    counter = _StepCounter(progress)
    if progress is not None:
        progress.planned(sum(len(inputs[st.workload.name][: st.max_programs]) for st in steps[start:]))
    inject = set(injected_faults())
    current: Target | None = None
    for index in range(start, len(steps)):
        step, w = steps[index], steps[index].workload
        if w.name not in records:
            records[w.name] = new_record(w, size)
        previous, current = current, step.where
        fault: Exception | None = None
        counter.count = 0
        try:
            if previous is not None and previous is not step.where:
                # Free device memory for the other side. Inside the try: a CUDA fault of
                # the previous step can surface here, in the engine's teardown.
                await previous.release()
            figures = await _run_step(step, inputs[w.name], seed=seed, inject=step.name in inject,
                                      progress=counter)
            records[w.name]["runs"][step.variant.name] = figures
        except Exception as exc:  # one broken variant must not hide the others' figures
            error = f"{type(exc).__name__}: {exc}"
            if cuda_context_lost(exc):
                fault, error = exc, f"CUDA context lost: {error}"
            records[w.name]["errors"][step.variant.name] = error
        counter.advance(len(inputs[w.name][: step.max_programs]) - counter.count)  # a failed step's rest
        if on_step_done is not None:
            on_step_done(step)
        if fault is not None:
            raise ContextLost(records=_in_order(records, positions), steps=steps, index=index,
                              error=records[w.name]["errors"][step.variant.name]) from fault
    return _in_order(records, positions)


@attrs.define(eq=False)
class _StepCounter:
    """Passes a step's progress on, counting its programs (so a failed step's rest can be
    added, and the plan's calls add up to its total)."""

    progress: PlanProgress | None
    count: int = 0

    def stage(self, text: str) -> None:
        if self.progress is not None:
            self.progress.stage(text)

    def advance(self, programs: int) -> None:
        if programs <= 0:
            return
        self.count += programs
        if self.progress is not None:
            self.progress.advance(programs)


def _in_order(records: dict[str, dict[str, Any]], positions: dict[str, int]) -> list[dict[str, Any]]:
    """The finished records, in the order of the workloads' positions."""
    return sorted((_finish_record(r) for r in records.values()), key=lambda r: positions[r["name"]])


async def run_workload(workload: Workload, target: Target, *, size: Size, seed: int = 0,
                       ablations: Sequence[str] = (), peer: Target | None = None) -> dict[str, Any]:
    """Run every variant of one workload (see :func:`run_plan`) and return its record."""
    steps = plan([workload], target, size=size, ablations=ablations, peer=peer)
    return (await run_plan(steps, size=size, seed=seed))[0]
