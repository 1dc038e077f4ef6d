"""An engine as a notebook user meets it: how it shows itself (its repr and its notebook
table through its life); an engine dropped while running (it warns and stops its loop
thread, and its weights are free for the next engine); its default CPU KV pool, sized from
the model's context and the RAM available."""

from __future__ import annotations

import gc
import re
import threading
import time

import pytest
from tiny_chat import tiny_chat_model

import aiolm
from aiolm.engine import runner
from aiolm.errors import BackendUnavailable, OutOfMemory

pytestmark = pytest.mark.anyio


def engine(model=None, **options) -> aiolm.Engine:
    return aiolm.Engine(model if model is not None else tiny_chat_model(),
                        max_total_tokens=2048, **options)


def loop_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "aiolm-engine"}


def table_cells(html: str) -> dict[str, str]:
    return dict(re.findall(r"<th[^>]*>(.*?)</th><td[^>]*>(.*?)</td>", html))


# ------------------------------------------------------------------ repr / HTML


async def test_the_repr_names_model_device_dtype_and_state_through_the_engine_life():
    eng = engine()
    assert repr(eng) == "<aiolm.Engine model='tiny-chat' device=cpu dtype=float32 not started>"
    async with eng:
        assert repr(eng) == ("<aiolm.Engine model='tiny-chat' device=cpu dtype=float32 "
                             "running kv_slots=2048>")
    assert repr(eng) == "<aiolm.Engine model='tiny-chat' device=cpu dtype=float32 closed>"


def test_the_repr_of_an_engine_by_path_shows_its_options_before_it_loads():
    eng = aiolm.Engine("/models/Llama-3.2-1B", device="cpu", dtype="bfloat16")
    assert repr(eng) == ("<aiolm.Engine model='Llama-3.2-1B' device=cpu dtype=bfloat16 "
                         "not started>")


async def test_the_html_table_shows_statistics_while_running():
    async with engine() as eng:
        await eng.generate("Hello there", max_tokens=3, ignore_eos=True)
        await eng.generate("Hello there", max_tokens=3, ignore_eos=True)
        stats = eng.statistics()
        html = eng._repr_html_()
    cells = table_cells(html)
    assert cells["model"] == "tiny-chat"
    assert cells["device"] == "cpu"
    assert cells["dtype"] == "float32"
    assert cells["attention backend"] == "torch"
    assert cells["state"] == "running"
    assert cells["requests"] == "0 running, 0 queued, 2 finished"
    assert cells["tokens"] == (f"{stats.prompt_tokens} prompt ({stats.cached_tokens} cached), "
                               "6 generated")
    assert stats.cached_tokens > 0   # the second prompt came from the cache
    assert cells["cache hit rate"] == f"{stats.cache_hit_rate:.1%}"
    used = stats.total_kv_slots - stats.free_kv_slots
    assert cells["KV slots"] == f"{used:,} used of 2,048 ({stats.cached_kv_tokens:,} cached)"


async def test_the_html_table_of_a_closed_engine_has_no_statistics():
    eng = engine()
    async with eng:
        pass
    cells = table_cells(eng._repr_html_())
    assert cells["state"] == "closed"
    assert "KV slots" not in cells and "requests" not in cells


async def test_a_failed_engine_shows_its_error_escaped():
    async with engine() as eng:
        def broken(batch, bitmask_fn):
            raise RuntimeError("device <lost>")

        eng._core.runner.run = broken
        with pytest.raises(BackendUnavailable):
            await eng.generate("Hello", max_tokens=2)
        assert repr(eng).endswith(" failed>")
        html = eng._repr_html_()
    assert table_cells(html)["error"] == "RuntimeError: device &lt;lost&gt;"
    assert "<lost>" not in html


# ------------------------------------------------------ dropped while running


async def test_an_engine_dropped_while_running_warns_and_stops_its_thread():
    model = tiny_chat_model()
    before = loop_threads()
    eng = engine(model)
    await eng.start()
    await eng.generate("Hello", max_tokens=2)
    (thread,) = loop_threads() - before
    with pytest.warns(ResourceWarning, match=r"tiny-chat.*await engine\.aclose\(\)"):
        del eng
        gc.collect()
    thread.join(5)
    assert not thread.is_alive()
    deadline = time.monotonic() + 5
    while model.in_use and time.monotonic() < deadline:   # released once the core is gone
        gc.collect()
        time.sleep(0.01)
    assert not model.in_use
    async with engine(model) as again:   # the weights serve the next engine
        assert (await again.generate("Hello", max_tokens=2)).usage.completion_tokens == 2


async def test_a_closed_engine_dropped_says_nothing():
    eng = engine()
    async with eng:
        await eng.generate("Hello", max_tokens=2)
    del eng
    gc.collect()   # warnings are errors here: a ResourceWarning would fail the test


async def test_an_engine_whose_loop_failed_is_dropped_without_a_warning():
    eng = engine()
    await eng.start()

    def broken(batch, bitmask_fn):
        raise RuntimeError("device lost")

    eng._core.runner.run = broken
    with pytest.raises(BackendUnavailable):
        await eng.generate("Hello", max_tokens=2)
    del eng, broken
    gc.collect()   # the loop already stopped: nothing leaks, nothing to warn about


# ------------------------------------------------------------- the default CPU pool

TINY_CONTEXT = 4096                  # tiny_chat's max_position_embeddings
TINY_BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4   # K and V, 2 layers, 2 KV heads of 16, float32


async def test_the_default_cpu_pool_holds_two_full_context_requests():
    async with aiolm.Engine(tiny_chat_model()) as eng:
        assert eng.statistics().total_kv_slots == 2 * TINY_CONTEXT
        full = await eng.generate(input_ids=[5] * (TINY_CONTEXT - 2), max_tokens=2,
                                  ignore_eos=True)
    assert full.usage.completion_tokens == 2


async def test_the_default_cpu_pool_stays_within_a_tenth_of_available_ram(monkeypatch):
    monkeypatch.setattr(runner, "_available_ram", lambda: 1000 * TINY_BYTES_PER_TOKEN * 10)
    async with aiolm.Engine(tiny_chat_model()) as eng:
        assert eng.statistics().total_kv_slots == 1000
        with pytest.raises(OutOfMemory, match="raise max_total_tokens"):
            await eng.generate(input_ids=[5] * 1000, max_tokens=2)   # 1001 KV slots
