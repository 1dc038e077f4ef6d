"""Running programs: run, run_batch, stream, use_backend, the @program decorator."""

from __future__ import annotations

import anyio
import pytest

from aiolm import gen, program, use_backend
from aiolm.backends import ScriptedBackend

pytestmark = pytest.mark.anyio


@program
async def answer(s, question: str):
    s += question + gen("a", stop="\n")


def upper(prompt: str) -> str:
    return prompt.upper() + "\ntail"


async def test_run_passes_program_arguments():
    state = await answer.run("q1 ", backend=ScriptedBackend(upper))
    assert state["a"] == "Q1 "
    state = await answer.run(question="q2 ", backend=ScriptedBackend(upper))
    assert state["a"] == "Q2 "


async def test_run_without_a_backend_names_the_argument():
    with pytest.raises(ValueError, match="backend"):
        await answer.run("q")
    with pytest.raises(TypeError, match="backend"):
        await answer.run("q", backend="gpt")


async def test_run_rejects_bad_sampling_defaults_naming_them():
    with pytest.raises(ValueError, match="temperature"):
        await answer.run("q", backend=ScriptedBackend(), temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        await answer.run("q", backend=ScriptedBackend(), top_p=2.0)


async def test_use_backend_sets_a_task_local_default():
    outer, inner = ScriptedBackend(lambda p: "outer"), ScriptedBackend(lambda p: "inner")
    seen = []

    async def in_child_task():
        seen.append((await answer.run("q"))["a"])

    with use_backend(outer):
        with use_backend(inner):
            assert (await answer.run("q"))["a"] == "inner"
            async with anyio.create_task_group() as tg:
                tg.start_soon(in_child_task)
        assert (await answer.run("q"))["a"] == "outer"
    assert seen == ["inner"]
    with pytest.raises(ValueError, match="backend"):
        await answer.run("q")
    with pytest.raises(TypeError, match="backend"):
        with use_backend("gpt"):
            pass


def test_program_rejects_non_async_functions_and_reserved_parameters():
    with pytest.raises(TypeError, match="async def"):
        program(lambda s: None)

    async def no_state():
        pass

    with pytest.raises(TypeError, match="state"):
        program(no_state)

    async def reserved(s, temperature, backend):
        pass

    with pytest.raises(TypeError, match="backend, temperature"):
        program(reserved)


def test_program_keeps_the_function_name_and_doc():
    @program
    async def documented(s):
        """Doc."""

    assert documented.__name__ == "documented" and documented.__doc__ == "Doc."
    assert "documented" in repr(documented)


# --------------------------------------------------------------------------- run_batch


async def test_run_batch_merges_defaults_under_each_item():
    backend = ScriptedBackend(upper)
    states = await answer.run_batch(
        [{"question": "a "}, {"question": "b ", "temperature": 0.5}, {}],
        backend=backend, question="default ", temperature=0.1,
    )
    assert [s["a"] for s in states] == ["A ", "B ", "DEFAULT "]
    # Programs of a batch run concurrently: match requests to programs by their prompt.
    temperature = {r.prompt: r.sampling.temperature for r in backend.requests}
    assert [temperature[p] for p in ("a ", "b ", "default ")] == [0.1, 0.5, 0.1]


async def test_run_batch_bounds_concurrency():
    running = peak = 0

    @program
    async def slow(s, i: int):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.002)
        s += gen("x")
        running -= 1

    states = await slow.run_batch([{"i": i} for i in range(20)], backend=ScriptedBackend(), max_concurrency=4)
    assert peak == 4 and len(states) == 20


async def test_run_batch_raise_errors_raises_the_first_error_itself():
    @program
    async def maybe_fail(s, i: int):
        if i == 3:
            raise ArithmeticError(f"failed {i}")
        s += gen("x")

    with pytest.raises(ArithmeticError, match="failed 3"):
        await maybe_fail.run_batch([{"i": i} for i in range(6)], backend=ScriptedBackend(), raise_errors=True)


async def test_run_batch_shows_a_progress_bar(capsys):
    await answer.run_batch([{"question": "q"}] * 3, backend=ScriptedBackend(), progress=True)
    assert "3/3" in capsys.readouterr().err


async def test_run_batch_of_nothing_is_empty():
    assert await answer.run_batch([], backend=ScriptedBackend()) == []


async def test_run_batch_rejects_bad_arguments_naming_them():
    with pytest.raises(TypeError, match=r"batch\[1\]"):
        await answer.run_batch([{}, "q"], backend=ScriptedBackend())
    with pytest.raises(ValueError, match="max_concurrency"):
        await answer.run_batch([{}], backend=ScriptedBackend(), max_concurrency=0)


# --------------------------------------------------------------------------- stream


async def test_stream_events_name_their_variable_and_fork_branch():
    @program
    async def forked(s):
        s += "p:" + gen("top", max_tokens=2)
        async with s.fork(2) as forks:
            forks += gen("leaf", max_tokens=1)

    events_seen = []
    async with forked.stream(backend=ScriptedBackend(lambda p: "one two three")) as events:
        async for ev in events:
            events_seen.append((ev.name, ev.text, ev.branch))
    assert events_seen[:2] == [("top", "one", ()), ("top", " two", ())]
    assert sorted(events_seen[2:]) == [("leaf", "one", (0,)), ("leaf", "one", (1,))]
    assert events.state["top"] == "one two"


async def test_leaving_a_stream_early_cancels_the_program():
    backend = ScriptedBackend(lambda p: " ".join(["w"] * 500), delay=0.001)
    async with answer.stream("q", backend=backend) as events:
        async for _ in events:
            break
    assert events.state is None
    assert backend.statistics().active_streams == 0
    await anyio.sleep(0.01)
    assert backend.statistics().calls == 1


async def test_stream_raises_the_program_error_from_the_block():
    @program
    async def failing(s):
        s += gen("x")
        await s.sync()
        raise OSError("disk full")

    received = []
    with pytest.raises(OSError, match="disk full"):
        async with failing.stream(backend=ScriptedBackend(lambda p: "a b")) as events:
            async for ev in events:
                received.append(ev.text)
    assert received == ["a", " b"]
