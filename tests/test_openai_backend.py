"""What the OpenAI backend sends and how it reads answers (a scripted API behind
httpx.MockTransport): constraints, extensions, stops, images, select, capabilities."""

from __future__ import annotations

import httpx
import pytest
from fake_openai import FakeAPI, chat, chat_stream, completion, completion_stream

import aiolm
from aiolm.backends import GenerateRequest, ImageData
from aiolm.backends._openai_tokens import local_encoding
from aiolm.chat import SIMPLE_TEMPLATE, ImagePart, Message, TextPart
from aiolm.constraints import Choices, Grammar, JSONSchema, Regex
from aiolm.errors import ConstraintError, UnsupportedFeature
from aiolm.sampling import SamplingParams

pytestmark = pytest.mark.anyio


def user(text: str) -> Message:
    return Message(role="user", parts=(TextPart(text=text),))


def assistant(text: str = "") -> Message:
    return Message(role="assistant", parts=(TextPart(text=text),) if text else ())


def backend(api: FakeAPI, *, chat: bool, **kw) -> aiolm.OpenAI:
    return aiolm.OpenAI("m", client=api.client(), chat=chat, backoff=0.001, **kw)


async def test_chat_request_streams_with_usage_and_maps_sampling():
    api = FakeAPI(chat_stream(["Hel", "lo"]))
    b = backend(api, chat=True)
    sampling = SamplingParams(max_tokens=7, temperature=0.5, top_p=0.9, seed=3, stop=["\n"])
    done = await b.generate(GenerateRequest(messages=(user("Hi"), assistant()), sampling=sampling))
    assert done.text == "Hello" and done.finish_reason == "stop"
    body = api.bodies[0]
    assert body["messages"] == [{"role": "user", "content": "Hi"}]
    assert (body["max_completion_tokens"], body["temperature"], body["top_p"], body["seed"]) == (7, 0.5, 0.9, 3)
    assert body["stop"] == ["\n"] and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


async def test_completion_usage_and_cached_tokens_reach_statistics():
    api = FakeAPI(completion_stream(["a", "b"]))
    b = backend(api, chat=False)
    done = await b.generate(GenerateRequest(prompt="x"))
    assert done.usage.prompt_tokens == 4 and done.usage.completion_tokens == 2
    stats = b.statistics()
    assert (stats.calls, stats.prompt_tokens, stats.completion_tokens) == (1, 4, 2)
    assert api.bodies[0]["prompt"] == "x"


async def test_json_schema_on_a_chat_model_becomes_a_response_format():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    api = FakeAPI(chat_stream(['{"a": ', "1}"]))
    request = GenerateRequest(messages=(user("JSON please"),), constraint=JSONSchema(schema))
    done = await backend(api, chat=True).generate(request)
    assert done.text == '{"a": 1}'
    fmt = api.bodies[0]["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"] == schema


async def test_an_answer_that_breaks_the_schema_is_a_constraint_error():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    api = FakeAPI(chat_stream(['{"b": ', "1}"]))
    request = GenerateRequest(messages=(user("JSON please"),), constraint=JSONSchema(schema))
    with pytest.raises(ConstraintError, match="does not satisfy"):
        await backend(api, chat=True).generate(request)


async def test_regex_and_grammar_on_a_chat_model_are_unsupported():
    api = FakeAPI(chat_stream(["x"]))
    b = backend(api, chat=True)
    assert not b.capabilities.regex
    for constraint in (Regex("[0-9]+"), Grammar('start: "a"')):
        with pytest.raises(UnsupportedFeature):
            async with b.stream(GenerateRequest(messages=(user("n?"),), constraint=constraint)):
                pass
    assert api.requests == []


async def test_constraints_on_a_completion_model_go_only_to_aiolm_servers():
    plain = FakeAPI(completion_stream(["7"]), owned_by="openai")
    with pytest.raises(UnsupportedFeature, match="regex"):
        await backend(plain, chat=False).generate(GenerateRequest(prompt="n?", constraint=Regex("[0-9]")))
    assert plain.requests == []
    ours = FakeAPI(completion_stream(["7"]), owned_by="aiolm")
    done = await backend(ours, chat=False).generate(
        GenerateRequest(prompt="n?", constraint=Choices(["7", "8"])))
    assert done.text == "7"
    assert ours.bodies[0]["regex"] == "7|8"


async def test_sampling_options_beyond_the_openai_api_go_only_to_aiolm_servers():
    sampling = SamplingParams(top_k=5, min_p=0.1, stop_token_ids=[2])
    with pytest.raises(UnsupportedFeature, match="top_k"):
        await backend(FakeAPI(completion_stream(["a"])), chat=False, aiolm_server=False).generate(
            GenerateRequest(prompt="x", sampling=sampling))
    ours = FakeAPI(completion_stream(["a"]))
    await backend(ours, chat=False, aiolm_server=True).generate(GenerateRequest(prompt="x", sampling=sampling))
    body = ours.bodies[0]
    assert (body["top_k"], body["min_p"], body["stop_token_ids"]) == (5, 0.1, [2])


