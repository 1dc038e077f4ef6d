"""Hostile requests against the engine: one request may fail, never the engine or the others.

A tiny dummy model on the CPU: token-id prompts on its plain weights, text prompts on the
bench tokenizer. Timing bounds are generous: the stalls these tests guard against last
seconds, the bounds are one second.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import httpx
import pytest

from aiolm.backends.base import GenerateRequest
from aiolm.backends.engine import Engine, LoadedModel
from aiolm.backends.scripted import ScriptedBackend
from aiolm.constraints import Constraint, Matcher, Regex
from aiolm.engine.stopping import StopChecker
from aiolm.errors import BackendUnavailable, EngineError
from aiolm.sampling import (
    MAX_STOP_CHARS,
    MAX_STOP_REGEX_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MAX_TOKENS,
    SamplingParams,
)
from aiolm.server import create_app

pytestmark = pytest.mark.anyio

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12]
OTHER = [100, 101, 102]
STALL = 1.0   # seconds: longer than any step of these tests, shorter than the stalls


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return LoadedModel.load("tiny-llama", load_format="dummy", device="cpu", seed=0)


@pytest.fixture(scope="module")
def tiny_text() -> LoadedModel:
    from aiolm.bench.models import load_for_bench

    return load_for_bench("tiny-llama", load_format="dummy", device="cpu")


def engine(loaded: LoadedModel, **options: Any) -> Engine:
    options.setdefault("max_total_tokens", 4096)
    return Engine(loaded, **options)


async def greedy(eng: Engine, ids: list[int], n: int = 12) -> tuple[int, ...]:
    return (await eng.generate(input_ids=ids, max_tokens=n, ignore_eos=True)).token_ids


class _Streamer:
    """Streams a long greedy request and records the longest wait between two chunks."""

    def __init__(self, eng: Engine, ids: list[int], n: int) -> None:
        self.eng, self.ids, self.n = eng, ids, n
        self.tokens: list[int] = []
        self.longest_gap = 0.0
        self.started = anyio.Event()

    async def run(self) -> None:
        async with self.eng.stream(input_ids=self.ids, max_tokens=self.n,
                                   ignore_eos=True) as chunks:
            last = time.monotonic()
            async for chunk in chunks:
                now = time.monotonic()
                self.longest_gap = max(self.longest_gap, now - last)
                last = now
                self.tokens.extend(chunk.token_ids)
                self.started.set()


async def alongside(eng: Engine, hostile: Any, *, ids: list[int] = OTHER,
                    n: int = 60) -> tuple[_Streamer, BaseException | None]:
    """Run ``hostile()`` while a greedy request streams; return the stream and its error."""
    streamer = _Streamer(eng, ids, n)
    error: list[BaseException] = []

    async def attack() -> None:
        await streamer.started.wait()
        try:
            await hostile()
        except Exception as exc:
            error.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(streamer.run)
        tg.start_soon(attack)
    return streamer, (error[0] if error else None)


# ------------------------------------------------------------------ fault 1: bad values


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"seed": 2**64}, "seed"),
    ({"seed": -1}, "seed"),
    ({"max_tokens": MAX_TOKENS + 1}, "max_tokens"),
    ({"min_tokens": MAX_TOKENS + 1, "max_tokens": MAX_TOKENS}, "min_tokens"),
    ({"top_k": MAX_TOKENS + 1}, "top_k"),
    ({"top_logprobs": 21}, "top_logprobs"),
    ({"stop": ["s"] * (MAX_STOP_STRINGS + 1)}, "stop"),
    ({"stop": "s" * (MAX_STOP_CHARS + 1)}, "stop"),
    ({"stop_token_ids": [MAX_TOKENS + 1]}, "stop_token_ids"),
    ({"stop_token_ids": list(range(MAX_STOP_TOKEN_IDS + 1))}, "stop_token_ids"),
    ({"stop_regex": "b" * (MAX_STOP_REGEX_CHARS + 1)}, "stop_regex"),
    ({"stop_regex": "a{4294967294}"}, "stop_regex"),
])
def test_sampling_params_refuse_values_out_of_range_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        SamplingParams(**kwargs)


def test_sampling_params_take_the_edges_of_every_range():
    SamplingParams(seed=0)
    SamplingParams(seed=2**64 - 1)
    SamplingParams(max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, top_k=MAX_TOKENS,
                   top_logprobs=20, stop=["s" * MAX_STOP_CHARS] * MAX_STOP_STRINGS,
                   stop_token_ids=[MAX_TOKENS] * MAX_STOP_TOKEN_IDS,
                   stop_regex="b" * MAX_STOP_REGEX_CHARS)


async def test_a_seed_past_64_bits_is_refused_and_the_engine_keeps_serving(tiny):
    async with engine(tiny) as eng:
        with pytest.raises(ValueError, match="seed"):
            await eng.generate(input_ids=PROMPT, temperature=1.0, seed=2**64, max_tokens=4)
        largest = dict(input_ids=PROMPT, temperature=1.0, seed=2**64 - 1, max_tokens=8,
                       ignore_eos=True)
        first = await eng.generate(**largest)
        again = await eng.generate(**largest)
        assert eng.failure is None
        assert await greedy(eng, PROMPT, 4)
    assert first.token_ids == again.token_ids and len(first.token_ids) == 8


async def test_the_server_answers_400_for_a_seed_past_64_bits():
    backend = ScriptedBackend()
    body = {"model": backend.model_name, "prompt": "hi", "seed": 18446744073709551616}
    app = create_app(backend)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://127.0.0.1") as client:
        answer = await client.post("/v1/completions", json=body)
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "seed"


async def test_a_request_whose_sampling_cannot_be_prepared_fails_alone(tiny):
    # Values are checked at the entry; this one slips past (as a bug would) to show the
    # sampler's preparation failing inside a batch ends that request only.
    broken = SamplingParams(temperature=1.0, seed=1, max_tokens=6, ignore_eos=True)
    object.__setattr__(broken, "seed", 2**64)
    async with engine(tiny) as eng:
        reference = await greedy(eng, OTHER, 60)
        await eng.flush_cache()
        streamer, error = await alongside(
            eng, lambda: eng.generate(GenerateRequest(input_ids=PROMPT, sampling=broken)))
        assert eng.failure is None
        after = await greedy(eng, PROMPT, 4)
        report = await eng.check_integrity()
    assert isinstance(error, ValueError) and "Overflow" in str(error)
    assert tuple(streamer.tokens) == reference
    assert after and report.idle and report.request_slots == 0


async def test_a_temperature_too_small_for_float32_samples_greedily(tiny):
    async with engine(tiny) as eng:
        reference = await greedy(eng, PROMPT, 8)
        tiny_temp = await eng.generate(input_ids=PROMPT, max_tokens=8, ignore_eos=True,
                                       temperature=1e-50)
    assert tiny_temp.token_ids == reference


# -------------------------------------------------------- faults 2 and 3: stop regexes


async def test_a_long_literal_stop_regex_is_refused_at_once(tiny_text):
    async with engine(tiny_text) as eng:
        start = time.monotonic()
        with pytest.raises(ValueError, match=f"stop_regex.*{MAX_STOP_REGEX_CHARS}"):
            await eng.generate("Say a:", max_tokens=10, stop_regex="b" * 3000)
        with pytest.raises(ValueError, match="stop_regex"):
            await eng.generate("Say a:", max_tokens=10,
                               stop_regex="(?:(?:a{200}){200}){200}")
        refused = time.monotonic() - start
        streamer, error = await alongside(
            eng, lambda: eng.generate("Say a:", max_tokens=10,
                                      stop_regex="b" * MAX_STOP_REGEX_CHARS))
    assert refused < STALL
    assert error is None
    assert streamer.longest_gap < STALL


async def test_a_backtracking_stop_regex_fails_alone_while_others_stream(tiny_text):
    async with engine(tiny_text) as eng:
        reference = await greedy(eng, OTHER, 60)
        await eng.flush_cache()
        start = time.monotonic()
        streamer, error = await alongside(
            eng, lambda: eng.generate("Say a:", max_tokens=40, constraint=Regex("a{25}X"),
                                      stop_regex="(a|a)*b"))
        took = time.monotonic() - start
        assert eng.failure is None
        report = await eng.check_integrity()
    assert isinstance(error, ValueError)
    assert "stop_regex" in str(error) and "simplify" in str(error)
    assert streamer.longest_gap < STALL and took < 5 * STALL
    assert tuple(streamer.tokens) == reference
    assert report.idle


def test_stop_regex_searches_share_one_budget_per_feed():
    class Letters:
        def feed(self, ids):
            return "".join("a" if i == 1 else "X" for i in ids)

        def flush(self):
            return ""

    checker = StopChecker(SamplingParams(stop_regex="(a|a)*b", max_tokens=100),
                          eos_token_ids=[0], detokenizer=Letters(), regex_timeout=0.05)
    start = time.monotonic()
    with pytest.raises(ValueError, match="stop_regex: took longer than 50 ms"):
        checker.feed([1] * 40 + [2])
    assert time.monotonic() - start < STALL


# --------------------------------------------------------------- fault 4: the watchdog


class _Slow(Matcher):
    """Allows every token; sleeps ``fill`` s filling its mask and ``advance`` s advancing."""

    def __init__(self, fill: float = 0.0, advance: float = 0.0) -> None:
        self.fill, self.delay = fill, advance

    def fill_next_token_mask(self, bitmask_row: Any) -> None:
        time.sleep(self.fill)
        bitmask_row.fill_(-1)

    def advance(self, token_id: int) -> bool:
        time.sleep(self.delay)
        return True

    def forced_tokens(self) -> list[int]:
        return []

    def is_finished(self) -> bool:
        return False

    def fork(self) -> Matcher:
        return _Slow(self.fill, self.delay)

    def rollback(self, n: int) -> None:
        pass


class _SlowConstraint(Constraint):
    def __init__(self, fill: float = 0.0, advance: float = 0.0) -> None:
        self.fill, self.advance = fill, advance

    def compile(self, tokenizer: Any) -> Matcher:
        return _Slow(self.fill, self.advance)

    def matches_text(self, text: str) -> bool:
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _SlowConstraint) and (other.fill, other.advance) == (
            self.fill, self.advance)

    def __hash__(self) -> int:
        return hash((_SlowConstraint, self.fill, self.advance))


@pytest.mark.parametrize("slow", [{"advance": 0.3}, {"fill": 0.3}], ids=["advance", "mask"])
async def test_the_watchdog_aborts_a_request_whose_host_work_overruns(tiny, slow):
    async with engine(tiny, request_step_timeout=0.1) as eng:
        reference = await greedy(eng, OTHER, 60)
        await eng.flush_cache()
        streamer, error = await alongside(
            eng, lambda: eng.generate(input_ids=PROMPT, max_tokens=30, ignore_eos=True,
                                      constraint=_SlowConstraint(**slow)))
        assert eng.failure is None
        report = await eng.check_integrity()
    assert isinstance(error, EngineError) and "request_step_timeout" in str(error)
    assert tuple(streamer.tokens) == reference
    assert report.idle


async def test_aclose_returns_within_close_timeout_when_the_loop_is_stuck():
    loaded = LoadedModel.load("tiny-llama", load_format="dummy", device="cpu", seed=0)
    eng = engine(loaded, close_timeout=0.5)
    release = threading.Event()
    await eng.start()
    run = eng._core.runner.run

    def stuck(batch, bitmask_fn):   # a forward pass that never ends
        release.wait(30)
        return run(batch, bitmask_fn)

    eng._core.runner.run = stuck
    core = eng._core
    try:
        with anyio.move_on_after(0.2):
            await greedy(eng, PROMPT, 4)
        start = time.monotonic()
        await eng.aclose()
        took = time.monotonic() - start
        assert took < 0.5 + STALL
        assert isinstance(eng.failure, BackendUnavailable)
        assert "did not stop" in str(eng.failure)
        assert loaded.in_use   # a loop still running keeps the weights
    finally:
        release.set()
        core.join(10)


# ----------------------------------------------------- fault 5: the health contract


async def test_failure_and_statistics_tell_the_engine_state_after_the_loop_fails(tiny):
    eng = engine(tiny)
    assert eng.failure is None
    async with eng:
        await greedy(eng, PROMPT, 4)
        assert eng.failure is None
        before = eng.statistics()

        def broken(batch, bitmask_fn):
            raise RuntimeError("device lost")

        eng._core.runner.run = broken
        with pytest.raises(BackendUnavailable, match="device lost"):
            await greedy(eng, PROMPT, 4)
        failure = eng.failure
        after = eng.statistics()
    assert isinstance(failure, RuntimeError) and "device lost" in str(failure)
    assert after.finished_requests == before.finished_requests == 1
    assert eng.statistics() == after   # and after closing, the last snapshot


async def test_a_text_too_long_for_the_context_is_refused_before_encoding(tiny_text):
    """4 MB of text used to take seconds of tokenizing to be refused."""
    from aiolm.errors import ContextLengthExceeded

    async with engine(tiny_text) as eng:
        start = time.perf_counter()
        with pytest.raises(ContextLengthExceeded, match="4000000 characters, so at least"):
            await eng.generate(prompt="word " * 800_000, max_tokens=1)
        assert time.perf_counter() - start < 0.5
        assert len((await eng.generate(prompt="word word", max_tokens=2)).token_ids) == 2


async def test_a_long_text_prompt_is_encoded_off_the_event_loop(tiny_text, monkeypatch):
    import aiolm.backends.engine as engine_module

    monkeypatch.setattr(engine_module, "_INLINE_ENCODE_CHARS", 1000)
    async with engine(tiny_text) as eng:
        threads = []
        encode = eng._prompt_ids

        def recording(request):
            threads.append(threading.current_thread())
            return encode(request)

        eng._prompt_ids = recording
        await eng.generate(prompt="population " * 200, max_tokens=1)  # 2,200 characters
        await eng.generate(prompt="word word", max_tokens=1)
    assert threads[0] is not threading.main_thread()
    assert threads[1] is threading.main_thread()
