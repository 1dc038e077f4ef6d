"""Run a workload once per variant and measure the same figures for each.

Variants: ``aiolm`` (everything on), one per ablation (``radix-off``, ``fcfs``,
``jump-forward-off``, ``spec-off``), and the transformers peer (``hf``). Each variant runs
the same inputs after a warm-up program, from a cold prefix cache. Figures:

- ``programs``, ``wall_s``, ``programs_per_s``;
- ``requests`` (generate and score calls the backend received), ``prompt_tokens``,
  ``completion_tokens``, ``cached_tokens``, ``output_tok_per_s``, ``total_tok_per_s``;
- ``cache_hit_rate`` = cached prompt tokens / prompt tokens, over the measured requests;
- for ``vs_optimal`` workloads, ``optimal_hit_rate`` (the offline DFS order's, over the same
  requests) and ``hit_rate_vs_optimal`` (achieved / optimal);
- whatever the workload's own runner adds (``ttft_*`` …).

``ratios`` compare the headline figure of ``aiolm`` with each other variant's, oriented so
that a ratio above 1 means aiolm is better (throughput divided, call counts inverted).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from .recording import RecordingBackend
from .synth import Size
from .targets import ABLATION_ENGINE_KWARGS, OpenAITarget, Target
from .workload import ABLATIONS, RunOptions, Workload

if TYPE_CHECKING:
    from ..backends.base import Backend

__all__ = ["HIGHER_IS_BETTER", "Variant", "measure", "ratios", "run_workload", "variants"]

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
    then the peer (when given)."""
    out = [Variant(name="aiolm", spec_tokens=workload.spec_tokens)]
    for ablation in ablations:
        if ablation not in workload.ablations:
            continue
        if ablation == "spec":
            out.append(Variant(name=ABLATIONS[ablation], spec_tokens=None))
        elif target.supports(ablation):
            out.append(Variant(name=ABLATIONS[ablation], engine_kwargs=ABLATION_ENGINE_KWARGS[ablation],
                               spec_tokens=workload.spec_tokens))
    if peer is not None:
        out.append(Variant(name=peer.kind, peer=True, spec_tokens=workload.spec_tokens))
    return out


def _run_batch_runner(workload: Workload) -> Callable[..., Any]:
    async def run(backend: Backend, inputs: Sequence[dict[str, Any]], options: RunOptions) -> dict[str, float]:
        states = await workload.program.run_batch(
            list(inputs), backend=backend, max_concurrency=options.max_concurrency
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
) -> dict[str, float]:
    """Run ``inputs`` on ``backend`` once and return the figures (see the module docstring)."""
    recorder = RecordingBackend(backend, tokenize)
    runner = workload.runner or _run_batch_runner(workload)
    start = time.perf_counter()
    extra = await runner(recorder, inputs, options)
    wall = time.perf_counter() - start
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
        "cache_hit_rate": usage.cached_tokens / usage.prompt_tokens if usage.prompt_tokens else 0.0,
    }
    if workload.vs_optimal:
        from ..cache.dfs_optimal import dfs_optimal_hit_rate

        # The engine computes at least the last token of every request (for its logits).
        optimal = dfs_optimal_hit_rate(recorder.token_sequences(), compute_last_token=True)
        figures["optimal_hit_rate"] = optimal
        figures["hit_rate_vs_optimal"] = figures["cache_hit_rate"] / optimal if optimal else math.nan
    figures.update(extra)
    return figures


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


async def run_workload(
    workload: Workload,
    target: Target,
    *,
    size: Size,
    seed: int = 0,
    ablations: Sequence[str] = (),
    peer: Target | None = None,
    on_variant_done: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every variant of ``workload`` and return its result record (JSON-ready).

    A variant that fails is recorded under ``errors`` with its message; the others still run.
    """
    inputs = workload.make_inputs(size, seed)
    runs: dict[str, dict[str, float]] = {}
    errors: dict[str, str] = {}
    engine_kwargs = workload.engine_kwargs(size)
    for variant in variants(workload, target, ablations, peer):
        where = peer if variant.peer and peer is not None else target
        if workload.via_openai and isinstance(where, OpenAITarget):
            where = where.inner  # the workload serves its backend itself
        options = RunOptions(
            variant=variant.name, max_concurrency=workload.max_concurrency,
            spec_tokens=variant.spec_tokens,
        )
        try:
            async with where.open({**engine_kwargs, **variant.engine_kwargs}) as backend:
                tokenize = where.tokenizer(backend)
                await measure(workload, backend, inputs[:1], options, tokenize=tokenize)  # warm-up
                await where.reset(backend)
                runs[variant.name] = await measure(workload, backend, inputs, options, tokenize=tokenize)
        except Exception as exc:  # one broken variant must not hide the others' figures
            errors[variant.name] = f"{type(exc).__name__}: {exc}"
        if on_variant_done is not None:
            on_variant_done(variant.name)
    return {
        "name": workload.name,
        "summary": workload.summary,
        "shape": attrs.asdict(workload.shape(size)),
        "engine_kwargs": engine_kwargs,
        "headline": workload.headline,
        "higher_is_better": workload.headline in HIGHER_IS_BETTER,
        "runs": runs,
        "ratios": ratios(workload.headline, runs),
        "errors": errors,
    }
