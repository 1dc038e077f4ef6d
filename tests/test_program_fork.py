"""Forks: branches as a task group, broadcast, join modes, prefill, misuse."""

from __future__ import annotations

import anyio
import pytest

from aiolm import ProgramError, assistant, gen, program, user
from aiolm.backends import ScriptedBackend

pytestmark = pytest.mark.anyio


def echo_last_line(prompt: str) -> str:
    return "<" + prompt.rsplit("\n", 1)[-1].strip() + ">"


async def run(body, backend=None):
    return await program(body).run(backend=backend or ScriptedBackend(echo_last_line))


async def test_branches_start_as_copies_of_the_parent():
    async def body(s):
        s += user("shared") + "x:" + gen("x")
        async with s.fork(2) as forks:
            for f in forks:
                assert f["x"] == s["x"]
                assert f.text() == s.text() and f.messages() == s.messages()
            forks[0] += "zero"
        assert "zero" not in s.text()

    await run(body)


async def test_gather_puts_none_where_a_branch_did_not_set_the_variable():
    async def body(s):
        async with s.fork(3) as forks:
            forks[0] += gen("a")
            forks[2] += gen("a") + gen("b")
        forks.join()

    state = await run(body, ScriptedBackend(lambda p: "v"))
    assert state["a"] == ["v", None, "v"]
    assert state["b"] == [None, None, "v"]
    assert state.meta("a")[1] is None and state.meta("a")[0].finish_reason == "stop"


async def test_concat_appends_whole_turns_in_branch_order():
    async def body(s):
        async with s.fork(2) as forks:
            forks += lambda i: user(f"q{i}") + assistant(gen())
        forks.join(mode="concat")

    state = await run(body, ScriptedBackend(lambda p: "a"))
    assert [(m["role"], m["content"]) for m in state.messages()] == [
        ("user", "q0"), ("assistant", "a"), ("user", "q1"), ("assistant", "a"),
    ]


async def test_broadcast_expr_goes_to_every_branch():
    async def body(s):
        async with s.fork(3) as forks:
            forks += "same:" + gen("v")
        forks.join()

    state = await run(body)
    assert state["v"] == ["<same:>"] * 3


async def test_nested_forks_gather_lists_of_lists():
    async def body(s):
        async with s.fork(2) as outer:
            for i, branch in enumerate(outer):
                async with branch.fork(2) as inner:
                    inner += lambda j, i=i: f"{i}.{j}:" + gen("leaf")
                inner.join()
        outer.join()

    state = await run(body)
    assert state["leaf"] == [["<0.0:>", "<0.1:>"], ["<1.0:>", "<1.1:>"]]


async def test_fork_prefills_the_shared_prefix_once_and_only_when_it_helps():
    backend = ScriptedBackend(echo_last_line)

    async def body(s):
        async with s.fork(3):  # empty state: nothing to cache
            pass
        s += "prefix"
        async with s.fork(1):  # one branch: nothing shared
            pass
        async with s.fork(4):
            pass

    await run(body, backend)
    assert backend.statistics().prefill_calls == 1


async def test_fork_waits_for_the_parent_queue_before_branching():
    async def body(s):
        s += "a:" + gen("a")
        async with s.fork(2) as forks:
            assert all(f["a"] == "<a:>" for f in forks)

    await run(body, ScriptedBackend(echo_last_line, delay=0.001))


async def test_branches_run_concurrently():
    backend = ScriptedBackend(lambda p: " ".join(["w"] * 20), delay=0.002)
    peak = 0

    async def watch():
        nonlocal peak
        while True:
            peak = max(peak, backend.statistics().active_streams)
            await anyio.sleep(0.001)

    async def body(s):
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            async with s.fork(4) as forks:
                forks += gen("v")
            tg.cancel_scope.cancel()

    await run(body, backend)
    assert peak == 4


async def test_an_error_in_the_fork_body_cancels_the_branches():
    backend = ScriptedBackend(lambda p: " ".join(["w"] * 200), delay=0.002)

    async def body(s):
        async with s.fork(2) as forks:
            forks += gen("v")
            await anyio.sleep(0.01)
            raise LookupError("body failed")

    with pytest.raises(LookupError, match="body failed"):
        await run(body, backend)
    assert backend.statistics().active_streams == 0


@pytest.mark.parametrize("n", [0, -1])
async def test_fork_needs_at_least_one_branch(n):
    async def body(s):
        with pytest.raises(ValueError, match="n:"):
            s.fork(n)
        with pytest.raises(TypeError, match="n:"):
            s.fork("2")

    await run(body)


async def test_join_misuse_is_reported():
    async def body(s):
        forks = s.fork(2)
        with pytest.raises(ProgramError, match="inside"):
            forks[0]
        async with forks:
            with pytest.raises(ProgramError, match="after"):
                forks.join()
            with pytest.raises(TypeError, match="replaced"):
                forks[0] = forks[1]
        with pytest.raises(ValueError, match="mode"):
            forks.join(mode="zip")
        forks.join()
        with pytest.raises(ProgramError, match="already"):
            forks.join()
        with pytest.raises(ProgramError, match="ended"):
            forks[0] += "late"
        with pytest.raises(ProgramError, match="once"):
            async with forks:
                pass

    await run(body)
