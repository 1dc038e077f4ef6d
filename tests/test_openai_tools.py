"""aiolm.OpenAI with tools and reasoning, natively: what goes on the wire (tools,
tool_choice, parallel_tool_calls, reasoning_effort, tool turns and calls in the messages)
and what comes back (streamed tool_calls and reasoning_content), against a scripted API."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from fake_openai import FakeAPI, chat_stream, sse
from openai_server import running

import aiolm
from aiolm import ToolCall, assistant, gen, program, system, tool_result, user
from aiolm.backends import ScriptedBackend
from aiolm.backends.base import GenerateRequest, Reasoning
from aiolm.chat import Message, TextPart, messages_to_openai
from aiolm.errors import BackendError, UnsupportedFeature
from aiolm.sampling import SamplingParams
from aiolm.server import create_app

pytestmark = pytest.mark.anyio


def get_weather(city: str, unit: str = "celsius") -> str:
    """The current weather in a city."""
    return f"18 degrees {unit} in {city}"


def event(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}


def tool_call_stream(calls: list[tuple[str, str, list[str]]], *, finish: str = "tool_calls",
                     content: str = "") -> Any:
    """A streamed answer making ``calls`` ((id, name, argument pieces) each), as OpenAI
    streams them: id and name first, then the arguments in pieces."""
    events: list[dict[str, Any] | str] = [event({"role": "assistant", "content": content or None})]
    for index, (call_id, name, pieces) in enumerate(calls):
        events.append(event({"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                             "function": {"name": name, "arguments": ""}}]}))
        events += [event({"tool_calls": [{"index": index, "function": {"arguments": p}}]})
                   for p in pieces]
    events.append(event({}, finish))
    return sse(events)


def reasoning_stream(thinking: list[str], answer: list[str]) -> Any:
    events: list[dict[str, Any] | str] = [event({"role": "assistant", "content": ""})]
    events += [event({"reasoning_content": t}) for t in thinking]
    events += [event({"content": a}) for a in answer]
    events.append(event({}, "stop"))
    return sse(events)


def backend(api: FakeAPI, **kw: Any) -> aiolm.OpenAI:
    return aiolm.OpenAI("gpt-4o-mini", client=api.client(), **kw)


@program
async def weather_agent(s, question: str):
    s += system("You answer weather questions.")
    s += user(question)
    s += assistant(gen("calls", tools=[get_weather]))
    for call in await s.get("calls"):
        s += tool_result(call, get_weather(**call.arguments))
    s += assistant(gen("answer", tools=[get_weather]))


async def test_a_tool_round_trip_sends_tools_calls_and_results_in_the_wire_format():
    api = FakeAPI(
        tool_call_stream([("call_1", "get_weather", ['{"city": ', '"Paris"}'])]),
        chat_stream(["It is ", "18 degrees."]),
    )
    state = await weather_agent.run("Weather in Paris?", backend=backend(api))

    assert state["calls"] == [ToolCall(id="call_1", name="get_weather", arguments={"city": "Paris"})]
    assert state.meta("calls").finish_reason == "tool_calls"
    assert state.meta("calls").tool_calls == (state["calls"][0],)
    assert state["answer"] == "It is 18 degrees."
    assert state.meta("answer").tool_calls == ()

    first, second = api.bodies
    assert first["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"type": "string", "default": "celsius"}},
            "required": ["city"]}}}]
    assert first["tool_choice"] == "auto" and "parallel_tool_calls" not in first
    assert first["stream"] is True
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    assert second["messages"] == [
        {"role": "system", "content": "You answer weather questions."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "18 degrees celsius in Paris", "tool_call_id": "call_1"},
    ]
    assert state.messages() == [*second["messages"],
                                {"role": "assistant", "content": "It is 18 degrees."}]


def test_state_messages_are_valid_openai_message_params():
    pydantic = pytest.importorskip("pydantic")
    from openai.types.chat import ChatCompletionMessageParam

    messages = [
        Message(role="system", parts=(TextPart(text="S"),)),
        Message(role="user", parts=(TextPart(text="Q"),)),
        Message(role="assistant", tool_calls=(ToolCall(id="c1", name="f", arguments={"x": 1}),)),
        Message(role="tool", parts=(TextPart(text='{"ok": true}'),), tool_call_id="c1"),
        Message(role="assistant", parts=(TextPart(text="Done"),)),
    ]
    wire = messages_to_openai(messages)
    adapter = pydantic.TypeAdapter(list[ChatCompletionMessageParam])
    # (The SDK's types take any iterable of calls: dump the validated value to compare.)
    assert adapter.dump_python(adapter.validate_python(wire), mode="json") == wire
    assert wire[2] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]}


async def test_parallel_calls_stream_into_a_list_of_calls_in_index_order():
    api = FakeAPI(tool_call_stream([("a", "get_weather", ['{"city": "Paris"}']),
                                    ("b", "get_weather", ['{"city":', ' "Rome", "unit": "kelvin"}'])]))

    @program
    async def two(s):
        s += user("Paris and Rome?")
        s += assistant(gen("calls", tools=[get_weather], tool_choice="required"))

    state = await two.run(backend=backend(api))
    assert [(c.id, c.arguments) for c in state["calls"]] == [
        ("a", {"city": "Paris"}), ("b", {"city": "Rome", "unit": "kelvin"})]
    assert api.bodies[0]["tool_choice"] == "required"


async def test_a_named_tool_choice_and_no_parallel_calls_go_in_openai_form():
    api = FakeAPI(tool_call_stream([("c", "get_weather", ['{"city": "Oslo"}'])]))

    @program
    async def named(s):
        s += user("Oslo?")
        s += assistant(gen("calls", tools=[get_weather], tool_choice="get_weather",
                           parallel_tool_calls=False))

    await named.run(backend=backend(api))
    body = api.bodies[0]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["parallel_tool_calls"] is False


async def test_a_stream_that_says_stop_after_calls_finishes_with_tool_calls():
    api = FakeAPI(tool_call_stream([("c", "get_weather", ['{"city": "Oslo"}'])], finish="stop"))
    request = GenerateRequest(messages=(Message(role="user", parts=(TextPart(text="Oslo?"),)),),
                              tools=aiolm.tools.as_tools([get_weather]))
    done = await backend(api).generate(request)
    assert done.finish_reason == "tool_calls"
    assert done.tool_calls == (ToolCall(id="c", name="get_weather", arguments={"city": "Oslo"}),)


async def test_text_and_a_call_in_one_answer_keep_both():
    api = FakeAPI(tool_call_stream([("c", "get_weather", ['{"city": "Oslo"}'])],
                                   content="Let me check."))

    @program
    async def both(s):
        s += user("Oslo?")
        s += assistant(gen("calls", tools=[get_weather]))

    state = await both.run(backend=backend(api))
    assert state["calls"][0].name == "get_weather"
    assert state.messages()[-1] == {
        "role": "assistant", "content": "Let me check.",
        "tool_calls": [{"id": "c", "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}


async def test_tool_call_events_carry_the_calls_parsed_so_far():
    api = FakeAPI(tool_call_stream([("c", "get_weather", ['{"ci', 'ty": "Os', 'lo"}'])]))

    @program
    async def one(s):
        s += user("Oslo?")
        s += assistant(gen("calls", tools=[get_weather]))

    partials = []
    async with one.stream(backend=backend(api)) as events:
        async for ev in events:
            partials.append(ev.partial)
    assert partials == [
        [{"name": "get_weather", "arguments": {}}],
        [{"name": "get_weather", "arguments": {}}],
        [{"name": "get_weather", "arguments": {"city": "Os"}}],
        [{"name": "get_weather", "arguments": {"city": "Oslo"}}],
    ]


async def test_reasoning_content_goes_to_the_meta_and_effort_to_the_request():
    api = FakeAPI(reasoning_stream(["Paris is ", "in France."], ["Par", "is"]))

    @program
    async def think(s):
        s += user("Capital of France?")
        s += assistant(gen("answer", reasoning=True, reasoning_effort="low"))

    thoughts = []
    async with think.stream(backend=backend(api)) as events:
        async for ev in events:
            thoughts.append(ev.reasoning)
    state = events.state
    assert state["answer"] == "Paris"
    assert state.meta("answer").reasoning == "Paris is in France."
    assert "".join(thoughts) == "Paris is in France."
    assert api.bodies[0]["reasoning_effort"] == "low"
    assert "chat_template_kwargs" not in api.bodies[0]
    assert state.messages()[-1] == {"role": "assistant", "content": "Paris"}


async def test_a_thinking_budget_is_an_aiolm_server_extension():
    @program
    async def budget(s):
        s += user("Think briefly.")
        s += assistant(gen("answer", reasoning=True, max_thinking_tokens=16))

    with pytest.raises(UnsupportedFeature, match="max_thinking_tokens"):
        await budget.run(backend=backend(FakeAPI(chat_stream(["x"]))))

    api = FakeAPI(reasoning_stream(["hm"], ["ok"]), owned_by="aiolm")
    state = await budget.run(backend=backend(api))
    assert state.meta("answer").reasoning == "hm"
    assert api.bodies[0]["max_thinking_tokens"] == 16


async def test_thinking_switched_off_goes_as_a_template_variable():
    api = FakeAPI(chat_stream(["ok"]), owned_by="aiolm")
    request = GenerateRequest(messages=(Message(role="user", parts=(TextPart(text="Hi"),)),),
                              reasoning=Reasoning(enabled=False))
    done = await backend(api).generate(request)
    assert done.text == "ok"
    assert api.bodies[0]["chat_template_kwargs"] == {"enable_thinking": False}


async def test_tool_and_reasoning_gens_are_never_speculated():
    api = FakeAPI(tool_call_stream([("c", "get_weather", ['{"city": "Oslo"}'])]),
                  reasoning_stream(["hm"], ["Sunny."]))

    @program
    async def agent(s):
        s += user("Oslo?")
        s += assistant(gen("calls", tools=[get_weather]))
        s += tool_result((await s.get("calls"))[0], {"weather": "sunny"})
        s += assistant(gen("answer", reasoning=True))

    api_backend = backend(api, spec_tokens=64)
    state = await agent.run(backend=api_backend)
    assert state["answer"] == "Sunny."
    assert all(body["stream"] is True for body in api.bodies)
    assert api_backend.statistics().speculative_calls == 0
    assert api.bodies[1]["messages"][-1] == {
        "role": "tool", "content": '{"weather": "sunny"}', "tool_call_id": "c"}


async def test_malformed_tool_calls_from_the_api_raise_backend_error():
    api = FakeAPI(sse([event({"role": "assistant", "content": ""}),
                       event({"tool_calls": "not a list"}), event({}, "tool_calls")]))

    @program
    async def one(s):
        s += user("Oslo?")
        s += assistant(gen("calls", tools=[get_weather]))

    with pytest.raises(BackendError, match="tool_calls"):
        await one.run(backend=backend(api, max_retries=0))


async def test_a_call_cut_short_by_max_tokens_is_no_call():
    api = FakeAPI(tool_call_stream([("c", "get_weather", ['{"city": "Os'])], finish="length"))

    @program
    async def one(s):
        s += user("Oslo?")
        s += assistant(gen("calls", tools=[get_weather], max_tokens=5))

    state = await one.run(backend=backend(api))
    assert state["calls"] == ""
    assert state.meta("calls").finish_reason == "length"
    assert state.meta("calls").tool_calls == ()


async def test_a_completion_model_refuses_tools_sent_around_the_chat_layer():
    api = FakeAPI(chat_stream(["x"]))
    request = GenerateRequest(messages=(Message(role="user", parts=(TextPart(text="Hi"),)),),
                              tools=aiolm.tools.as_tools([get_weather]))
    with pytest.raises(UnsupportedFeature, match="stream_chat"):
        await aiolm.OpenAI("davinci-002", client=api.client()).generate(request)


def test_tool_results_are_json_unless_text():
    assert tool_result("c", {"t": 18}).content == json.dumps({"t": 18})
    assert tool_result("c", "raw text").content == "raw text"


async def test_a_logit_bias_goes_to_the_api_and_is_not_speculated():
    api = FakeAPI(chat_stream(["ok"]))
    api_backend = backend(api, spec_tokens=32)
    request = GenerateRequest(messages=(Message(role="user", parts=(TextPart(text="Hi"),)),),
                              sampling=SamplingParams(logit_bias={42: -100, 7: 2.5}),
                              session=api_backend.new_session())
    assert (await api_backend.generate(request)).text == "ok"
    assert api.bodies[0]["logit_bias"] == {"7": 2.5, "42": -100.0}
    assert api.bodies[0]["stream"] is True
    assert api_backend.statistics().speculative_calls == 0


# --------------------------------------------------------------------------- aiolm's server

@pytest.fixture(scope="module")
def scripted_server():
    """aiolm's server over a ScriptedBackend that thinks, then calls get_weather or answers."""
    def reply(prompt: str) -> str:
        if "<tool_response>" in prompt:
            return "<think>The tool said 18.</think>It is 18 degrees."
        call = json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})
        return f"<think>I should look it up.</think><tool_call>\n{call}\n</tool_call>"

    app = create_app(ScriptedBackend(reply, delay=0.001), model_name="scripted",
                     tool_parser="hermes", reasoning_parser="qwen3")
    with running(app) as url:
        yield url


async def test_tools_and_reasoning_round_trip_through_aiolm_serve(scripted_server):
    @program
    async def agent(s):
        s += user("Weather in Paris?")
        s += assistant(gen("calls", tools=[get_weather], reasoning=True))
        for call in await s.get("calls"):
            s += tool_result(call, get_weather(**call.arguments))
        s += assistant(gen("answer", tools=[get_weather], reasoning=True))

    api = aiolm.OpenAI("scripted", client=openai.AsyncOpenAI(base_url=scripted_server, api_key="x"))
    async with api.client:
        state = await agent.run(backend=api)
    (call,) = state["calls"]
    assert (call.name, call.arguments) == ("get_weather", {"city": "Paris"})
    assert state.meta("calls").reasoning == "I should look it up."
    assert state.meta("calls").finish_reason == "tool_calls"
    assert state["answer"] == "It is 18 degrees."
    assert state.meta("answer").reasoning == "The tool said 18."
    assert state.messages()[1:] == [
        {"role": "assistant", "content": None, "tool_calls": [call.to_openai()]},
        {"role": "tool", "content": "18 degrees celsius in Paris", "tool_call_id": call.id},
        {"role": "assistant", "content": "It is 18 degrees."},
    ]
