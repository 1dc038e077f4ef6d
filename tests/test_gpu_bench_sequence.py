"""The sequence that crashed the CUDA context (issue "the GPU engine under real traffic").

``aiolm bench select tree-of-thought --dummy llama-3-8b --size full --ablate radix`` ran
``select`` and then ``tree-of-thought`` on one engine with the radix cache off, and the
second died with an illegal memory access in flashinfer's SM90 paged prefill (the
``hybrid`` backend ``auto`` picks when flashinfer imports): the kernel read page indices
past the end of the index list (see ``KV_INDICES_PAD`` in
aiolm/engine/attention/flashinfer.py). The same plan runs here, in this process, with
``AIOLM_DEBUG_CHECKS`` on (tests/conftest.py); every variant must finish and leave its
engine sound.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
anyio = pytest.importorskip("anyio")

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(600)]


def test_select_then_tree_of_thought_with_the_radix_cache_off_in_one_engine():
    from aiolm.bench import WORKLOADS
    from aiolm.bench.harness import plan, run_plan
    from aiolm.bench.targets import EngineTarget

    target = EngineTarget("llama-3-8b", load_format="dummy", device="cuda")

    async def main():
        steps = plan([WORKLOADS["select"], WORKLOADS["tree-of-thought"]], target, size="full",
                     ablations=["radix"])
        names = [(s.workload.name, s.variant.name) for s in steps]
        # One engine per settings: select's and tree-of-thought's radix-off runs share one.
        assert names.index(("select", "radix-off")) + 1 == names.index(
            ("tree-of-thought", "radix-off"))
        try:
            records = await run_plan(steps, size="full")
            report = await target._open[1].check_integrity()  # the last variant's engine
        finally:
            await target.aclose()
        return records, report

    records, report = anyio.run(main)
    for record in records:
        assert record["errors"] == {}, record["errors"]
        assert set(record["runs"]) == {"aiolm", "radix-off"}
        assert record["runs"]["radix-off"]["cache_hit_rate"] == 0.0
    assert report.idle and report.request_slots == 0 and report.locked_tokens == 0
    torch.cuda.synchronize()  # the context is sound
