"""What a benchmark workload is: a real aiolm program, its synthetic inputs and its figures.

Each module of :mod:`aiolm.bench` (``few_shot``, ``tree_of_thought`` …) defines one
:class:`Workload`. The harness (:mod:`aiolm.bench.harness`) runs it on a backend, once per
variant (aiolm, each ablation, the transformers peer), and measures the same figures for each.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from .synth import Size

if TYPE_CHECKING:
    from ..backends.base import Backend

__all__ = ["ABLATIONS", "RunOptions", "Runner", "Workload", "fixed_length"]

#: The paper's ablations: what ``--ablate`` switches off, and the variant's name in results.
ABLATIONS: dict[str, str] = {
    "radix": "radix-off",
    "schedule": "fcfs",
    "jump-forward": "jump-forward-off",
    "spec": "spec-off",
    "overlap": "overlap-off",
    "mix-decode": "mix-decode-off",
    "extend-graphs": "extend-graphs-off",
    "shared-prefix": "shared-prefix-off",
}

#: A custom way to run a workload's inputs on a backend (for figures ``run_batch`` cannot
#: give, such as time to first token). It returns extra figures; the harness times it.
Runner = Callable[["Backend", Sequence[dict[str, Any]], "RunOptions"], Awaitable[dict[str, float]]]


@attrs.frozen(kw_only=True)
class RunOptions:
    """How one variant runs: passed to a workload's custom runner."""

    variant: str = "aiolm"
    max_concurrency: int = 64
    #: API speculation (``spec_tokens``) for workloads that go through the OpenAI backend.
    spec_tokens: int | None = None
    #: Run the programs on ``aiolm.OpenAI`` against aiolm's server over the backend
    #: (``aiolm bench --backend openai``; always for workloads with ``via_openai``).
    via_openai: bool = False


def fixed_length(n: int) -> dict[str, Any]:
    """``gen`` settings that make a generation exactly ``n`` tokens long.

    Benchmarks compare systems on the same work, and random-weight models stop at random
    places, so most workloads fix their output lengths (``ignore_eos``, ``min_tokens``).
    """
    return {"max_tokens": n, "min_tokens": n, "ignore_eos": True}


def _no_engine_kwargs(size: Size) -> dict[str, Any]:
    return {}


@attrs.frozen(kw_only=True)
class Workload:
    """One benchmark workload of BENCH.md's table.

    ``make_inputs(size, seed)`` gives the keyword arguments of each program run (the same
    list for every variant). ``program`` is run with ``run_batch`` unless ``runner`` is set.
    ``headline`` names the figure plotted and compared across variants. ``ablations`` are the
    ``--ablate`` switches that apply. ``vs_optimal`` asks for the offline DFS-optimal cache
    hit rate of the requests the program issued. ``engine_kwargs(size)`` are extra engine
    settings this workload needs in every engine variant (e.g. a KV budget that makes the
    cache-aware schedule matter).
    """

    name: str
    summary: str
    program: Any
    make_inputs: Callable[[Size, int], list[dict[str, Any]]]
    shape: Callable[[Size], Any]
    headline: str = "programs_per_s"
    ablations: tuple[str, ...] = ()
    vs_optimal: bool = False
    max_concurrency: int = 64
    runner: Runner | None = None
    engine_kwargs: Callable[[Size], dict[str, Any]] = _no_engine_kwargs
    #: Whether the transformers peer runs this workload too.
    peer: bool = True
    #: ``spec_tokens`` of the OpenAI backend in every variant but ``spec-off``.
    spec_tokens: int | None = None
    #: Always through the OpenAI API (aiolm's server over the benchmarked backend).
    via_openai: bool = False

    def __attrs_post_init__(self) -> None:
        unknown = set(self.ablations) - set(ABLATIONS)
        if unknown:
            raise ValueError(f"ablations: unknown {sorted(unknown)}; known: {sorted(ABLATIONS)}")