async def test_continuing_a_started_assistant_turn_needs_aiolm_server():
    request = GenerateRequest(messages=(user("Name?"), assistant("name:")))
    with pytest.raises(UnsupportedFeature, match="started assistant turn"):
        await backend(FakeAPI(chat_stream(["x"])), chat=True, aiolm_server=False).generate(request)
    ours = FakeAPI(chat_stream([" Bob"]))
    done = await backend(ours, chat=True, aiolm_server=True).generate(request)
    assert done.text == " Bob"
    body = ours.bodies[0]
    assert body["continue_final_message"] is True
    assert body["messages"][-1] == {"role": "assistant", "content": "name:"}


async def test_stop_regex_and_more_than_four_stops_apply_on_the_client():
    pieces = ["The", " answer", " is", " 42", ".", " More"]
    api = FakeAPI(completion_stream(pieces))
    b = backend(api, chat=False)
    done = await b.generate(GenerateRequest(prompt="Q", sampling=SamplingParams(stop_regex=r"[0-9]+")))
    assert (done.text, done.matched_stop, done.finish_reason) == ("The answer is ", "42", "stop")
    assert "stop" not in api.bodies[0]
    many = SamplingParams(stop=["x1", "x2", "x3", "x4", "."])
    done = await b.generate(GenerateRequest(prompt="Q", sampling=many))
    assert (done.text, done.matched_stop) == ("The answer is 42", ".")
    assert "stop" not in api.bodies[1]
    done = await b.generate(GenerateRequest(prompt="Q", sampling=SamplingParams(stop=["zzz"])))
    assert done.text == "".join(pieces) and api.bodies[2]["stop"] == ["zzz"]


