"""Tools, reasoning and typed streaming in programs: ``gen(tools=...)`` → ``ToolCall``s →
``tool_result`` → the answer; ``gen(reasoning=True)`` → thinking in the meta; ``partial`` on
stream events; ``state.messages()`` in the OpenAI format.

On the ScriptedBackend (a text model: tools are described in its prompt and its hermes-format
reply parsed), on the Engine with a tiny random-weight model whose chat template renders
tools and thinking (a forced call is valid by grammar whatever the weights), and the
messages a program made fed to the real ``openai`` client against aiolm's server."""

from __future__ import annotations

import contextlib
import json
from typing import Any, Literal

import jsonschema
import openai
import pytest
from chat_templates import THINKING_TEMPLATE, TOOLS_TEMPLATE
from openai_server import running
from tiny_chat import tiny_chat_model

import aiolm
from aiolm import ProgramError, ToolCall, assistant, gen, program, system, tool_result, user
from aiolm.backends import ScriptedBackend
from aiolm.server import create_app

pytestmark = pytest.mark.anyio


def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> dict[str, Any]:
    """The current weather in a city."""
    return {"city": city, "temperature": 18, "unit": unit}


def call_text(name: str, **arguments: Any) -> str:
    """A call written the way hermes-format models (Qwen2.5, Hermes) write one."""
    return ("<tool_call>\n" + json.dumps({"name": name, "arguments": arguments})
            + "\n</tool_call>")


def weather_model(prompt: str) -> str:
    """Calls get_weather for each city asked about; answers once the results are in."""
    if "<tool_response>" in prompt:
        return "It is 18 degrees in Paris."
    question = prompt.rsplit("USER: ", 1)[1]
    cities = [c for c in ("Paris", "Rome") if c in question]
    return "\n".join(call_text("get_weather", city=c) for c in cities) or "Which city?"


@program
async def weather_agent(s, question: str):
    s += system("You answer weather questions.")
    s += user(question)
    s += assistant(gen("calls", tools=[get_weather]))
    calls = await s.get("calls")
    if isinstance(calls, str):
        return
    for call in calls:
        s += tool_result(call, get_weather(**call.arguments))
    s += assistant(gen("answer", tools=[get_weather]))


# --------------------------------------------------------------------------- scripted: tools

async def test_a_tool_round_trip_on_the_scripted_backend():
    model = ScriptedBackend(weather_model)
    state = await weather_agent.run("Weather in Paris?", backend=model)

    (call,) = state["calls"]
    assert isinstance(call, ToolCall) and call.id.startswith("call_")
    assert (call.name, call.arguments) == ("get_weather", {"city": "Paris"})
    assert state.meta("calls").finish_reason == "tool_calls"
    assert state.meta("calls").tool_calls == (call,)
    assert state["answer"] == "It is 18 degrees in Paris."
    assert state.meta("answer").finish_reason == "stop" and state.meta("answer").tool_calls == ()

    # The tools were described to the model in its system turn, in the format it answers in.
    first_prompt = model.requests[0].prompt
    assert first_prompt.startswith("SYSTEM: You answer weather questions.")
    assert '"name": "get_weather"' in first_prompt and "<tool_call>" in first_prompt
    result = json.dumps({"city": "Paris", "temperature": 18, "unit": "celsius"})
    assert state.messages() == [
        {"role": "system", "content": "You answer weather questions."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call.to_openai()]},
        {"role": "tool", "content": result, "tool_call_id": call.id},
        {"role": "assistant", "content": "It is 18 degrees in Paris."},
    ]
    # The second request showed the model its call and the result.
    assert (f"ASSISTANT: {call_text('get_weather', city='Paris')}\n"
            f"USER: <tool_response>\n{result}\n</tool_response>\nASSISTANT: ") in model.requests[1].prompt


