"""The engine's CPU thread count and its compiled CPU decode step, on a tiny dummy model."""

from __future__ import annotations

import logging
import threading

import anyio
import pytest
import torch

from aiolm.backends.engine import Engine, LoadedModel
from aiolm.engine.config import EngineConfig
from aiolm.engine.runner import choose_num_threads

pytestmark = pytest.mark.anyio

PROMPTS = [[5, 6, 7, 8, 9], [5, 6, 7, 40, 41, 42, 43], [100, 101], [300, 301, 302, 303]]


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return LoadedModel.load("tiny-llama", load_format="dummy", device="cpu", seed=0)


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


async def _greedy_together(eng: Engine, n: int = 16) -> list[tuple[int, ...]]:
    """Every prompt decoded in one batch (decode batches of 1 to 4 requests as they end)."""
    out: list[tuple[int, ...]] = [()] * len(PROMPTS)

    async def one(i: int) -> None:
        done = await eng.generate(input_ids=PROMPTS[i], max_tokens=n + 3 * i, ignore_eos=True)
        out[i] = done.token_ids

    async with anyio.create_task_group() as tg:
        for i in range(len(PROMPTS)):
            tg.start_soon(one, i)
    return out


def test_default_threads_leave_the_event_loop_a_core(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    assert choose_num_threads(None, torch.device("cpu")) == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0})
    assert choose_num_threads(None, torch.device("cpu")) == 1
    assert choose_num_threads(5, torch.device("cpu")) == 5
    assert choose_num_threads(None, torch.device("cuda")) is None


@pytest.mark.parametrize(("value", "error"), [(0, ValueError), (-2, ValueError),
                                              (1.5, TypeError), (True, TypeError),
                                              ("2", TypeError)])
def test_num_threads_is_validated_naming_it(value, error):
    with pytest.raises(error, match="num_threads"):
        Engine(num_threads=value)
    with pytest.raises(TypeError, match="compile"):
        EngineConfig(compile="yes")


async def test_engine_sets_its_thread_count_and_logs_it(tiny, keep_threads, caplog):
    with caplog.at_level(logging.INFO, logger="aiolm.engine"):
        async with Engine(tiny, max_total_tokens=1024, num_threads=1) as eng:
            await eng.generate(input_ids=PROMPTS[0], max_tokens=2, ignore_eos=True)
            assert eng._core.runner.num_threads == 1
    assert any("1 torch CPU thread" in r.getMessage() for r in caplog.records)
    seen: list[int] = []
    later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    later.start()
    later.join()
    assert seen == [1]  # the default of threads started later too, as documented


@pytest.mark.slow
async def test_compiled_decode_gives_the_eager_tokens(tiny, keep_threads):
    async with Engine(tiny, max_total_tokens=2048) as eng:
        eager = await _greedy_together(eng)
        assert eng._core.runner.compiled_decode is None
    async with Engine(tiny, max_total_tokens=2048, compile=True) as eng:
        assert eng._core.runner.compiled_decode is not None
        compiled = await _greedy_together(eng)
    assert compiled == eager
