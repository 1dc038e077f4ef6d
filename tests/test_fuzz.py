"""The random-program fuzzer: silent on a sound engine, loud on a planted fault.

The weights load once per module (a tiny random Llama with the bench tokenizer); each test
opens its own small engine over them, small enough that bursts of requests retract.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from aiolm.backends.base import Completion, TokenLogprob, Usage
from aiolm.backends.engine import Engine, LoadedModel
from aiolm.bench.fuzz import first_greedy_mismatch, fuzz_engine, program_seed
from aiolm.bench.models import load_for_bench

pytestmark = pytest.mark.anyio

SEED = 7


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return load_for_bench("tiny-llama", load_format="dummy", device="cpu", seed=0)


def engine(tiny: LoadedModel, **options: Any) -> Engine:
    return Engine(tiny, max_total_tokens=1024, max_running_requests=16, chunked_prefill_size=256,
                  **options)


@pytest.mark.parametrize("overlap", [False, True])
async def test_fuzzer_finds_nothing_on_a_sound_engine(tiny, overlap):
    """Also with the overlapped loop, where decode steps whose token is still in flight
    ride along in extend passes (``riders_in_flight``)."""
    async with engine(tiny, overlap=overlap) as eng:
        report = await fuzz_engine(eng, seed=SEED, programs=48)
    assert report.ok(), report.faults
    assert report.programs == 48 and report.requests > report.programs
    assert report.integrity_checks == 3          # one per round of 16
    # The paths the fuzzer exists for did run:
    assert report.retractions > 0
    assert report.cancelled > 0
    assert report.dropped_streams > 0
    assert json.loads(json.dumps(report.as_dict()))["faults"] == []


async def test_a_planted_double_free_is_found(tiny, monkeypatch):
    async with engine(tiny) as eng:
        allocator = eng._core.runner.allocator
        free, planted = allocator.free, []

        def free_one_slot_twice(slots):
            free(slots)
            if not planted and slots.numel():
                planted.append(int(slots[0]))
                free(slots[:1])

        monkeypatch.setattr(allocator, "free", free_one_slot_twice)
        report = await fuzz_engine(eng, seed=SEED, programs=32)
    assert planted
    assert not report.ok()
    # Either the integrity check after the round finds it, or (AIOLM_DEBUG_CHECKS) the slot
    # handed out twice stops the engine loop first, failing the programs in flight.
    assert any(f.kind == "integrity" for f in report.faults) \
        or "DebugCheckError" in " ".join(f.message for f in report.faults)
    for fault in report.faults:
        assert fault.seed == program_seed(SEED, fault.program)
    assert report.programs == 16                 # a broken engine ends the run


async def test_a_planted_leak_is_found(tiny, monkeypatch):
    async with engine(tiny) as eng:
        allocator = eng._core.runner.allocator
        free, skipped = allocator.free, []

        def skip_one_free(slots):
            if not skipped and slots.numel():
                skipped.append(slots.numel())
                return
            free(slots)

        monkeypatch.setattr(allocator, "free", skip_one_free)
        report = await fuzz_engine(eng, seed=SEED, programs=16)
    assert skipped
    assert [f.kind for f in report.faults] == ["integrity"]
    assert "leaked" in report.faults[0].message
    assert report.faults[0].seed == program_seed(SEED, 0)


async def test_a_planted_wrong_recompute_is_found(tiny, monkeypatch):
    async with engine(tiny) as eng:
        scheduler = eng._core.scheduler
        retract, corrupted = scheduler._retract_latest, []

        def retract_and_forget_the_last_token():
            latest = max(scheduler.running, key=lambda r: r.arrival)
            retract()
            if latest.output_ids:    # recomputed later from a wrong token
                latest.output_ids[-1] = (latest.output_ids[-1] + 1) % 512
                corrupted.append(latest.rid)

        monkeypatch.setattr(scheduler, "_retract_latest", retract_and_forget_the_last_token)
        report = await fuzz_engine(eng, seed=SEED, programs=48)
    assert corrupted
    assert report.faults and {f.kind for f in report.faults} == {"mismatch"}
    assert all("twin" in f.message or "alone" in f.message for f in report.faults)


async def test_duration_ends_the_run_at_a_round_boundary(tiny):
    async with engine(tiny) as eng:
        report = await fuzz_engine(eng, seed=SEED + 1, duration_s=0.01, round_size=4)
    assert report.ok(), report.faults
    assert report.programs == 4 and report.integrity_checks == 1


async def test_fuzz_engine_needs_a_count_or_a_duration():
    with pytest.raises(ValueError, match="programs, duration_s"):
        await fuzz_engine(None, seed=0)
    with pytest.raises(ValueError, match="round_size"):
        await fuzz_engine(None, seed=0, programs=4, round_size=0)


def completion(tokens: list[int], tops: list[list[tuple[int, float]]] | None = None) -> Any:
    logprobs = tuple(
        TokenLogprob(token_id=t, token="", logprob=top[0][1],
                     top=tuple((tid, "", lp) for tid, lp in top))
        for t, top in zip(tokens, tops or [], strict=False)
    )
    return Completion(text="", token_ids=tuple(tokens), logprobs=logprobs,
                      finish_reason="length", usage=Usage(completion_tokens=len(tokens)))


def test_first_greedy_mismatch_accepts_only_near_ties():
    tops = [[(5, -0.1), (6, -3.0)], [(7, -1.0), (8, -1.0005)], [(9, -0.2), (4, -2.5)]]
    reference = completion([5, 7, 9], tops)
    assert first_greedy_mismatch(reference, completion([5, 7, 9]), 1e-3) is None
    # A near-tie at token 1 may flip; comparison stops there.
    assert first_greedy_mismatch(reference, completion([5, 8, 1]), 1e-3) is None
    message = first_greedy_mismatch(reference, completion([6, 7, 9]), 1e-3)
    assert message is not None and message.startswith("token 0: 6 instead of 5")
    assert first_greedy_mismatch(reference, completion([6, 7, 9]), 5.0) is None
    # A token outside the reference's top 2: a mismatch unless the top 2 themselves tie.
    assert "top 2" in first_greedy_mismatch(reference, completion([5, 7, 3]), 1e-3)
    assert first_greedy_mismatch(reference, completion([5, 3, 9]), 1e-3) is None
    assert "2 tokens instead of" in first_greedy_mismatch(reference, completion([5, 7]), 1e-3)