async def test_text_shows_tool_calls_and_results_as_the_model_saw_them():
    model = ScriptedBackend(weather_model)
    state = await weather_agent.run("Weather in Paris?", backend=model)
    # The state's text is the last prompt (without the tool descriptions) and the answer.
    last = model.requests[-1].prompt
    assert state.text().endswith(last[last.index("USER: Weather"):] + "It is 18 degrees in Paris.\n")


async def test_parallel_calls_each_get_their_result():
    state = await weather_agent.run("Weather in Paris and Rome?", backend=ScriptedBackend(weather_model))
    assert [c.arguments["city"] for c in state["calls"]] == ["Paris", "Rome"]
    messages = state.messages()
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "tool", "assistant"]
    assert [m["tool_call_id"] for m in messages[3:5]] == [c.id for c in state["calls"]]
    assert len({c.id for c in state["calls"]}) == 2


async def test_a_text_answer_leaves_the_variable_a_string():
    state = await weather_agent.run("Weather?", backend=ScriptedBackend(weather_model))
    assert state["calls"] == "Which city?"
    assert state.meta("calls").finish_reason == "stop" and state.meta("calls").tool_calls == ()
    assert state.messages()[-1] == {"role": "assistant", "content": "Which city?"}


async def test_a_malformed_call_stays_text():
    @program
    async def one(s):
        s += user("Weather in Paris?")
        s += assistant(gen("calls", tools=[get_weather]))

    broken = "<tool_call>\n{not json}\n</tool_call>"
    state = await one.run(backend=ScriptedBackend(lambda p: broken))
    assert state["calls"] == broken and state.meta("calls").tool_calls == ()


async def test_tool_choice_none_describes_no_calls_and_answers_in_text():
    @program
    async def no_calls(s):
        s += user("Weather in Paris?")
        s += assistant(gen("answer", tools=[get_weather], tool_choice="none"))

    state = await no_calls.run(backend=ScriptedBackend(lambda p: call_text("get_weather", city="X")))
    assert isinstance(state["answer"], str) and state.meta("answer").tool_calls == ()


async def test_a_forced_call_must_parse_as_the_grammar_says():
    @program
    async def forced(s):
        s += user("Weather in Paris?")
        s += assistant(gen("calls", tools=[get_weather], tool_choice="get_weather"))

    ok = await forced.run(backend=ScriptedBackend(lambda p: call_text("get_weather", city="Oslo")))
    assert ok["calls"][0].arguments == {"city": "Oslo"}
    with pytest.raises(aiolm.ConstraintError):
        await forced.run(backend=ScriptedBackend(lambda p: "No call."))


async def test_fork_branches_call_tools_and_join():
    @program
    async def two_cities(s):
        s += system("Weather bot.")
        async with s.fork(2) as forks:
            for f, city in zip(forks, ["Paris", "Rome"], strict=True):
                f += user(f"Weather in {city}?")
                f += assistant(gen("calls", tools=[get_weather]))
                call = (await f.get("calls"))[0]
                f += tool_result(call, get_weather(**call.arguments))
        forks.join(mode="concat")

    state = await two_cities.run(backend=ScriptedBackend(weather_model))
    roles = [m["role"] for m in state.messages()]
    assert roles == ["system", "user", "assistant", "tool", "user", "assistant", "tool"]
    calls = [m["tool_calls"][0]["function"]["arguments"] for m in state.messages() if "tool_calls" in m]
    assert [json.loads(a)["city"] for a in calls] == ["Paris", "Rome"]


# --------------------------------------------------------------------------- scripted: errors

