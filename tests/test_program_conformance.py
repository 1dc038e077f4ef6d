"""The frontend conformance programs (tests/conformance.py) on the ScriptedBackend.

Each check runs once with its model-independent assertions; the tests below it add what
the scripted model's known replies make exact.
"""

from __future__ import annotations

import json

import conformance
import pytest

pytestmark = pytest.mark.anyio

# Pieces stream with a small delay so that cancellation and sibling failures land
# while generations are in flight.
DELAY = 0.002


@pytest.fixture
def backend():
    return conformance.scripted_backend(delay=DELAY)


@pytest.mark.parametrize("check", conformance.CHECKS, ids=lambda c: c.__name__)
async def test_conformance_check_passes_on_scripted_backend(check, backend):
    await check(backend)
    assert backend.statistics().active_streams == 0


async def test_few_shot_qa_stops_at_newline(backend):
    state = await conformance.check_few_shot_qa(backend)
    assert state["answer"] == " Paris"
    meta = state.meta("answer")
    assert (meta.finish_reason, meta.matched_stop, meta.completion_tokens) == ("stop", "\n", 1)


async def test_multi_turn_chat_answers_each_turn(backend):
    state = await conformance.check_multi_turn_chat(backend)
    assert state["answer1"] == "The capital of France is Paris."
    assert state["answer2"] == "Berlin is the capital of Germany."
    assert backend.requests[1].prompt.endswith("USER: And of Germany?\nASSISTANT: ")


async def test_select_picks_the_choice_matching_the_reply(backend):
    state = await conformance.check_select(backend)
    assert state["answer"] == "yes"
    assert state.meta("answer").choice_logprobs[0] == 0.0


async def test_gen_dtype_int_parses_the_number(backend):
    state = await conformance.check_dtype_int(backend)
    assert state["legs"] == 8
    assert state.text().endswith("A: 8")


async def test_json_through_regex(backend):
    state = await conformance.check_json_regex(backend)
    assert json.loads(state["json"]) == {"name": "Paris", "population": 2102650}


async def test_react_branches_on_a_variable_read_mid_program(backend):
    state, actions = await conformance.check_react(backend)
    assert actions == [" Search", " Finish"]
    assert state["thought0"] == " I should look up the capital of France."
    assert "Observation 0:" in state.text() and "Thought 2" not in state.text()


async def test_tool_use_stops_at_closing_paren(backend):
    state = await conformance.check_tool_use(backend)
    assert state["expr"] == "12 * 7"
    assert state.meta("expr").matched_stop == ")"
    assert state.text().endswith("Call: calculate(12 * 7)\nResult: 84\n")


async def test_fork_gather_keeps_branch_order_and_prefills_once(backend):
    state = await conformance.check_fork_gather(backend)
    assert state["fact"] == [f" Paris fact number {i}." for i in range(1, 6)]
    assert backend.statistics().prefill_calls == 1
    assert backend.statistics().calls == 5


async def test_fork_concat_appends_branch_texts_in_order(backend):
    state = await conformance.check_fork_concat(backend)
    assert state.text() == (
        "Summaries:\n"
        "Doc 0: summary of document 0\n"
        "Doc 1: summary of document 1\n"
        "Doc 2: summary of document 2\n"
        "Overall: three short documents"
    )


async def test_image_reaches_the_backend_in_the_user_turn(backend):
    state = await conformance.check_image(backend)
    assert state["caption"] == "A single red pixel."
    request = backend.requests[0]
    assert request.prompt == "USER: <image>What is in the image?\nASSISTANT: "
    assert request.images[0].data == conformance.tiny_png()


async def test_stream_deltas_concatenate_to_each_variable(backend):
    state, joined = await conformance.check_streaming(backend)
    assert joined == {"first": " Paris", "second": "8", None: "I do not know."}


async def test_var_scope_captures_exactly_its_text(backend):
    state = await conformance.check_var_scope(backend)
    assert state["scoped"] == "Inside the scope done."


async def test_run_batch_keeps_order_and_isolates_the_failure(backend):
    states = await conformance.check_run_batch(backend)
    assert [s["out"] for i, s in enumerate(states) if i != 2] == [
        f" {x} squared is {x * x}" for x in (0, 1, 3, 4, 5)
    ]
    assert str(states[2].error) == "two is not allowed"


@pytest.mark.parametrize("check", [conformance.check_cancel_queued, conformance.check_cancel_fork])
async def test_cancelled_program_stops_calling_the_backend(check, backend):
    await check(backend, settle=0.02)
    # The check asserts that no task of the program outlived the cancel: nothing is left
    # that could call the backend later, so these counts are final.
    stats = backend.statistics()
    assert stats.active_streams == 0
    if check is conformance.check_cancel_queued:
        assert stats.calls == 1  # the queued gen never reached the backend
    else:
        assert stats.calls <= 3  # one call at most per branch


async def test_fork_error_cancels_sibling_streams(backend):
    await conformance.check_fork_error(backend)
    assert backend.statistics().active_streams == 0
    assert backend.statistics().calls == 2  # the failing branch never reached the backend
