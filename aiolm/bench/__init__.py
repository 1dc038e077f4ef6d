"""The paper's evaluation as ``aiolm bench``: workloads, ablations, peers and results.

Each workload is a real aiolm program fed by a seeded generator of synthetic data with the
shapes of the paper's data sets (:mod:`aiolm.bench.synth`); :mod:`aiolm.bench.harness` runs
it once per variant (aiolm, each ablation, the transformers peer) and measures the same
figures for each; :mod:`aiolm.bench.cli` is the command line. See ``docs/benchmarks.md``.
"""

from __future__ import annotations

from . import (
    api_spec,
    decode_bs1,
    few_shot,
    json_decode,
    judge,
    multi_turn,
    react,
    select,
    throughput,
    tree_of_thought,
)
from .workload import Workload

__all__ = ["WORKLOADS", "Workload"]

#: Every workload by its command-line name, in BENCH.md's order.
WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        decode_bs1.WORKLOAD,
        throughput.WORKLOAD,
        few_shot.WORKLOAD,
        select.WORKLOAD,
        tree_of_thought.WORKLOAD,
        multi_turn.WORKLOAD,
        react.WORKLOAD,
        judge.WORKLOAD,
        json_decode.WORKLOAD,
        api_spec.WORKLOAD,
    )
}
