"""Tool calling and reasoning on /v1/chat/completions, over the Engine with a tiny random-weight
model (SmolLM2's tokenizer) and chat templates after Qwen2.5 (tools) and Qwen3 (thinking),
driven by the real ``openai`` client, sync and async, against uvicorn on 127.0.0.1.

The weights are random, so calls are forced (``tool_choice="required"`` or a named tool):
the grammar makes every call well formed whatever the model prefers."""

from __future__ import annotations

import contextlib
import json

import httpx
import jsonschema
import openai
import pytest
from chat_templates import THINKING_TEMPLATE, TOOLS_TEMPLATE
from openai_server import running
from tiny_chat import tiny_chat_model

from aiolm import Engine
from aiolm.server import create_app
from aiolm.server.cli import build_parser, engine_options

pytestmark = pytest.mark.anyio

# NOTE: tests that iterate the SDK's own stream run on asyncio only (see test_server.py).
SDK_STREAM = pytest.mark.parametrize("anyio_backend", ["asyncio"])

WEATHER_ARGS = {"type": "object",
                "properties": {"city": {"type": "string", "maxLength": 12},
                               "unit": {"enum": ["C", "F"]}},
                "required": ["city", "unit"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "A city's weather",
                                            "parameters": WEATHER_ARGS}}
TIME_ARGS = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}},
             "required": ["zone"], "additionalProperties": False}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": TIME_ARGS}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
FORCED = dict(tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=0,
              max_tokens=80)


def serve(template: str):
    engine = Engine(tiny_chat_model(template), max_total_tokens=4096)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        async with engine:
            yield

    return engine, running(create_app(engine, lifespan=lifespan))


@pytest.fixture(scope="module")
def tools_server():
    engine, server = serve(TOOLS_TEMPLATE)
    with server as url:
        yield url, engine


@pytest.fixture(scope="module")
def thinking_server():
    engine, server = serve(THINKING_TEMPLATE)
    with server as url:
        yield url, engine


@pytest.fixture
async def client(tools_server):
    async with openai.AsyncOpenAI(base_url=tools_server[0], api_key="none", max_retries=0) as c:
        yield c


@pytest.fixture
async def thinker(thinking_server):
    async with openai.AsyncOpenAI(base_url=thinking_server[0], api_key="none", max_retries=0) as c:
        yield c


@pytest.fixture
def model(tools_server):
    return tools_server[1].model_name


def arguments_of(call) -> dict:
    arguments = json.loads(call.function.arguments)
    assert isinstance(arguments, dict)
    return arguments


# ------------------------------------------------------------------------ round trips

