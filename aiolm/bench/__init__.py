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
    image_qa,
    json_decode,
    judge,
    multi_turn,
    react,
    select,
    throughput,
    tree_of_thought,
    video_qa,
)
from .workload import Workload

__all__ = ["ALL_WORKLOADS", "MULTIMODAL_WORKLOADS", "WORKLOADS", "Workload"]

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


#: The workloads that need a multimodal model (``--dummy llava-1.5-7b``, ``qwen2.5-vl-7b``):
#: run by name, never by a suite (whose model is a text model).
MULTIMODAL_WORKLOADS: dict[str, Workload] = {
    w.name: w for w in (image_qa.WORKLOAD, image_qa.FORK_WORKLOAD, video_qa.WORKLOAD)
}

#: Every workload ``aiolm bench`` runs by name.
ALL_WORKLOADS: dict[str, Workload] = {**WORKLOADS, **MULTIMODAL_WORKLOADS}
