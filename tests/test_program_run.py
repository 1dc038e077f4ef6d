"""Running programs: run, run_batch, stream, use_backend, the @program decorator."""

from __future__ import annotations

import contextlib

import anyio
import pytest

from aiolm import BackendUnavailable, assistant, gen, program, use_backend, user
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
    before = sorted(t.name or "" for t in anyio.get_running_tasks())
    async with answer.stream("q", backend=backend) as events:
        async for _ in events:
            break
    assert events.state is None
    # No task of the program outlived the block: nothing is left that could call the
    # backend later, so the count is final.
    assert sorted(t.name or "" for t in anyio.get_running_tasks()) == before
    assert backend.statistics().active_streams == 0
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


# --------------------------------------------------------------------------- one error rule


class FailingAtOnce(ScriptedBackend):
    """Every stream waits until ``width`` streams are open, then all fail at once (no
    checkpoint between the wake-up and the raise, so the first failure cannot cancel the
    others on either event loop). ``errors(prompt)`` picks a stream's error; prompts without
    "fail" are answered as usual."""

    def __init__(self, width: int, errors) -> None:
        super().__init__(lambda prompt: " fine")
        self._width = width
        self._open = 0
        self._all_open = anyio.Event()
        self._errors = errors

    @contextlib.asynccontextmanager
    async def stream(self, request):
        prompt = self.prompt_text(request)
        if "fail" not in prompt:
            async with super().stream(request) as chunks:
                yield chunks
            return
        self._open += 1
        if self._open == self._width:
            self._all_open.set()
        else:
            await self._all_open.wait()
        raise self._errors(prompt)


def per_branch(prompt: str) -> Exception:
    if "fail 0" in prompt:
        return ValueError("branch 0 failed")
    return RuntimeError("branch 1 failed")


@program
async def fan_out(s, width: int = 2):
    s += user("Go.")
    async with s.fork(width) as forks:
        forks += lambda i: assistant(f"fail {i}" + gen("x", max_tokens=4))


@program
async def one_failing_branch(s):
    s += user("Go.")
    async with s.fork(2) as forks:
        forks += lambda i: assistant(("fail 0" if i == 0 else "ok") + gen("x", max_tokens=4))


async def test_one_failure_is_raised_as_itself_from_run_stream_and_a_fork():
    with pytest.raises(ValueError, match="branch 0 failed"):
        await one_failing_branch.run(backend=FailingAtOnce(1, per_branch))
    with pytest.raises(ValueError, match="branch 0 failed"):
        async with one_failing_branch.stream(backend=FailingAtOnce(1, per_branch)) as events:
            async for _ in events:
                pass

    @program
    async def catches_the_fork_error(s):
        try:
            await one_failing_branch(s)
        except ValueError as exc:
            s += f"caught: {exc}"

    state = await catches_the_fork_error.run(backend=FailingAtOnce(1, per_branch))
    assert state.text().endswith("caught: branch 0 failed")


async def test_failures_at_once_are_raised_as_one_flat_group_from_run_and_stream():
    with pytest.raises(ExceptionGroup) as info:
        await fan_out.run(backend=FailingAtOnce(2, per_branch))
    assert sorted(str(e) for e in info.value.exceptions) == ["branch 0 failed", "branch 1 failed"]
    with pytest.raises(ExceptionGroup) as info:
        async with fan_out.stream(backend=FailingAtOnce(2, per_branch)) as events:
            async for _ in events:
                pass
    assert {type(e) for e in info.value.exceptions} == {ValueError, RuntimeError}


async def test_failures_of_nested_forks_are_flattened_into_one_group():
    @program
    async def nested(s):
        s += user("Go.")
        async with s.fork(2) as outer:
            async with anyio.create_task_group() as tg:
                for f in outer:
                    tg.start_soon(fan_out, f)

    with pytest.raises(ExceptionGroup) as info:
        await nested.run(backend=FailingAtOnce(4, per_branch))
    assert len(info.value.exceptions) == 4
    assert not any(isinstance(e, BaseExceptionGroup) for e in info.value.exceptions)


async def test_one_backend_failure_seen_by_every_branch_is_raised_once():
    def down(prompt: str) -> Exception:
        return BackendUnavailable("the engine died")

    with pytest.raises(BackendUnavailable, match="engine died"):
        await fan_out.run(3, backend=FailingAtOnce(3, down))


async def test_except_star_handles_one_failure_and_failures_at_once_alike():
    for width, errors in ((1, per_branch), (2, per_branch)):
        caught = []
        try:
            await (fan_out if width == 2 else one_failing_branch).run(
                backend=FailingAtOnce(width, errors))
        except* ValueError as group:
            caught.append(group)
        except* RuntimeError:
            pass
        assert [str(e) for g in caught for e in g.exceptions] == ["branch 0 failed"]


async def test_run_batch_keeps_each_programs_error_and_the_others_results():
    @program
    async def maybe(s, fail: bool):
        if fail:
            await fan_out(s)
        else:
            s += "ok" + gen("x", max_tokens=1)

    states = await maybe.run_batch([{"fail": False}, {"fail": True}, {"fail": False}],
                                   backend=FailingAtOnce(2, per_branch))
    assert states[0]["x"] == states[2]["x"] == " fine"
    assert isinstance(states[1].error, ExceptionGroup)
    assert len(states[1].error.exceptions) == 2
    states = await one_failing_branch.run_batch([{}], backend=FailingAtOnce(1, per_branch))
    assert isinstance(states[0].error, ValueError)


async def test_run_batch_raise_errors_raises_programs_failing_at_once_as_one_group():
    @program
    async def fails(s, i: int):
        s += user(f"fail {i}") + assistant(gen("x", max_tokens=1))

    with pytest.raises(ExceptionGroup) as info:
        await fails.run_batch([{"i": 0}, {"i": 1}], backend=FailingAtOnce(2, per_branch),
                              raise_errors=True)
    assert {type(e) for e in info.value.exceptions} == {ValueError, RuntimeError}
