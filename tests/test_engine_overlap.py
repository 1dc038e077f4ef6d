"""The overlapped engine loop gives what the loop that does not overlap gives (issue 11).

Each scenario runs twice over the same tiny random model (with a small real tokenizer, so
text, stop strings and constraints do real work): ``overlap=False`` then ``overlap=True``
(on the CPU the overlapped loop has no asynchronous device, but its structure is the same:
tokens stand as placeholders until the step after, the step in flight is processed after
the next is launched). Tokens, text, stop positions and usage must be equal; logprobs
equal to 1e-5 (a batch of another size may round its last bits differently); and the KV
accounting clean once idle. Also: the request's one token list, the scheduler's fcfs
fallback for long queues, and the streaming detokenizer.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mini_model import PROMPTS, load_tiny

from aiolm import gen, program, select
from aiolm.backends.engine import Engine, LoadedModel
from aiolm.cache.pool import ReqToTokenPool, TokenSlotAllocator
from aiolm.cache.radix import RadixCache
from aiolm.constraints import JSONSchema, Regex
from aiolm.engine.request import Req
from aiolm.engine.scheduler import Scheduler
from aiolm.sampling import SamplingParams

pytestmark = pytest.mark.anyio

@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return load_tiny()


async def clean(eng: Engine) -> None:
    report = await eng.check_integrity()
    assert report.idle
    assert report.request_slots == report.locked_tokens == report.rows_in_use == 0


def watch(eng: Engine) -> dict[str, int]:
    """Counts what only the overlapped loop does: requests that finished with a token in
    flight (dropped), requests aborted while a step computing them was in flight, requests
    retracted with a token in flight."""
    core = eng._core
    seen = {"dropped": 0, "aborted_in_flight": 0, "retracted_in_flight": 0}
    sched = core.scheduler
    drop, abort, retract = sched.drop_in_flight, core._abort, sched._retract_latest

    def counting_retract() -> None:
        seen["retracted_in_flight"] += max(sched.running, key=lambda r: r.arrival).pending > 0
        retract()

    def counting_drop(req: Any, tokens: int) -> None:
        seen["dropped"] += tokens > 0
        drop(req, tokens)

    def counting_abort(rid: str, events: Any, error: Any) -> None:
        flight = core._in_flight
        if flight is not None and any(r.rid == rid for r in flight.step.batch.reqs):
            seen["aborted_in_flight"] += 1
        abort(rid, events, error)

    sched.drop_in_flight, core._abort = counting_drop, counting_abort
    sched._retract_latest = counting_retract
    return seen


async def both(tiny: LoadedModel, scenario: Any, **options: Any) -> tuple[list[Any], dict]:
    """``scenario(engine)``'s result with the loop not overlapped, then overlapped; and what
    the overlapped run did (:func:`watch`)."""
    options.setdefault("max_total_tokens", 4096)
    results = []
    for overlap in (False, True):
        async with Engine(tiny, overlap=overlap, **options) as eng:
            assert eng._core.overlap is overlap
            seen = watch(eng)
            results.append(await scenario(eng))
            await clean(eng)
    return results, seen


def summary(done: Any) -> tuple:
    """A completion without its logprobs (compared apart, to a tolerance) and without its
    cached prompt tokens: whether concurrent requests with one prompt share its prefill
    depends on how many reached the loop before its first pass, in either loop."""
    usage = done.usage
    return (done.token_ids, done.text, done.finish_reason, done.matched_stop,
            usage.prompt_tokens, usage.completion_tokens)


def assert_same_logprobs(a: Any, b: Any) -> None:
    assert len(a.logprobs) == len(b.logprobs)
    for x, y in zip(a.logprobs, b.logprobs, strict=True):
        assert (x.token_id, x.token) == (y.token_id, y.token)
        assert x.logprob == pytest.approx(y.logprob, abs=1e-5)
        assert [t for t, _, _ in x.top] == [t for t, _, _ in y.top]
        assert [lp for *_, lp in x.top] == pytest.approx([lp for *_, lp in y.top], abs=1e-5)


async def concurrently(eng: Engine, requests: list[dict[str, Any]]) -> list[Any]:
    """Every request at once; their completions in order."""
    out: list[Any] = [None] * len(requests)

    async def one(i: int) -> None:
        out[i] = await eng.generate(**requests[i])

    async with anyio.create_task_group() as tg:
        for i in range(len(requests)):
            tg.start_soon(one, i)
    return out


# ------------------------------------------------------------------ greedy decoding


async def test_greedy_tokens_and_logprobs_are_those_of_the_loop_that_does_not_overlap(tiny):
    requests = [dict(input_ids=p, max_tokens=6 + 5 * i, ignore_eos=True, logprobs=True,
                     top_logprobs=3) for i, p in enumerate(PROMPTS)]
    (off, on), _ = await both(tiny, lambda eng: concurrently(eng, requests))
    assert [summary(d) for d in on] == [summary(d) for d in off]
    for a, b in zip(off, on, strict=True):
        assert_same_logprobs(a, b)
    assert [len(d.token_ids) for d in on] == [6 + 5 * i for i in range(len(PROMPTS))]


async def test_stops_end_at_the_same_token_with_the_same_text(tiny):
    async def reference(eng: Engine) -> list[Any]:
        return await concurrently(eng, [dict(input_ids=p, max_tokens=24, ignore_eos=True)
                                        for p in PROMPTS])

    async with Engine(tiny, max_total_tokens=4096, overlap=False) as eng:
        ref = await reference(eng)
    requests = []
    for i, (p, done) in enumerate(zip(PROMPTS, ref, strict=True)):
        stop_id = done.token_ids[8 + i]        # a token in the middle ends it there
        requests.append(dict(input_ids=p, max_tokens=24, ignore_eos=True,
                             stop_token_ids=[stop_id]))
        middle = done.text[len(done.text) // 2:len(done.text) // 2 + 2]
        if middle.strip():                     # a stop string from the middle of its text
            requests.append(dict(input_ids=p, max_tokens=24, ignore_eos=True, stop=[middle]))
        requests.append(dict(input_ids=p, max_tokens=3 + i, ignore_eos=True))
        requests.append(dict(input_ids=p, max_tokens=24, min_tokens=12, ignore_eos=True,
                             stop_token_ids=[stop_id]))   # the ban counts tokens in flight
    (off, on), seen = await both(tiny, lambda eng: concurrently(eng, requests))
    assert [summary(d) for d in on] == [summary(d) for d in off]
    assert seen["dropped"] > 0
    reasons = [d.finish_reason for d in on]
    assert reasons.count("stop") >= len(PROMPTS) and "length" in reasons
    assert any(isinstance(d.matched_stop, str) for d in on)


async def test_a_request_stopped_with_a_token_in_flight_leaves_what_the_other_loop_leaves(tiny):
    """A request that stops at step N was computed once more at step N+1 by the overlapped
    loop: that token is dropped and its slot freed, and the prefix cache holds what the
    loop that does not overlap caches."""
    async with Engine(tiny, max_total_tokens=4096, overlap=False) as eng:
        ref = await concurrently(eng, [dict(input_ids=p, max_tokens=30, ignore_eos=True)
                                       for p in PROMPTS])

    async def scenario(eng: Engine) -> tuple[Any, ...]:
        done = await concurrently(eng, [dict(input_ids=p, max_tokens=30, ignore_eos=True,
                                             stop_token_ids=[r.token_ids[5 + 3 * i]])
                                        for i, (p, r) in enumerate(zip(PROMPTS, ref,
                                                                       strict=True))])
        stats = eng.statistics()
        return (tuple(summary(d) for d in done), stats.cached_kv_tokens,
                stats.completion_tokens, stats.free_kv_slots)

    (off, on), seen = await both(tiny, scenario)
    assert on == off
    assert all(reason == "stop" for _, _, reason, *_ in on[0])
    assert seen["dropped"] >= len(PROMPTS) - 1


async def test_seeded_sampling_and_penalties_match(tiny):
    requests = []
    for i, p in enumerate(PROMPTS):
        requests.append(dict(input_ids=p, max_tokens=12, temperature=0.9, seed=100 + i,
                             ignore_eos=True, logprobs=True))
        requests.append(dict(input_ids=p, max_tokens=12, frequency_penalty=0.8,
                             presence_penalty=0.5, ignore_eos=True))   # runs serialized
        requests.append(dict(input_ids=p, max_tokens=12, logit_bias={11: 5.0},
                             ignore_eos=True))
    (off, on), _ = await both(tiny, lambda eng: concurrently(eng, requests))
    assert [summary(d) for d in on] == [summary(d) for d in off]
    for a, b in zip(off, on, strict=True):
        assert_same_logprobs(a, b)


async def test_a_small_pool_retracts_with_identical_outputs(tiny):
    requests = [dict(input_ids=p, max_tokens=40, ignore_eos=True) for p in PROMPTS]

    async def scenario(eng: Engine) -> tuple[Any, int]:
        done = await concurrently(eng, requests)
        return [summary(d)[:3] for d in done], eng.statistics().retractions

    ((off, off_retractions), (on, on_retractions)), seen = await both(tiny, scenario,
                                                              max_total_tokens=120)
    assert on == off
    assert off_retractions > 0 and on_retractions > 0
    assert seen["retracted_in_flight"] > 0


# ------------------------------------------------------------------ constraints


async def test_constrained_outputs_match_beside_unconstrained_requests(tiny):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    requests = []
    for i, p in enumerate(PROMPTS):
        requests.append(dict(input_ids=p, max_tokens=30, constraint=Regex(r"[a-z]{2,6} [0-9]{2}")))
        requests.append(dict(input_ids=p, max_tokens=60, constraint=JSONSchema(schema),
                             logprobs=i % 2 == 0))
        requests.append(dict(input_ids=p, max_tokens=10 + i, ignore_eos=True))
    (off, on), _ = await both(tiny, lambda eng: concurrently(eng, requests))
    assert [summary(d) for d in on] == [summary(d) for d in off]
    for a, b in zip(off, on, strict=True):
        assert_same_logprobs(a, b)
    finished = [d for d in on[0::3] if d.finish_reason == "stop"]
    assert finished and all(re.fullmatch(r"[a-z]{2,6} [0-9]{2}", d.text) for d in finished)
    values = [json.loads(d.text) for d in on[1::3] if d.finish_reason == "stop"]
    assert values and all(set(v) == {"name", "age"} for v in values)


# ------------------------------------------------------------------ programs


@program
async def branches(s, topic: str):
    s += topic
    async with s.fork(3) as forks:
        forks += lambda i: f" {i}." + gen("idea", max_tokens=6, ignore_eos=True)
    forks.join()
    s += " so" + select("pick", choices=["hello world", "the quick brown fox", "about the house"])
    s += gen("end", max_tokens=5, ignore_eos=True)


async def test_forks_sharing_a_prefix_and_select_match(tiny):
    async def scenario(eng: Engine) -> list[Any]:
        states = await branches.run_batch([{"topic": t} for t in
                                           ("hello world", "the quick brown", "about")],
                                          backend=eng)
        assert all(st.error is None for st in states)
        return [(st["idea"], st["pick"], st["end"]) for st in states]

    (off, on), _ = await both(tiny, scenario)
    assert on == off


async def test_n_completions_of_one_prompt_share_its_prefix(tiny):
    async def scenario(eng: Engine) -> tuple[Any, ...]:
        done = await concurrently(eng, [dict(input_ids=PROMPTS[5], max_tokens=10,
                                             temperature=0.8, seed=s, ignore_eos=True)
                                        for s in range(4)])
        return tuple(summary(d)[:3] for d in done), eng.statistics().cached_kv_tokens

    (off, on), _ = await both(tiny, scenario)
    assert on == off


# ------------------------------------------------------------------ aborts


async def test_a_stream_left_mid_step_frees_everything_while_others_go_on(tiny):
    others = [dict(input_ids=p, max_tokens=20, ignore_eos=True) for p in PROMPTS[:4]]

    async def scenario(eng: Engine) -> list[Any]:
        out: list[Any] = [None] * len(others)
        got: list[int] = []

        async def leaver(ids: list[int], after: int) -> None:
            async with eng.stream(input_ids=ids, max_tokens=500, ignore_eos=True) as chunks:
                async for _chunk in chunks:
                    got.append(1)
                    if len(got) % after == 0:
                        break

        async def one(i: int) -> None:
            out[i] = await eng.generate(**others[i])

        async with anyio.create_task_group() as tg:
            for i in range(len(others)):
                tg.start_soon(one, i)
            tg.start_soon(leaver, PROMPTS[4], 3)
            tg.start_soon(leaver, PROMPTS[5], 5)
        return [summary(d) for d in out]

    (off, on), seen = await both(tiny, scenario)
    assert on == off
    assert seen["aborted_in_flight"] > 0


async def test_cancelled_generations_free_their_slots(tiny):
    async def scenario(eng: Engine) -> Any:
        async with anyio.create_task_group() as tg:
            async def cancelled(ids: list[int]) -> None:
                with anyio.CancelScope() as scope:
                    async with eng.stream(input_ids=ids, max_tokens=300,
                                          ignore_eos=True) as chunks:
                        async for _chunk in chunks:
                            scope.cancel()

            for p in PROMPTS:
                tg.start_soon(cancelled, p)
        done = await eng.generate(input_ids=PROMPTS[0], max_tokens=8, ignore_eos=True)
        stats = eng.statistics()
        assert stats.running_requests == stats.queued_requests == 0
        return summary(done)[:3]

    (off, on), seen = await both(tiny, scenario)
    assert on == off
    assert seen["aborted_in_flight"] > 0


# ------------------------------------------------------------------ the option


async def test_overlap_defaults_to_off_on_the_cpu(tiny):
    async with Engine(tiny, max_total_tokens=1024) as eng:
        assert eng.config.overlap is None and eng._core.overlap is False
    with pytest.raises(TypeError, match="overlap: expected a bool"):
        Engine(tiny, overlap="yes")


# ------------------------------------------------------------------ host work


def test_one_token_list_grows_in_place_and_output_ids_is_a_view_of_it():
    req = Req(rid="r", input_ids=[1, 2, 3], sampling=SamplingParams(max_tokens=4))
    ids = req.all_ids
    req.output_ids.append(4)
    req.output_ids += [5, 6]
    assert req.all_ids is ids and ids == [1, 2, 3, 4, 5, 6]
    assert req.output_ids == [4, 5, 6] and len(req.output_ids) == req.num_outputs == 3
    assert req.input_ids == [1, 2, 3] and req.seq_len == 6
    req.output_ids[-1] = 9
    assert ids[-1] == 9 and list(req.output_ids) == [4, 5, 9] and req.output_ids[1:] == [5, 9]
    req.kv_len = 5
    assert req.needs_decode and req.remaining_tokens == 1
    req.output_ids.append(-1)                 # a token in flight, the last max_tokens allow
    req.kv_len = 6
    assert not req.needs_decode and req.remaining_tokens == 0


def _queue(policy: str, waiting: int, *, cache_aware_limit: int = 128) -> Scheduler:
    rng = random.Random(0)
    alloc = TokenSlotAllocator(64 * 200)
    sched = Scheduler(cache=RadixCache(alloc), allocator=alloc, policy=policy,
                      req_to_token_pool=ReqToTokenPool(64, 512), cache_aware_limit=cache_aware_limit)
    prefixes = [[rng.randrange(5, 500) for _ in range(40)] for _ in range(4)]
    for i in range(waiting):
        ids = rng.choice(prefixes) + [rng.randrange(5, 500) for _ in range(20)]
        sched.add(Req(rid=f"r{i}", input_ids=ids, sampling=SamplingParams(max_tokens=4)))
    return sched


@pytest.mark.parametrize("policy", ["lpm", "dfs-weight"])
def test_a_long_waiting_queue_is_admitted_first_come_first_served(policy, monkeypatch):
    sched = _queue(policy, 1000)
    looked = []
    match_length = sched.cache.match_length
    monkeypatch.setattr(sched.cache, "match_length", lambda key, limit=None: looked.append(1) or match_length(key, limit))
    batch = sched.schedule()
    assert not looked                          # no request of the queue was ordered
    assert [r.rid for r in batch.reqs] == [f"r{i}" for i in range(len(batch.reqs))]
    assert len(sched.waiting) == 1000 - len(batch.reqs)


def test_a_short_waiting_queue_keeps_the_cache_aware_order(monkeypatch):
    sched = _queue("lpm", 40, cache_aware_limit=128)
    looked = []
    match_length = sched.cache.match_length
    monkeypatch.setattr(sched.cache, "match_length", lambda key, limit=None: looked.append(1) or match_length(key, limit))
    sched.schedule()
    assert len(looked) == 40


def test_aged_requests_go_first_once_the_queue_falls_back_to_arrival_order():
    alloc = TokenSlotAllocator(4096)
    cache = RadixCache(alloc)
    sched = Scheduler(cache=cache, allocator=alloc, req_to_token_pool=ReqToTokenPool(16, 256),
                      policy="lpm", aging_limit=1, cache_aware_limit=3,
                      chunked_prefill_size=None, max_prefill_tokens=20)
    shared = list(range(10, 26))
    cache.insert(shared, alloc.alloc(len(shared)))          # r2's prompt is mostly cached
    prompts = [list(range(100, 120)), list(range(200, 220)), shared + [7, 8]]
    for i, ids in enumerate(prompts):
        sched.add(Req(rid=f"r{i}", input_ids=ids, sampling=SamplingParams(max_tokens=2)))
    first = sched.schedule()                 # lpm: r2 (2 tokens missing) overtakes r0, r1
    assert [r.rid for r in first.reqs] == ["r2"]
    for i in range(3, 6):
        sched.add(Req(rid=f"r{i}", input_ids=[300 + i] * 4,
                      sampling=SamplingParams(max_tokens=2)))
    sched.process_result(first)
    second = sched._schedule_extend()        # 5 waiting > 3: arrival order, the aged first
    assert [r.rid for r in second.reqs] == ["r0"]
    sched.max_prefill_tokens = sched._budget = 60
    sched.process_result(second)
    third = sched._schedule_extend()
    assert [r.rid for r in third.reqs] == ["r1", "r3", "r4", "r5"]
    assert not sched.waiting


def test_a_retracted_request_waits_in_arrival_order():
    sched = _queue("fcfs", 6)
    first = sched.schedule()
    for req in first.reqs:
        req.output_ids.append(7)
    sched.process_result(first)
    latest = max(sched.running, key=lambda r: r.arrival)
    sched._retract_latest()
    waiting = [r.arrival for r in sched.waiting]
    assert latest in sched.waiting and waiting == sorted(waiting)


# ------------------------------------------------------------------ detokenization


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    import smollm2

    return smollm2.tokenizer()


class _WindowsOnly:
    """The tokenizer without its streaming decoder: the window decoding it replaces."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer

    def decode_stream(self, *_: Any, **__: Any) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)