def test_bad_tool_arguments_raise_at_the_gen_call_naming_the_argument():
    with pytest.raises(TypeError, match="^tools: expected a list"):
        gen("x", tools=get_weather)
    with pytest.raises(TypeError, match=r"^tools\[0\]: expected a function"):
        gen("x", tools=[42])
    with pytest.raises(ValueError, match="^tool_choice: no tool named 'nope'"):
        gen("x", tools=[get_weather], tool_choice="nope")
    with pytest.raises(ValueError, match="^tool_choice: 'required' needs tools"):
        gen("x", tool_choice="required")
    with pytest.raises(ValueError, match="^tools: a gen that may call tools cannot also take json_schema"):
        gen("x", tools=[get_weather], json_schema={"type": "object"})
    with pytest.raises(TypeError, match="^parallel_tool_calls: expected a bool"):
        gen("x", tools=[get_weather], parallel_tool_calls="no")
    with pytest.raises(ValueError, match="^max_thinking_tokens: needs reasoning=True"):
        gen("x", max_thinking_tokens=10)
    with pytest.raises(ValueError, match="^max_thinking_tokens: expected an int"):
        gen("x", reasoning=True, max_thinking_tokens=-1)
    with pytest.raises(ValueError, match="^reasoning_effort: expected"):
        gen("x", reasoning=True, reasoning_effort="extreme")
    with pytest.raises(TypeError, match="^reasoning: expected a bool"):
        gen("x", reasoning="yes")
    assert gen("x", tools=[get_weather], tool_choice="none", regex="a+").tool_choice == "none"
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert gen("x", tools=[get_weather], tool_choice=named).tool_choice == "get_weather"


def test_bad_tool_results_raise_naming_the_argument():
    with pytest.raises(TypeError, match="^call_id: expected"):
        tool_result("", "x")
    with pytest.raises(TypeError, match="^content: expected a str or a JSON-able value"):
        tool_result("call_1", object())
    assert tool_result(ToolCall(id="c9", name="f"), [1, "two"]).content == '[1, "two"]'


async def test_a_tool_or_reasoning_gen_outside_an_assistant_turn_is_a_program_error():
    async def body(s):
        with pytest.raises(ProgramError, match="must be inside an assistant turn, not in no turn"):
            s += gen("x", tools=[get_weather])
        with pytest.raises(ProgramError, match="reasoning must be inside an assistant turn, not in the open user turn"):
            s += user(gen("x", reasoning=True))

    await program(body).run(backend=ScriptedBackend())


async def test_text_outside_turns_cannot_go_with_tools():
    @program
    async def mixed(s):
        s += "Plain text before the chat.\n"
        s += user("Weather in Paris?") + assistant(gen("calls", tools=[get_weather]))

    with pytest.raises(ProgramError, match="cannot see text outside a turn"):
        await mixed.run(backend=ScriptedBackend(weather_model))


async def test_a_tool_result_must_answer_a_call_of_the_last_assistant_turn():
    @program
    async def stray(s):
        s += user("Hi") + assistant("Hello")
        s += tool_result("call_x", "42")

    with pytest.raises(ProgramError, match="no call 'call_x' in the last assistant turn"):
        await stray.run(backend=ScriptedBackend())

    @program
    async def inside(s):
        with s.user():
            s += tool_result("call_x", "42")

    with pytest.raises(ProgramError, match="tool_result\\(\\) is a turn of its own"):
        await inside.run(backend=ScriptedBackend())


async def test_a_second_gen_after_calls_in_the_same_turn_is_a_program_error():
    @program
    async def twice(s):
        s += user("Weather in Paris?")
        s += assistant(gen("a", tools=[get_weather]) + gen("b", tools=[get_weather]))

    with pytest.raises(ProgramError, match="already made tool calls"):
        await twice.run(backend=ScriptedBackend(weather_model))


# --------------------------------------------------------------------------- scripted: reasoning

async def test_reasoning_splits_the_thinking_from_the_answer():
    @program
    async def think(s):
        s += user("Capital of France?")
        s += assistant(gen("answer", reasoning=True))

    model = ScriptedBackend(lambda p: "<think>France's capital is Paris.</think>Paris.")
    state = await think.run(backend=model)
    assert state["answer"] == "Paris."
    assert state.meta("answer").reasoning == "France's capital is Paris."
    assert state.messages()[-1] == {"role": "assistant", "content": "Paris."}
    assert "<think>" not in state.text()


