"""Decode steps riding along in extend passes (``mix_decode``, issue 11): the same results
as separate decode passes, in fewer passes.

A running request that misses only its next token joins the extend pass of a
jump-forward, a chunk of prefill or a newly admitted prompt, instead of waiting for the
next decode pass (which would read every weight again for it). Tokens, text, stops and
constrained outputs must not change; the KV accounting must be clean once idle; the riding
requests are not cached at that pass (as in a decode pass).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from mini_model import PROMPTS, load_tiny
from test_engine_overlap import assert_same_logprobs, clean, concurrently, summary

from aiolm.backends.engine import Engine, LoadedModel
from aiolm.cache.pool import ReqToTokenPool, TokenSlotAllocator
from aiolm.cache.radix import RadixCache
from aiolm.constraints import JSONSchema, Regex
from aiolm.engine.forward_batch import ForwardMode
from aiolm.engine.request import Req
from aiolm.engine.scheduler import Scheduler
from aiolm.sampling import SamplingParams

pytestmark = pytest.mark.anyio

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return load_tiny()


def _scheduler(mix: bool, riders_in_flight: bool = False) -> Scheduler:
    allocator = TokenSlotAllocator(256)
    pool = ReqToTokenPool(8, 64)
    return Scheduler(cache=RadixCache(allocator), allocator=allocator, req_to_token_pool=pool,
                     chunked_prefill_size=32, mix_decode=mix, riders_in_flight=riders_in_flight)


def _running(sched: Scheduler, rid: str, ids: list[int]) -> Req:
    """A request prefilled and given one sampled token: it misses exactly that token."""
    req = Req(rid=rid, input_ids=ids, sampling=SamplingParams(max_tokens=8))
    sched.add(req)
    mix, sched.mix_decode = sched.mix_decode, False  # set up one request at a time
    batch = sched.schedule()
    sched.mix_decode = mix
    assert batch is not None and batch.reqs == [req]
    sched.process_result(batch)
    req.all_ids.append(7)
    return req


@pytest.mark.parametrize("mix", [True, False])
def test_a_new_prompt_takes_the_decoding_requests_along_only_when_mixing(mix):
    sched = _scheduler(mix)
    a = _running(sched, "a", [1, 2, 3, 4])
    b = _running(sched, "b", [5, 6, 7])
    fresh = Req(rid="c", input_ids=[9, 10, 11, 12, 13], sampling=SamplingParams(max_tokens=4))
    sched.add(fresh)
    batch = sched.schedule()
    assert batch.mode is ForwardMode.EXTEND
    if mix:
        assert batch.reqs == [fresh, a, b]
        assert batch.extend_lens == [5, 1, 1] and batch.prefix_lens == [0, 4, 3]
        assert batch.sample_mask == [True, True, True] and batch.decode_start == 1
        assert batch.out_cache_loc.numel() == 7
        # Their slots are recorded where their next token goes.
        assert sched.req_to_token_pool.read(a.req_pool_idx, 4, 5).tolist() == \
            batch.out_cache_loc[5:6].tolist()
    else:
        assert batch.reqs == [fresh]
    sched.process_result(batch)
    if mix:
        assert a.kv_len == 5 and b.kv_len == 4 and fresh.kv_len == 5
        # The riders were not cached by this pass (a decode pass would not cache them).
        assert a.locked_len == 4 and b.locked_len == 3
    for r in (a, b, fresh):
        sched.abort(r.rid)
    assert sched.allocator.available_size() + sched.cache.evictable_size() == 256


@pytest.mark.parametrize("in_flight", [False, True])
def test_riders_stay_within_the_pass_budget_and_ride_in_flight_only_when_asked(in_flight):
    sched = _scheduler(True, riders_in_flight=in_flight)
    riders = [_running(sched, f"r{i}", [20 + i, 30, 40]) for i in range(4)]
    riders[0].all_ids[-1] = -1      # a placeholder: its token is still in flight
    riders[0].pending = 1
    long = Req(rid="long", input_ids=list(range(100, 130)), sampling=SamplingParams(max_tokens=2))
    sched.add(long)
    batch = sched.schedule()
    # 30 prompt tokens of a 32-token budget: two riders fit, the one in flight only if asked.
    assert batch.reqs == [long, *(riders[:2] if in_flight else riders[1:3])]
    assert sum(batch.extend_lens) == 32 and batch.decode_start == 1
    for r in (*riders, long):
        sched.abort(r.rid)
    assert sched.allocator.available_size() + sched.cache.evictable_size() == 256


def test_riders_that_finished_before_launch_leave_the_batch():
    sched = _scheduler(True)
    a = _running(sched, "a", [1, 2, 3])
    b = _running(sched, "b", [4, 5, 6])
    fresh = Req(rid="c", input_ids=[9, 10, 11, 12], sampling=SamplingParams(max_tokens=2))
    sched.add(fresh)
    batch = sched.schedule()
    assert batch.reqs == [fresh, a, b]
    rider_slot_b = batch.out_cache_loc[5:6].tolist()
    sched.abort("a")                 # e.g. it stopped in the step processed meanwhile
    kept = sched.without_finished_riders(batch)
    assert kept.reqs == [fresh, b] and kept.extend_lens == [4, 1]
    assert kept.out_cache_loc.tolist() == batch.out_cache_loc[:4].tolist() + rider_slot_b
    assert sched.without_finished_riders(kept) is kept
    for r in (b, fresh):
        sched.abort(r.rid)
    assert sched.allocator.available_size() + sched.cache.evictable_size() == 256


def count_riders_in_flight(sched: Scheduler) -> list[int]:
    """Wraps ``sched.schedule``; the returned one-item list counts the riders whose token
    was still in flight when their extend pass was scheduled."""
    schedule, count = sched.schedule, [0]

    def scheduling() -> Any:
        batch = schedule()
        if batch is not None and batch.decode_start is not None:
            count[0] += sum(1 for r in batch.reqs[batch.decode_start:] if r.pending)
        return batch

    sched.schedule = scheduling
    return count


async def _compare(tiny: LoadedModel, requests: list[dict[str, Any]],
                   riders_in_flight: bool = False, **options: Any
                   ) -> tuple[list[Any], list[Any], list[int], list[int]]:
    """Both runs' completions, how many riders each run's passes carried, and how many of
    them had their token in flight when their pass was scheduled."""
    results, riders, in_flight = [], [], []
    for mix in (False, True):
        async with Engine(tiny, mix_decode=mix, max_total_tokens=4096, **options) as eng:
            sched = eng._core.scheduler
            sched.riders_in_flight = riders_in_flight
            launched, count = sched.launched, [0]

            def counting(batch: Any, launched: Any = launched, count: list = count) -> None:
                if batch.decode_start is not None:
                    count[0] += len(batch.reqs) - batch.decode_start
                launched(batch)

            sched.launched = counting
            pending = count_riders_in_flight(sched)
            results.append(await concurrently(eng, requests))
            riders.append(count[0])
            in_flight.append(pending[0])
            await clean(eng)
    return results[0], results[1], riders, in_flight


@pytest.mark.parametrize(("overlap", "in_flight"), [(False, False), (True, False), (True, True)])
async def test_jump_forward_with_riders_gives_the_same_outputs(tiny, overlap, in_flight):
    requests = []
    for i, p in enumerate(PROMPTS):
        requests.append(dict(input_ids=p, max_tokens=60, constraint=JSONSchema(SCHEMA),
                             logprobs=i % 2 == 0))
        requests.append(dict(input_ids=p, max_tokens=30, constraint=Regex(r"[a-z]{2,6} [0-9]{2}")))
        requests.append(dict(input_ids=p, max_tokens=12 + i, ignore_eos=True, logprobs=True))
    off, on, riders, pending = await _compare(tiny, requests, riders_in_flight=in_flight,
                                              overlap=overlap)
    assert [summary(d) for d in on] == [summary(d) for d in off]
    for a, b in zip(off, on, strict=True):
        assert_same_logprobs(a, b)
    values = [json.loads(d.text) for d in on[0::3] if d.finish_reason == "stop"]
    assert values and all(set(v) == {"name", "age"} for v in values)
    # Pass counts depend on when each request reached the loop; riders do not happen
    # without mixing, and with it the jump-forwards carry decode steps along.
    assert riders[0] == 0 and riders[1] > 0


async def test_chunked_prefill_with_riders_gives_the_same_tokens(tiny):
    long_prompts = [[(7 * i + j) % 300 + 3 for j in range(90)] for i in range(3)]
    requests = [dict(input_ids=p, max_tokens=10, ignore_eos=True) for p in PROMPTS]
    requests += [dict(input_ids=p, max_tokens=5, ignore_eos=True) for p in long_prompts]
    off, on, _, _ = await _compare(tiny, requests, chunked_prefill_size=32)
    assert [summary(d) for d in on] == [summary(d) for d in off]


async def test_riders_with_tokens_in_flight_give_the_same_tokens(tiny):
    """The overlapped loop, nine short prompts decoding (each asked twice: generated, and
    streamed to know when all decode) when two prompts arrive: the extend passes of those
    take the decode steps along although their tokens are still
    in flight (taken on the device, or once the step in flight is processed before an
    extend that may not queue behind it); the same tokens and logprobs as without riders."""
    import anyio

    short = [[5 + i, 17, 200 - i] for i in range(9)]
    long = [[(5 * i + j) % 300 + 3 for j in range(40)] for i in range(2)]
    runs, in_flight = [], []
    for mix in (False, True):
        done: list[Any] = [None] * (len(short) + len(long))
        seen = [0] * len(short)
        started = anyio.Event()
        async with Engine(tiny, mix_decode=mix, max_total_tokens=4096, overlap=True,
                          chunked_prefill_size=64) as eng:
            sched = eng._core.scheduler
            sched.riders_in_flight = True
            pending = count_riders_in_flight(sched)

            async def streamed(i: int, prompt: list[int], eng: Engine = eng,
                               seen: list = seen, started: anyio.Event = started) -> None:
                async with eng.stream(input_ids=prompt, max_tokens=24, ignore_eos=True,
                                      logprobs=True) as chunks:
                    async for chunk in chunks:
                        seen[i] += len(chunk.token_ids)
                        if all(n >= 2 for n in seen):
                            started.set()

            async def one(i: int, request: dict[str, Any], eng: Engine = eng,
                          done: list = done) -> None:
                done[i] = await eng.generate(**request)

            async with anyio.create_task_group() as tg:
                for i, p in enumerate(short):
                    tg.start_soon(one, i, dict(input_ids=p, max_tokens=24, ignore_eos=True,
                                               logprobs=True))
                    tg.start_soon(streamed, i, p)
                await started.wait()   # all nine decoding: now the two prompts
                for j, p in enumerate(long):
                    tg.start_soon(one, len(short) + j, dict(input_ids=p, max_tokens=6,
                                                            ignore_eos=True, logprobs=True))
            await clean(eng)
        runs.append(done)
        in_flight.append(pending[0])
    off, on = runs
    assert [summary(d) for d in on] == [summary(d) for d in off]
    for a, b in zip(off, on, strict=True):
        assert_same_logprobs(a, b)
    assert in_flight[0] == 0 and in_flight[1] > 0


@pytest.mark.parametrize(("overlap", "in_flight"), [(False, False), (True, False), (True, True)])
async def test_riders_beside_streams_that_stop_and_abort_leave_the_engine_clean(tiny, overlap,
                                                                                  in_flight):
    """Requests stopping, hitting max_tokens and being cancelled while others prefill in
    chunks (riders finish in the step processed before an extend launches, or with a token
    in flight): the same tokens as without riders, and nothing leaks (``clean``)."""
    import anyio

    long_prompts = [[(11 * i + j) % 300 + 3 for j in range(70)] for i in range(4)]
    requests = [dict(input_ids=p, max_tokens=3 + i, ignore_eos=True) for i, p in enumerate(PROMPTS)]
    requests += [dict(input_ids=p, max_tokens=4, ignore_eos=True) for p in long_prompts]
    outs = []
    for mix in (False, True):
        async with Engine(tiny, mix_decode=mix, max_total_tokens=4096, overlap=overlap,
                          chunked_prefill_size=16) as eng:
            eng._core.scheduler.riders_in_flight = in_flight
            async def cancelled(p: list[int], eng: Engine = eng) -> None:
                async with eng.stream(input_ids=p, max_tokens=40, ignore_eos=True) as chunks:
                    async for _ in chunks:
                        break

            async with anyio.create_task_group() as tg:
                for p in PROMPTS[:3]:
                    tg.start_soon(cancelled, p)
                outs.append(await concurrently(eng, requests))
            await clean(eng)
    assert [summary(d) for d in outs[1]] == [summary(d) for d in outs[0]]