@settings(max_examples=80, deadline=None)
@given(ids=st.lists(st.integers(0, 49151), min_size=1, max_size=24),
       context=st.lists(st.integers(0, 49151), max_size=6), skip=st.booleans(),
       step=st.integers(1, 3))
def test_the_streaming_decoder_streams_what_window_decoding_does(smollm2_tokenizer, ids,
                                                                 context, skip, step):
    from aiolm.engine.tokenizer import IncrementalDetokenizer

    def pieces(tokenizer: Any) -> list[str]:
        detok = IncrementalDetokenizer(tokenizer, context, skip_special_tokens=skip)
        out = [detok.feed(ids[i:i + step]) for i in range(0, len(ids), step)]
        return [*out, detok.flush()]

    fast, windows = pieces(smollm2_tokenizer), pieces(_WindowsOnly(smollm2_tokenizer))
    # Token by token the pieces are the same; fed several at once (jump-forward), the
    # streaming decoder may release the complete head of what the window holds back.
    assert fast == windows if step == 1 else "".join(fast) == "".join(windows)
    assert "".join(fast) == smollm2_tokenizer.decode(ids, skip_special_tokens=skip) \
        or "\ufffd" in smollm2_tokenizer.decode(context, skip_special_tokens=skip)


def test_the_streaming_decoder_is_used_unless_the_prompt_ends_mid_character(smollm2_tokenizer):
    prompt = smollm2_tokenizer.encode("Hi 👋")
    assert smollm2_tokenizer.detokenizer(prompt)._stream is not None
    half = prompt[:-1]                         # the emoji is split over byte tokens
    assert smollm2_tokenizer.decode(half).endswith("\ufffd")
    detok = smollm2_tokenizer.detokenizer(half)
    assert detok._stream is None               # the first output token may complete it
    assert detok.feed(prompt[-1:]) + detok.flush() == "👋"


def test_a_failing_streaming_decoder_hands_over_to_window_decoding(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode(" naïve café — 你好, 👋🏽 world")
    detok = smollm2_tokenizer.detokenizer([1, 2, 3])
    stream, steps = detok._stream, []

    class Failing:
        def step(self, backend: Any, token: int) -> str | None:
            if len(steps) == 4:
                raise RuntimeError("InvalidPrefix")
            steps.append(token)
            return stream.step(backend, token)

    detok._stream = Failing()
    pieces = [detok.feed([t]) for t in ids] + [detok.flush()]
    assert detok._stream is None and len(steps) == 4
    assert "".join(pieces) == smollm2_tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)
