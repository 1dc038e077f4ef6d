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


def test_engines_one_after_another_get_the_same_kv_pool():
    """A closed engine gives its memory back: ``aiolm bench``'s variants run one engine
    after another in one process, and each sized its KV pool from the free memory, which
    still counted the last engine's cached blocks (nvidia-h200, llava-next-7b: the variants'
    pools differed, and with them the passes a workload took, 137 against 336)."""
    from aiolm.backends.engine import Engine
    from aiolm.bench.models import load_for_bench

    loaded = load_for_bench("llama-3-8b", load_format="dummy", seed=0, device="cuda",
                            dtype="auto")

    async def pool_size(**options):
        async with Engine(loaded, **options) as engine:
            await engine.generate(input_ids=[1, 2, 3], max_tokens=4, ignore_eos=True)
            return engine.statistics().total_kv_slots

    async def main():
        return [await pool_size(enable_radix_cache=flag) for flag in (True, False, True)]

    sizes = anyio.run(main)
    assert max(sizes) - min(sizes) <= 0.02 * max(sizes), sizes
