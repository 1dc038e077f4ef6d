"""API speculative execution: the cutting rules, the per-run session, and chat models'
whole-turn speculation against a plain OpenAI API (httpx.MockTransport)."""

from __future__ import annotations

import httpx
import pytest
from fake_openai import FakeAPI, chat

import aiolm
from aiolm import assistant, gen, program, user
from aiolm.backends._speculative import SpecSession, Speculation, cut, sampling_key
from aiolm.errors import UnsupportedFeature
from aiolm.sampling import SamplingParams

GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=0.8)


def spec(text: str, tokens: list[str] | None, *, finished: bool = False, key: str = "P",
         sampling: SamplingParams = GREEDY) -> Speculation:
    return Speculation(key=key, text=text, tokens=None if tokens is None else tuple(tokens),
                       finished=finished, sampling=sampling_key(sampling))


TOKENS = [" Ann", "\njob", ":", " cook", "\n", "age", ":", " 7", "\n"]
TEXT = "".join(TOKENS)


def test_a_stop_inside_a_token_cuts_before_the_stop():
    answer = cut(spec(TEXT, TOKENS), 0, SamplingParams(stop="\n", max_tokens=8))
    assert (answer.text, answer.finish_reason, answer.matched_stop, answer.num_tokens) == (
        " Ann", "stop", "\n", 2)


def test_a_later_gen_is_cut_from_its_offset():
    offset = len(" Ann\njob:")
    answer = cut(spec(TEXT, TOKENS), offset, SamplingParams(stop="\n", max_tokens=8))
    assert (answer.text, answer.matched_stop, answer.num_tokens) == (" cook", "\n", 2)


def test_max_tokens_is_counted_in_the_speculated_tokens():
    answer = cut(spec(TEXT, TOKENS), 0, SamplingParams(stop="age", max_tokens=3))
    assert (answer.text, answer.finish_reason, answer.num_tokens) == (" Ann\njob:", "length", 3)
    assert cut(spec(TEXT, TOKENS), 0, SamplingParams(max_tokens=0)).text == ""


def test_stop_regex_cuts_at_the_first_match():
    answer = cut(spec(TEXT, TOKENS), 0, SamplingParams(stop_regex=r"[0-9]+", max_tokens=20))
    assert (answer.text, answer.matched_stop) == (" Ann\njob: cook\nage: ", "7")


def test_a_speculation_that_runs_out_decides_nothing_unless_the_model_ended_it():
    tokens = [" Ann", " and", " more"]
    assert cut(spec("".join(tokens), tokens), 0, SamplingParams(stop="\n", max_tokens=8)) is None
    ended = cut(spec("".join(tokens), tokens, finished=True), 0, SamplingParams(stop="\n", max_tokens=8))
    assert (ended.text, ended.finish_reason, ended.matched_stop) == (" Ann and more", "stop", None)
    ignoring = SamplingParams(stop="\n", max_tokens=8, ignore_eos=True)
    assert cut(spec("".join(tokens), tokens, finished=True), 0, ignoring) is None


def test_without_token_boundaries_a_stop_counts_only_within_a_byte_bound():
    assert cut(spec(TEXT, None), 0, SamplingParams(stop="\n", max_tokens=5)).text == " Ann"
    assert cut(spec(TEXT, None), 0, SamplingParams(stop="\n", max_tokens=4)) is None
    assert cut(spec(" Ann", None, finished=True), 0, SamplingParams(max_tokens=4)).text == " Ann"
    assert cut(spec(" Ann", None), 0, SamplingParams(max_tokens=40)) is None


def test_a_session_serves_only_prompts_that_continue_its_speculation():
    session = SpecSession(spec_tokens=16)
    session.remember(spec(TEXT, TOKENS))
    rules = SamplingParams(stop="\n")

    def after(prompt: str):
        return lambda s: prompt[len(s.key):] if prompt.startswith(s.key) else None

    assert session.serve(after("P Bob\njob:"), rules) is None          # the model wrote Ann
    assert session.serve(after("P Ann\nname:"), rules) is None
    assert session.serve(after("Q Ann\njob:"), rules) is None
    assert session.serve(after("P Ann\njob:"), SAMPLED) is None        # other sampling
    assert session.serve(after("P"), rules).text == " Ann"
    assert session.serve(after("P Ann\njob:"), rules).text == " cook"
    assert session.has("P", GREEDY) and not session.has("P", SAMPLED)