async def test_a_reasoning_answer_keeps_its_own_constraint_and_dtype():
    @program
    async def count(s):
        s += user("Legs of a spider?")
        s += assistant(gen("legs", reasoning=True, dtype=int))

    state = await count.run(backend=ScriptedBackend(lambda p: "<think>Eight, surely.</think>8"))
    assert state["legs"] == 8 and state.meta("legs").reasoning == "Eight, surely."
    with pytest.raises(aiolm.ConstraintError):
        await count.run(backend=ScriptedBackend(lambda p: "<think>Hm.</think>eight"))


async def test_a_plain_gen_has_no_reasoning_or_tool_calls_in_its_meta():
    @program
    async def plain(s):
        s += user("Hi") + assistant(gen("a"))

    meta = (await plain.run(backend=ScriptedBackend())).meta("a")
    assert meta.reasoning is None and meta.tool_calls is None


# --------------------------------------------------------------------------- typed streaming

class Person:
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}


async def test_json_schema_events_carry_the_value_parsed_so_far():
    @program
    async def person(s):
        s += "A person as JSON: " + gen("person", json_schema=Person.schema)

    reply = '{"name": "Ada Lovelace", "age": 36}'
    events = []
    async with person.stream(backend=ScriptedBackend(lambda p: reply)) as stream:
        async for ev in stream:
            events.append((ev.text, ev.partial))
    assert [p for _, p in events] == [
        {},                                   # '{"name":'
        {"name": "Ada"},                      # ' "Ada'
        {"name": "Ada Lovelace"},             # ' Lovelace",'
        {"name": "Ada Lovelace"},             # ' "age":'
        {"name": "Ada Lovelace", "age": 36},  # ' 36}'
    ]
    assert "".join(t for t, _ in events) == reply == stream.state["person"]


async def test_events_of_untyped_gens_have_no_partial():
    @program
    async def story(s):
        s += "Once" + gen("story")

    async with story.stream(backend=ScriptedBackend(lambda p: " upon a time")) as events:
        assert [ev.partial async for ev in events] == [None, None, None]


async def test_tool_call_events_carry_the_calls_so_far():
    @program
    async def one(s):
        s += user("Weather in Paris?")
        s += assistant(gen("calls", tools=[get_weather]))

    partials = []
    async with one.stream(backend=ScriptedBackend(weather_model)) as events:
        async for ev in events:
            partials.append(ev.partial)
    assert partials[-1] == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert all(isinstance(p, list) and p[0]["name"] == "get_weather" for p in partials)


async def test_reasoning_events_stream_the_thinking_then_the_typed_answer():
    @program
    async def think(s):
        s += user("Person?")
        s += assistant(gen("person", reasoning=True, json_schema=Person.schema))

    reply = '<think>Ada it is.</think>{"name": "Ada", "age": 36}'
    thinking, partials = [], []
    async with think.stream(backend=ScriptedBackend(lambda p: reply)) as events:
        async for ev in events:
            thinking.append(ev.reasoning)
            partials.append(ev.partial)
    assert "".join(thinking) == "Ada it is."
    assert partials[-1] == {"name": "Ada", "age": 36} == json.loads(events.state["person"])


# --------------------------------------------------------------------------- the engine

CITY_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"enum": ["Paris", "Rome"]}, "days": {"enum": [1, 2, 3]}},
        "required": ["city", "days"]}}}


@contextlib.asynccontextmanager
async def tiny_engine(template: str):
    async with aiolm.Engine(tiny_chat_model(template), max_total_tokens=4096) as engine:
        yield engine


@program
async def forced_call(s, choice: str):
    s += system("You call tools.")
    s += user("Weather in Paris for two days?")
    s += assistant(gen("calls", tools=[CITY_TOOL], tool_choice=choice,
                       parallel_tool_calls=False, max_tokens=64))
    call = (await s.get("calls"))[0]
    s += tool_result(call, {"forecast": "sunny"})
    s += assistant(gen("answer", max_tokens=8))