def test_a_tool_round_trip_with_the_sync_client(tools_server):
    url, engine = tools_server
    with openai.OpenAI(base_url=url, api_key="none", max_retries=0) as client:
        first = client.chat.completions.create(model=engine.model_name, messages=ASK, **FORCED)
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        [call] = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(arguments_of(call), WEATHER_ARGS if call.function.name == "get_weather"
                            else TIME_ARGS)
        messages = [*ASK, choice.message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
        second = client.chat.completions.create(model=engine.model_name, messages=messages,
                                                tools=TOOLS, temperature=0, max_tokens=8)
    answer = second.choices[0]
    assert answer.finish_reason in ("stop", "length")
    assert isinstance(answer.message.content, str) and not answer.message.tool_calls
    # The server rendered the whole conversation, the call and its result included.
    rendered = engine.render_chat(messages, tools=TOOLS)
    assert '<tool_response>\n{"temperature": 21}\n</tool_response>' in rendered
    assert second.usage.prompt_tokens == len(engine.tokenizer.encode(rendered))
    assert second.usage.prompt_tokens_details.cached_tokens > 0   # the first turn's prefix


@SDK_STREAM
async def test_a_streamed_tool_round_trip_with_the_async_client(client, model):
    whole = await client.chat.completions.create(model=model, messages=ASK, **FORCED)
    stream = await client.chat.completions.create(model=model, messages=ASK, stream=True, **FORCED)
    calls: dict[int, dict] = {}
    finish, content = None, []
    async with stream:
        async for chunk in stream:
            for c in chunk.choices:
                content.append(c.delta.content or "")
                finish = c.finish_reason or finish
                for piece in c.delta.tool_calls or ():
                    if piece.index not in calls:   # the first piece: id, type and name
                        assert piece.id and piece.type == "function" and piece.function.name
                        calls[piece.index] = {"id": piece.id, "name": piece.function.name,
                                              "arguments": ""}
                    else:
                        assert piece.id is None and piece.function.name is None
                    calls[piece.index]["arguments"] += piece.function.arguments or ""
    assert finish == "tool_calls" and "".join(content) == ""
    expected = [(c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls]
    assert [(c["name"], c["arguments"]) for c in calls.values()] == expected
    call = calls[0]
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call["id"], "type": "function",
         "function": {"name": call["name"], "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": "21 C"}]
    kw = dict(model=model, messages=messages, tools=TOOLS, temperature=0, max_tokens=6)
    reply = (await client.chat.completions.create(**kw)).choices[0]
    pieces = []
    stream = await client.chat.completions.create(stream=True, **kw)
    async with stream:
        async for chunk in stream:
            for c in chunk.choices:
                assert not c.delta.tool_calls
                pieces.append(c.delta.content or "")
    assert not reply.message.tool_calls and "".join(pieces) == reply.message.content


async def test_the_sdk_message_object_goes_back_as_it_is(client, model):
    first = await client.chat.completions.create(model=model, messages=ASK, **FORCED)
    message = first.choices[0].message
    call = message.tool_calls[0]
    second = await client.chat.completions.create(
        model=model, tools=TOOLS, temperature=0, max_tokens=4,
        messages=[*ASK, message, {"role": "tool", "tool_call_id": call.id, "content": "sunny"}])
    assert second.choices[0].finish_reason in ("stop", "length")


# ---------------------------------------------------------------- tool_choice, strict, n

async def test_a_named_tool_choice_calls_that_tool(client, model):
    done = await client.chat.completions.create(
        model=model, messages=ASK, **{**FORCED, "tool_choice": {"type": "function",
                                                                  "function": {"name": "get_time"}}})
    [call] = done.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    jsonschema.validate(arguments_of(call), TIME_ARGS)


async def test_parallel_calls_may_come_several_with_their_own_ids(client, model):
    done = await client.chat.completions.create(
        model=model, messages=ASK, **{**FORCED, "parallel_tool_calls": True, "max_tokens": 200})
    calls = done.choices[0].message.tool_calls
    assert calls and len({c.id for c in calls}) == len(calls)
    complete = calls if done.choices[0].finish_reason == "tool_calls" else calls[:-1]
    for call in complete:
        jsonschema.validate(arguments_of(call), WEATHER_ARGS if call.function.name == "get_weather"
                            else TIME_ARGS)


async def test_a_strict_tool_gets_arguments_valid_under_its_schema(client, model):
    strict = {"type": "function", "function": {"name": "get_weather", "strict": True,
                                               "parameters": WEATHER_ARGS}}
    done = await client.chat.completions.create(
        model=model, messages=ASK, **{**FORCED, "tools": [strict], "max_tokens": 60, "n": 2,
                                      "temperature": 1, "seed": 5})
    for choice in done.choices:
        [call] = choice.message.tool_calls
        jsonschema.validate(arguments_of(call), WEATHER_ARGS)


async def test_tool_choice_none_answers_in_text(client, model):
    done = await client.chat.completions.create(model=model, messages=ASK, tools=TOOLS,
                                                tool_choice="none", temperature=0, max_tokens=6)
    choice = done.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert isinstance(choice.message.content, str) and not choice.message.tool_calls


# ------------------------------------------------------------------------- reasoning

async def test_a_thinking_model_answers_with_reasoning_content_apart(thinker, thinking_server):
    model = thinking_server[1].model_name
    done = await thinker.chat.completions.create(
        model=model, messages=ASK, temperature=0, max_tokens=40,
        extra_body={"max_thinking_tokens": 6})
    message = done.choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    assert reasoning and "<think>" not in reasoning and "</think>" not in reasoning
    assert "</think>" not in (message.content or "")
    assert len(thinking_server[1].tokenizer.encode(reasoning)) <= 6


@pytest.mark.parametrize("budget", [0, 3, 10])
async def test_max_thinking_tokens_bounds_the_thinking(thinker, thinking_server, budget):
    done = await thinker.chat.completions.create(
        model=thinking_server[1].model_name, messages=ASK, temperature=1, seed=budget,
        max_tokens=60, extra_body={"max_thinking_tokens": budget})
    reasoning = done.choices[0].message.model_extra.get("reasoning_content") or ""
    assert len(thinking_server[1].tokenizer.encode(reasoning)) <= budget


async def test_enable_thinking_false_answers_without_reasoning(thinker, thinking_server):
    done = await thinker.chat.completions.create(
        model=thinking_server[1].model_name, messages=ASK, temperature=0, max_tokens=8,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    message = done.choices[0].message
    assert not message.model_extra.get("reasoning_content")
    assert isinstance(message.content, str)


@SDK_STREAM
async def test_streamed_reasoning_content_equals_the_whole(thinker, thinking_server):
    kw = dict(model=thinking_server[1].model_name, messages=ASK, temperature=0, max_tokens=30,
              extra_body={"max_thinking_tokens": 8})
    whole = (await thinker.chat.completions.create(**kw)).choices[0].message
    reasoning, content = [], []
    stream = await thinker.chat.completions.create(stream=True, **kw)
    async with stream:
        async for chunk in stream:
            for c in chunk.choices:
                reasoning.append(c.delta.model_extra.get("reasoning_content") or "")
                content.append(c.delta.content or "")
    assert "".join(reasoning) == whole.model_extra["reasoning_content"]
    assert "".join(content) == whole.content


async def test_a_thinking_model_calls_tools_after_thinking(thinker, thinking_server):
    done = await thinker.chat.completions.create(
        model=thinking_server[1].model_name, messages=ASK,
        **{**FORCED, "max_tokens": 100}, extra_body={"max_thinking_tokens": 4})
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls"
    jsonschema.validate(arguments_of(choice.message.tool_calls[0]),
                        WEATHER_ARGS if choice.message.tool_calls[0].function.name == "get_weather"
                        else TIME_ARGS)


# ------------------------------------------------------------------------ bad inputs

BAD_SCHEMA = {"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"a": {"type": "nonsense"}}}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}


@pytest.mark.parametrize(("extra", "param"), [
    ({"tools": [BAD_SCHEMA]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": [TIME, TIME]}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools"),
    ({"tools": {"get_time": TIME}}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"messages": [*ASK, {"role": "tool", "content": "x"}]}, "messages[1].tool_call_id"),
    ({"messages": [*ASK, {"role": "tool", "tool_call_id": "call_9", "content": "x"}]},
     "messages[1].tool_call_id"),
    ({"messages": [*ASK, {"role": "tool", "tool_call_id": "call_1", "content": "x"},
                   {"role": "assistant", "tool_calls": [CALL]}]}, "messages[1].tool_call_id"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": [
        {**CALL, "function": {"name": "get_time", "arguments": "{oops"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": [{"type": "function"}]}]},
     "messages[1].tool_calls[0].id"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": {"id": "x"}}]},
     "messages[1].tool_calls"),
])
async def test_bad_tool_inputs_are_a_400_naming_the_field(tools_server, extra, param):
    url, engine = tools_server
    body = {"model": engine.model_name, "messages": ASK, "max_tokens": 2, **extra}
    async with httpx.AsyncClient(timeout=30) as raw:
        answer = await raw.post(f"{url}/chat/completions", json=body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param


async def test_the_sdk_raises_its_bad_request_error_naming_the_field(client, model):
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=model, messages=ASK, tools=[BAD_SCHEMA])
    assert info.value.param == "tools" and "nonsense" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(
            model=model, messages=[*ASK, {"role": "tool", "tool_call_id": "call_x", "content": "1"}])
    assert info.value.param == "messages[1].tool_call_id"


async def test_a_forced_call_with_a_response_format_is_a_400(client, model):
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=model, messages=ASK, **FORCED,
                                             response_format={"type": "json_object"})
    assert info.value.param == "tool_choice"


# ---------------------------------------------------------------- create_app and serve

def test_create_app_refuses_an_unknown_parser_name():
    engine = Engine(tiny_chat_model(TOOLS_TEMPLATE))
    with pytest.raises(ValueError, match="tool_parser"):
        create_app(engine, tool_parser="nope")
    with pytest.raises(ValueError, match="reasoning_parser"):
        create_app(engine, reasoning_parser="nope")
    create_app(engine, tool_parser="hermes", reasoning_parser="qwen3")


def test_serve_takes_the_parsers_and_a_chat_template_file(tmp_path, capsys):
    template = tmp_path / "template.jinja"
    template.write_text(TOOLS_TEMPLATE)
    args = build_parser().parse_args(["--tool-parser", "hermes", "--reasoning-parser", "qwen3",
                                      "--chat-template", str(template)])
    assert (args.tool_parser, args.reasoning_parser) == ("hermes", "qwen3")
    assert engine_options(args)["chat_template"] == template
    for bad in (["--tool-parser", "nope"], ["--chat-template", str(tmp_path / "missing")]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(bad)
    assert "nope" in capsys.readouterr().err
