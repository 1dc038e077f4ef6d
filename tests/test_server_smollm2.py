"""The server over the Engine with the embedded SmolLM2-135M-Instruct (slow: loads the model
once for the module), and aiolm programs on aiolm.OpenAI pointed at it."""

from __future__ import annotations

import contextlib
import json

import conformance
import jsonschema
import openai
import pytest
import smollm2
from openai_server import CallCounter, running

import aiolm
from aiolm import gen, program, user
from aiolm.backends.engine import Engine, LoadedModel
from aiolm.server import create_app

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

# NOTE: tests that iterate the SDK's own stream run on asyncio only (see test_server.py).
SDK_STREAM = pytest.mark.parametrize("anyio_backend", ["asyncio"])
SYSTEM = "You are a helpful assistant. Answer in one short sentence."


@pytest.fixture(scope="module")
def served():
    loaded = LoadedModel.load(smollm2.gguf_path(), device="cpu")
    engine = Engine(loaded)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        async with engine:
            yield

    counter = CallCounter(create_app(engine, lifespan=lifespan))
    with running(counter, timeout=300) as url:
        yield url, engine.model_name, counter


@pytest.fixture
async def client(served):
    async with openai.AsyncOpenAI(base_url=served[0], api_key="none", max_retries=0) as c:
        yield c


def ask(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


@SDK_STREAM
async def test_streamed_chat_equals_the_whole_answer_under_greedy(client, served):
    kw = dict(model=served[1], messages=ask("What is the capital of France?"), temperature=0,
              max_tokens=24)
    whole = await client.chat.completions.create(**kw)
    assert "Paris" in whole.choices[0].message.content
    pieces = []
    stream = await client.chat.completions.create(**kw, stream=True)
    async with stream:
        async for chunk in stream:
            pieces.extend(c.delta.content or "" for c in chunk.choices)
    assert "".join(pieces) == whole.choices[0].message.content


@SDK_STREAM
async def test_streamed_completion_equals_the_whole_answer_under_greedy(client, served):
    kw = dict(model=served[1], prompt="The three primary colours are", temperature=0, max_tokens=20)
    whole = await client.completions.create(**kw)
    pieces = []
    stream = await client.completions.create(**kw, stream=True)
    async with stream:
        async for chunk in stream:
            pieces.extend(c.text for c in chunk.choices)
    assert "".join(pieces) == whole.choices[0].text


async def test_json_schema_answers_validate(client, served):
    schema = {"type": "object",
              "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
              "required": ["city", "country"], "additionalProperties": False}
    done = await client.chat.completions.create(
        model=served[1], messages=ask("Name the capital of France and its country as JSON."),
        temperature=0, max_tokens=48,
        response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema}})
    jsonschema.validate(json.loads(done.choices[0].message.content), schema)


async def test_a_repeated_prefix_reports_cached_tokens(client, served):
    first = await client.chat.completions.create(
        model=served[1], messages=ask("Name a fruit."), temperature=0, max_tokens=8)
    second = await client.chat.completions.create(
        model=served[1], messages=ask("Name a vegetable."), temperature=0, max_tokens=8)
    assert first.usage.prompt_tokens > 0
    shared = second.usage.prompt_tokens_details.cached_tokens
    assert 0 < shared < second.usage.prompt_tokens


@pytest.mark.parametrize("check", [conformance.check_multi_turn_chat, conformance.check_select],
                         ids=lambda c: c.__name__)
async def test_chat_conformance_programs_through_the_server(check, served):
    async with openai.AsyncOpenAI(base_url=served[0], api_key="none") as c:
        await check(aiolm.OpenAI(served[1], client=c, chat=True))


FIELDS = ("name", "job", "age", "city", "hobby")
EXAMPLE = ("Text: Maria Lopez is a 41-year-old nurse from Madrid who loves painting.\n"
           "name: Maria Lopez\njob: nurse\nage: 41\ncity: Madrid\nhobby: painting\n\n")


@program
async def extract(s, text: str):
    s += "Extract the person's details.\n\n" + EXAMPLE + "Text: " + text + "\n"
    for field in FIELDS:
        s += field + ":" + gen(field, stop="\n", max_tokens=16) + "\n"


@program
async def extract_chat(s, text: str):
    s += user("Extract the person's details as lines 'field: value'.\n\n" + EXAMPLE + "Text: " + text)
    with s.assistant():
        for field in FIELDS:
            s += field + ":" + gen(field, stop="\n", max_tokens=16) + "\n"


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
async def test_speculation_makes_fewer_calls_with_the_same_fields_on_smollm2(served, chat):
    url, model, counter = served
    text = "Aiko Tanaka, 28, works as a software engineer in Tokyo and plays the violin."
    results = {}
    for spec in (None, 64):
        async with openai.AsyncOpenAI(base_url=url, api_key="none") as c:
            api = aiolm.OpenAI(model, client=c, chat=chat, spec_tokens=spec)
            before = counter.generation_calls
            state = await (extract_chat if chat else extract).run(text=text, backend=api, temperature=0)
            results[spec] = ({f: state[f] for f in FIELDS}, counter.generation_calls - before)
    (plain, plain_calls), (fast, fast_calls) = results[None], results[64]
    assert fast == plain
    assert plain["name"].strip() == "Aiko Tanaka" and plain["age"].strip() == "28"
    assert plain_calls == len(FIELDS)
    assert fast_calls < plain_calls