@pytest.mark.parametrize("choice", ["required", "get_weather"])
async def test_a_forced_call_from_random_weights_is_a_valid_call(choice):
    async with tiny_engine(TOOLS_TEMPLATE) as engine:
        state = await forced_call.run(choice, backend=engine)
    (call,) = state["calls"]
    assert call.name == "get_weather"
    jsonschema.validate(call.arguments, CITY_TOOL["function"]["parameters"])
    assert state.meta("calls").finish_reason == "tool_calls"
    assert [m["role"] for m in state.messages()] == ["system", "user", "assistant", "tool", "assistant"]
    assert state.messages()[2]["tool_calls"] == [call.to_openai()]
    assert isinstance(state["answer"], str)


@program
async def bounded_thinking(s, budget: int):
    s += user("Is the sky blue?")
    s += assistant(gen("answer", reasoning=True, max_thinking_tokens=budget, regex="(yes|no)",
                       max_tokens=64))


async def test_a_thinking_budget_bounds_the_thinking_then_the_answer_follows_its_regex():
    async with tiny_engine(THINKING_TEMPLATE) as engine:
        states = [await bounded_thinking.run(budget, backend=engine) for budget in (2, 12)]
        tokens = [len(engine.tokenizer.encode(s.meta("answer").reasoning)) for s in states]
    for state in states:
        assert state["answer"] in ("yes", "no")
        assert state.messages()[-1] == {"role": "assistant", "content": state["answer"]}
    assert tokens[0] <= 2 and tokens[1] <= 12
    assert states[0].meta("answer").completion_tokens < states[1].meta("answer").completion_tokens


async def test_engine_tool_call_events_carry_partial_calls():
    @program
    async def one(s):
        s += user("Weather?")
        s += assistant(gen("calls", tools=[CITY_TOOL], tool_choice="required",
                           parallel_tool_calls=False, max_tokens=64))

    async with tiny_engine(TOOLS_TEMPLATE) as engine, one.stream(backend=engine) as events:
        partials = [ev.partial async for ev in events if ev.partial]
    final = events.state["calls"][0]
    assert partials[-1] == [{"name": "get_weather", "arguments": dict(final.arguments)}]
    # Arguments grow key by key as they stream.
    sizes = [len(p[0]["arguments"]) for p in partials]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]


# --------------------------------------------------------------------------- messages() → openai

@pytest.fixture(scope="module")
def tools_server():
    engine = aiolm.Engine(tiny_chat_model(TOOLS_TEMPLATE), max_total_tokens=4096)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        async with engine:
            yield

    with running(create_app(engine, model_name="tiny", lifespan=lifespan)) as url:
        yield url


async def test_state_messages_go_to_the_openai_client_as_they_are(tools_server):
    async with tiny_engine(TOOLS_TEMPLATE) as engine:
        state = await forced_call.run("required", backend=engine)
    async with openai.AsyncOpenAI(base_url=tools_server, api_key="none", max_retries=0) as client:
        reply = await client.chat.completions.create(
            model="tiny", messages=state.messages(), tools=[CITY_TOOL], tool_choice="required",
            parallel_tool_calls=False, max_tokens=64, temperature=0)
    (call,) = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), CITY_TOOL["function"]["parameters"])


async def test_a_program_on_aiolm_openai_calls_tools_through_the_server(tools_server):
    api = aiolm.OpenAI("tiny", client=openai.AsyncOpenAI(base_url=tools_server, api_key="none"))
    async with api.client:
        state = await forced_call.run("get_weather", backend=api)
    (call,) = state["calls"]
    jsonschema.validate(call.arguments, CITY_TOOL["function"]["parameters"])
    assert state.meta("calls").finish_reason == "tool_calls"
    assert [m["role"] for m in state.messages()] == ["system", "user", "assistant", "tool", "assistant"]