async def test_images_go_as_image_url_content_parts():
    api = FakeAPI(chat_stream(["A red pixel."]))
    turn = Message(role="user", parts=(ImagePart(image=ImageData(data=b"\x89PNG", mime="image/png")),
                                       TextPart(text="What is it?")))
    await backend(api, chat=True).generate(GenerateRequest(messages=(turn, assistant())))
    content = api.bodies[0]["messages"][0]["content"]
    assert content[0] == {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw=="}}
    assert content[1] == {"type": "text", "text": "What is it?"}


async def test_completion_model_rejects_images():
    with pytest.raises(UnsupportedFeature, match="images"):
        await backend(FakeAPI(completion_stream(["x"])), chat=False).generate(
            GenerateRequest(prompt="x", images=(ImageData(data=b"x"),)))


async def test_chat_logprobs_are_read_per_token():
    api = FakeAPI(httpx.Response(200, content=(
        b'data: {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": null, '
        b'"logprobs": {"content": [{"token": "Hi", "logprob": -0.25, "top_logprobs": '
        b'[{"token": "Hi", "logprob": -0.25}, {"token": "Yo", "logprob": -2.0}]}]}}]}\n\n'
        b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}\n\ndata: [DONE]\n\n'),
        headers={"content-type": "text/event-stream"}))
    done = await backend(api, chat=True).generate(GenerateRequest(
        messages=(user("x"),), sampling=SamplingParams(logprobs=True, top_logprobs=2)))
    assert done.finish_reason == "length"
    assert [(lp.token, lp.logprob) for lp in done.logprobs] == [("Hi", -0.25)]
    assert [t for _, t, _ in done.logprobs[0].top] == ["Hi", "Yo"]
    assert api.bodies[0]["logprobs"] is True and api.bodies[0]["top_logprobs"] == 2


async def test_select_on_a_chat_model_asks_for_an_enum_answer():
    api = FakeAPI(httpx.Response(200, json=chat('{"choice": "no"}')))
    result = await backend(api, chat=True, aiolm_server=False).score(
        GenerateRequest(messages=(user("Is the sky green?"), assistant())), ["yes", "no"])
    assert result.index == 1 and result.normalized_logprobs[1] == 0.0
    schema = api.bodies[0]["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["choice"]["enum"] == ["yes", "no"]
    assert api.bodies[0]["messages"] == [{"role": "user", "content": "Is the sky green?"}]


def echoed(prefix: str, choice: str, choice_lps: list[float], top_hits: list[bool]) -> dict:
    tokens = [prefix] + list(choice)  # one token per character of the choice
    tops = [None] + [{c if hit else "?": 0.0} for c, hit in zip(choice, top_hits, strict=True)]
    offsets = [0] + [len(prefix) + i for i in range(len(choice))]
    return {"index": 0, "text": prefix + choice, "finish_reason": "length",
            "logprobs": {"tokens": tokens, "token_logprobs": [None, *choice_lps],
                         "top_logprobs": tops, "text_offset": offsets}}


async def test_select_on_a_completion_model_scores_echoed_logprobs():
    rows = [echoed("Q: sky? A:", " yes", [-1.0, -1.0, -1.0, -1.0], [True, False, False, False]),
            echoed("Q: sky? A:", " no", [-0.5, -0.5, -0.5], [True, True, True])]
    rows[1]["index"] = 1
    api = FakeAPI(httpx.Response(200, json={"id": "c", "object": "text_completion", "created": 0,
                                            "model": "m", "choices": rows}))
    b = backend(api, chat=False, aiolm_server=False)
    result = await b.score(GenerateRequest(prompt="Q: sky? A:"), [" yes", " no"])
    assert result.index == 1
    assert result.token_logprobs == ((-1.0,) * 4, (-0.5,) * 3)
    body = api.bodies[0]
    assert body["prompt"] == ["Q: sky? A: yes", "Q: sky? A: no"]
    assert (body["echo"], body["max_tokens"], body["logprobs"]) == (True, 0, 1)
    greedy = await b.score(GenerateRequest(prompt="Q: sky? A:"), [" yes", " no"], "greedy")
    assert greedy.index == 1
    with pytest.raises(UnsupportedFeature):
        await b.score(GenerateRequest(prompt="Q: sky? A:"), [" yes", " no"], "unconditional_normalized")


def test_model_kind_and_capabilities_are_guessed_from_the_name():
    def make(name: str, **kw) -> aiolm.OpenAI:
        return aiolm.OpenAI(name, api_key="k", **kw)

    gpt = make("gpt-4o-mini")
    assert gpt.capabilities.chat_only and gpt.capabilities.images and gpt.chat_template is None
    instruct = make("gpt-3.5-turbo-instruct")
    assert not instruct.capabilities.chat_only and instruct.chat_template is SIMPLE_TEMPLATE
    assert not make("o3-mini").capabilities.logprobs
    assert not make("gpt-4o-mini", chat=False).capabilities.chat_only
    assert not make("davinci-002", aiolm_server=False).capabilities.regex


def test_bad_arguments_name_themselves(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="api_key"):
        aiolm.OpenAI("gpt-4o")
    with pytest.raises(TypeError, match="model"):
        aiolm.OpenAI("", api_key="k")
    with pytest.raises(ValueError, match="spec_tokens"):
        aiolm.OpenAI("m", api_key="k", spec_tokens=0)
    with pytest.raises(ValueError, match="base_url"):
        aiolm.OpenAI("m", client=FakeAPI().client(), base_url="http://x")


def test_token_counting_needs_a_local_encoding_and_never_downloads(monkeypatch, tmp_path):
    import tiktoken.load

    def no_network(*args, **kwargs):
        raise AssertionError("tiktoken tried to download an encoding")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    local_encoding.cache_clear()
    try:
        assert aiolm.OpenAI("gpt-4o", api_key="k").count_tokens("hello") is None
        assert aiolm.OpenAI("my-local-model", api_key="k").count_tokens("hello") is None
    finally:
        local_encoding.cache_clear()


def test_new_session_carries_the_speculation_length():
    b = aiolm.OpenAI("m", api_key="k", spec_tokens=32)
    assert b.new_session().spec_tokens == 32
    assert b.new_session(spec_tokens=8).spec_tokens == 8
    assert aiolm.OpenAI("m", api_key="k").new_session().spec_tokens is None


async def test_a_completion_speculation_asks_for_more_tokens_without_stop():
    api = FakeAPI(httpx.Response(200, json=completion(
        " Ann\nage: 7\n", tokens=[" Ann", "\n", "age", ":", " 7", "\n"], finish="stop")))
    b = backend(api, chat=False, spec_tokens=40)
    session = b.new_session()
    first = await b.generate(GenerateRequest(prompt="name:", session=session,
                                             sampling=SamplingParams(max_tokens=5, stop="\n")))
    body = api.bodies[0]
    assert (body["max_tokens"], body["logprobs"]) == (40, 0) and "stop" not in body
    assert "stream" not in body
    second = await b.generate(GenerateRequest(prompt="name: Ann\nage:", session=session,
                                              sampling=SamplingParams(max_tokens=5, stop="\n")))
    assert (first.text, second.text) == (" Ann", " 7")
    assert (first.matched_stop, second.matched_stop) == ("\n", "\n")
    assert len(api.requests) == 1 and b.statistics().calls_saved == 1
