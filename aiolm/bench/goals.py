"""The issue's goals, each a ratio from one run, checked against a results document.

Used by ``aiolm bench`` (printed after the table) and by ``scripts/plot_benchmarks.py``
(the benchmarks page), so both say the same thing about what is met and what is missed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs

__all__ = ["GOALS", "Goal", "GoalResult", "check_goals", "format_goals"]

_PREFIX_HEAVY = ("few-shot", "select", "tree-of-thought", "multi-turn", "react", "judge")


@attrs.frozen(kw_only=True)
class Goal:
    """``workload``'s figure ``figure`` (a ratio key like ``aiolm/radix-off`` or a figure of
    the ``aiolm`` run) must reach ``target``; ``gpu_only`` goals are not judged on a CPU."""

    workload: str
    figure: str
    target: float
    what: str
    gpu_only: bool = False


@attrs.frozen(kw_only=True)
class GoalResult:
    goal: Goal
    value: float | None       # None: not measured in this document
    judged: bool              # False: a GPU goal on a CPU document, or not measured

    @property
    def met(self) -> bool:
        return self.value is not None and self.value >= self.goal.target


GOALS: tuple[Goal, ...] = (
    *(Goal(workload=w, figure="aiolm/hf", target=5.0, what=f"{w}: aiolm vs transformers",
           gpu_only=True) for w in _PREFIX_HEAVY),
    Goal(workload="few-shot", figure="aiolm/radix-off", target=3.0, what="few-shot: radix cache on vs off",
         gpu_only=True),
    Goal(workload="select", figure="aiolm/radix-off", target=3.0, what="select: radix cache on vs off",
         gpu_only=True),
    Goal(workload="few-shot", figure="aiolm/fcfs", target=1.2,
         what="few-shot, subjects interleaved: lpm vs fcfs"),
    Goal(workload="tree-of-thought", figure="hit_rate_vs_optimal", target=0.96,
         what="tree-of-thought: hit rate / DFS-optimal"),
    Goal(workload="judge", figure="hit_rate_vs_optimal", target=0.96, what="judge: hit rate / DFS-optimal"),
    Goal(workload="json-decode", figure="aiolm/jump-forward-off", target=1.6,
         what="json-decode: jump-forward on vs off"),
    Goal(workload="api-spec", figure="aiolm/spec-off", target=2.5,
         what="api-spec: calls without / with speculation"),
)


def _value(record: dict[str, Any], figure: str) -> float | None:
    if figure.startswith("aiolm/"):
        return record.get("ratios", {}).get(figure)
    return record.get("runs", {}).get("aiolm", {}).get(figure)


def check_goals(document: dict[str, Any], goals: Iterable[Goal] = GOALS) -> list[GoalResult]:
    """Every goal whose workload is in ``document``, with its value from that document."""
    on_gpu = document.get("device", {}).get("kind") == "cuda"
    records = {r["name"]: r for r in document.get("workloads", [])}
    out = []
    for goal in goals:
        record = records.get(goal.workload)
        if record is None:
            continue
        value = _value(record, goal.figure)
        out.append(GoalResult(goal=goal, value=value, judged=value is not None and (on_gpu or not goal.gpu_only)))
    return out


def format_goals(results: Iterable[GoalResult]) -> str:
    """One line per goal: MET / MISSED / (GPU goal) / NOT MEASURED, with the figure."""
    lines = []
    for r in results:
        shown = "-" if r.value is None else (
            f"{100 * r.value:.1f}%" if r.goal.target < 1.0 else f"{r.value:.2f}x")
        target = f"{100 * r.goal.target:.0f}%" if r.goal.target < 1.0 else f"{r.goal.target:g}x"
        if r.value is None:
            status = "NOT MEASURED"
        elif not r.judged:
            status = "(GPU goal)"
        else:
            status = "MET" if r.met else "MISSED"
        lines.append(f"{status:<13} {r.goal.what}: {shown} (goal >= {target})")
    return "\n".join(lines)