def test_a_sampled_speculation_answers_each_stretch_once():
    session = SpecSession(spec_tokens=16)
    rules = SamplingParams(temperature=0.8, stop="\n")
    session.remember(spec(TEXT, TOKENS, sampling=SAMPLED))

    def same(_spec):
        return ""

    assert session.serve(same, rules).text == " Ann"
    assert session.serve(same, rules) is None   # a second sample must not repeat the first
    greedy = SpecSession(spec_tokens=16)
    greedy.remember(spec(TEXT, TOKENS))
    assert greedy.serve(same, SamplingParams(stop="\n")).text == greedy.serve(same, SamplingParams(stop="\n")).text


# --------------------------------------------------------------------------- chat, whole turn

TURN = "name: Ann\njob: cook\nage: 7\n"
TURN_TOKENS = ["name", ":", " Ann", "\n", "job", ":", " cook", "\n", "age", ":", " 7", "\n"]


@program
async def card(s):
    s += user("Write a card: name, job, age.")
    with s.assistant():
        for field in ("name", "job", "age"):
            s += field + ":" + gen(field, stop="\n", max_tokens=8) + "\n"


def openai_api(*replies: httpx.Response) -> tuple[FakeAPI, aiolm.OpenAI, aiolm.OpenAI]:
    api = FakeAPI(*replies)
    common = dict(client=api.client(), chat=True, aiolm_server=False, backoff=0.001)
    return api, aiolm.OpenAI("m", spec_tokens=64, **common), aiolm.OpenAI("m", **common)


@pytest.mark.anyio
async def test_a_chat_turn_is_filled_from_one_call():
    api, b, _ = openai_api(httpx.Response(200, json=chat(TURN, tokens=TURN_TOKENS)))
    state = await card.run(backend=b)
    assert (state["name"], state["job"], state["age"]) == (" Ann", " cook", " 7")
    assert state.messages()[-1] == {"role": "assistant", "content": TURN}
    assert len(api.requests) == 1
    body = api.bodies[0]
    assert body["messages"] == [{"role": "user", "content": "Write a card: name, job, age."}]
    assert "stop" not in body and body["logprobs"] is True and body["max_completion_tokens"] >= 64
    assert b.statistics().calls_saved == 2


@pytest.mark.anyio
async def test_a_sampled_turn_that_misses_the_literal_text_is_retried():
    api, _, _ = openai_api(httpx.Response(200, json=chat("Name: Ann\n")),
                           httpx.Response(200, json=chat(TURN, tokens=TURN_TOKENS)))
    b = aiolm.OpenAI("m", client=api.client(), chat=True, aiolm_server=False, spec_tokens=64)
    state = await card.run(backend=b, temperature=0.7)
    assert state["job"] == " cook"
    assert len(api.requests) == 2 and b.statistics().speculation_misses == 1


@pytest.mark.anyio
async def test_a_greedy_turn_that_misses_needs_a_server_that_continues_turns():
    api, b, plain = openai_api(httpx.Response(200, json=chat("Name: Ann\n")))
    with pytest.raises(UnsupportedFeature, match="started assistant turn"):
        await card.run(backend=b)
    assert len(api.requests) == 1   # one speculation, no retry under greedy decoding
    with pytest.raises(UnsupportedFeature, match="spec_tokens"):
        await card.run(backend=plain)


@pytest.mark.anyio
async def test_a_gen_right_after_assistant_needs_no_speculation():
    api, _, plain = openai_api(httpx.Response(200, content=(
        b'data: {"choices": [{"index": 0, "delta": {"content": "Hi."}, "finish_reason": "stop"}]}\n\n'
        b"data: [DONE]\n\n"), headers={"content-type": "text/event-stream"}))

    @program
    async def hello(s):
        s += user("Say hi.")
        s += assistant(gen("greeting", max_tokens=8))

    state = await hello.run(backend=plain)
    assert state["greeting"] == "Hi." and len(api.requests) == 1
