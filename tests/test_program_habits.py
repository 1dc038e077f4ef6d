"""Mistakes a new user makes (issue "the first hour of a user"): a wrong keyword to
run/run_batch/stream is refused up front, naming it (with SGLang's names pointed to
aiolm's); ``s.get`` without ``await`` raises at once; a failed state's variables raise
the error that failed it."""

from __future__ import annotations

import pytest

import aiolm
from aiolm import gen, program
from aiolm.backends import ScriptedBackend

pytestmark = pytest.mark.anyio


@program
async def answer(s, question: str):
    s += "Q: " + question + "\nA:" + gen("answer", max_tokens=4)


async def test_run_batch_refuses_a_wrong_keyword_before_running_anything():
    backend = ScriptedBackend()
    with pytest.raises(TypeError, match=r"run_batch: batch\[0\]: answer\(s, \.\.\.\) .*'progress_bar'"
                                        r".*SGLang's name; aiolm's is progress=True"):
        await answer.run_batch([{"question": "a"}, {"question": "b"}], backend=backend,
                               progress_bar=True)


async def test_run_batch_names_the_item_with_a_bad_argument():
    with pytest.raises(TypeError, match=r"batch\[1\]: answer\(s, \.\.\.\) missing a required argument: 'question'"):
        await answer.run_batch([{"question": "a"}, {"questoin": "b"}], backend=ScriptedBackend())


async def test_run_and_stream_refuse_wrong_arguments_up_front():
    with pytest.raises(TypeError, match=r"run: answer\(s, \.\.\.\) missing a required argument"):
        await answer.run(backend=ScriptedBackend())
    with pytest.raises(TypeError, match=r"stream: .*'max_new_tokens'.*aiolm's is max_tokens="):
        answer.stream(question="a", max_new_tokens=3, backend=ScriptedBackend())


async def test_get_without_await_raises_at_once():
    @program
    async def judge(s):
        s += "ok?" + aiolm.select("ok", choices=["yes", "no"])
        if s.get("ok") == "no":  # the missing await
            return

    with pytest.raises(TypeError, match=r"s.get\('ok'\) must be awaited: did you forget `await`"):
        await judge.run(backend=ScriptedBackend())


async def test_get_with_await_still_works():
    state = await answer.run(question="a", backend=ScriptedBackend())
    assert await state.get("answer") == state["answer"]


async def test_a_failed_states_variables_raise_its_error():
    @program
    async def broken(s):
        s += "x" + gen("first", max_tokens=2)
        await s.sync()
        raise RuntimeError("the tool call failed")

    states = await broken.run_batch([{}], backend=ScriptedBackend())
    assert isinstance(states[0].error, RuntimeError)
    assert states[0]["first"]  # made before the failure: still readable
    with pytest.raises(RuntimeError, match="the tool call failed"):
        states[0]["never_made"]
