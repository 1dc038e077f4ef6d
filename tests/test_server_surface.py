"""The OpenAI request fields of /v1/completions and /v1/chat/completions over the Engine with a
tiny random-weight model (SmolLM2's real tokenizer): logit_bias, echo with logprobs, best_of,
max_completion_tokens, stream_options, response_format, seed, stop, the fields accepted and
ignored, unknown fields, and wrong types (400 naming the field). Driven by the real ``openai``
client (and raw httpx for bodies the SDK would not send) against uvicorn on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import math

import httpx
import openai
import pytest
from openai_server import running
from tiny_chat import tiny_chat_model

from aiolm import Engine
from aiolm.backends.base import GenerateRequest
from aiolm.sampling import SamplingParams
from aiolm.server import create_app

pytestmark = pytest.mark.anyio

# NOTE: tests that iterate the SDK's own stream run on asyncio only (see test_server.py).
SDK_STREAM = pytest.mark.parametrize("anyio_backend", ["asyncio"])
PROMPT = "The weather in Paris today is"
MAX_N = 8


@pytest.fixture(scope="module")
def served():
    engine = Engine(tiny_chat_model(), max_total_tokens=4096)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        async with engine:
            yield

    with running(create_app(engine, lifespan=lifespan, max_n=MAX_N)) as url:
        yield url, engine


@pytest.fixture
async def client(served):
    async with openai.AsyncOpenAI(base_url=served[0], api_key="none", max_retries=0) as c:
        yield c


@pytest.fixture
async def raw(served):
    async with httpx.AsyncClient(base_url=served[0], timeout=30) as c:
        yield c


@pytest.fixture
def model(served):
    return served[1].model_name


def ids_of(choice) -> list[int]:
    return choice.model_extra["token_ids"]


GREEDY = dict(temperature=0, max_tokens=6, extra_body={"ignore_eos": True, "return_token_ids": True})
CHAT = [{"role": "user", "content": "Say something."}]


# ------------------------------------------------------------------------- logit_bias

async def test_logit_bias_changes_the_greedy_token(client, model):
    plain = await client.completions.create(model=model, prompt=PROMPT, **GREEDY)
    first = ids_of(plain.choices[0])[0]
    wanted = first + 1
    biased = await client.completions.create(model=model, prompt=PROMPT,
                                             logit_bias={str(wanted): 100}, **GREEDY)
    assert ids_of(biased.choices[0]) == [wanted] * 6
    banned = await client.completions.create(model=model, prompt=PROMPT,
                                             logit_bias={str(first): -100}, **GREEDY)
    assert ids_of(banned.choices[0])[0] != first


async def test_logit_bias_works_on_chat_too(client, model):
    tok = (await client.completions.create(model=model, prompt="x", **GREEDY)).choices[0]
    wanted = ids_of(tok)[0] + 7
    done = await client.chat.completions.create(model=model, messages=CHAT,
                                                logit_bias={str(wanted): 100}, **GREEDY)
    assert ids_of(done.choices[0]) == [wanted] * 6


@pytest.mark.parametrize("bias", [{"x": 1}, {"-3": 1}, {"5": "a"}, {"5": True}, {"5": 101},
                                  {"5": -1000}, {"99999999": 1}, [5], "5"])
async def test_a_bad_logit_bias_is_a_400_naming_it(raw, model, bias):
    for path, body in (("/completions", {"prompt": "x"}), ("/chat/completions", {"messages": CHAT})):
        answer = await raw.post(path, json={"model": model, "max_tokens": 1, "logit_bias": bias, **body})
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["param"] == "logit_bias"


# ------------------------------------------------------------------------------- echo

async def test_echo_with_logprobs_gives_the_engine_prompt_logprobs(client, model):
    # The served engine runs on the server thread's event loop: a second engine over the
    # same weights answers this test's own loop.
    async with Engine(tiny_chat_model(), max_total_tokens=1024) as engine:
        own = await engine.generate(GenerateRequest(
            prompt=PROMPT, prompt_logprobs=True,
            sampling=SamplingParams(max_tokens=0, logprobs=True, top_logprobs=2)))
    done = await client.completions.create(model=model, prompt=PROMPT, max_tokens=0, echo=True,
                                           logprobs=2)
    choice = done.choices[0]
    assert choice.text == PROMPT
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = own.prompt_logprobs
    assert expected[0] is None and len(lp.tokens) == len(expected) == done.usage.prompt_tokens
    assert lp.tokens[1:] == [e.token for e in expected[1:]]
    assert lp.token_logprobs[1:] == pytest.approx([e.logprob for e in expected[1:]])
    assert [list(t) for t in lp.top_logprobs[1:]] == [[t for _, t, _ in e.top] for e in expected[1:]]
    assert "".join(lp.tokens) == PROMPT
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert done.usage.completion_tokens == 0


async def test_echo_puts_the_prompt_before_the_answer_and_its_tokens_first(client, model):
    plain = await client.completions.create(model=model, prompt=PROMPT, logprobs=1, **GREEDY)
    echoed = await client.completions.create(model=model, prompt=PROMPT, logprobs=1, echo=True,
                                             **GREEDY)
    answer = plain.choices[0]
    choice = echoed.choices[0]
    assert choice.text == PROMPT + answer.text
    prompt_tokens = echoed.usage.prompt_tokens
    assert choice.logprobs.tokens[prompt_tokens:] == answer.logprobs.tokens
    assert choice.logprobs.token_logprobs[prompt_tokens:] == pytest.approx(answer.logprobs.token_logprobs)
    assert choice.logprobs.text_offset[prompt_tokens] == len(PROMPT)
    assert choice.logprobs.text_offset[prompt_tokens:] == answer.logprobs.text_offset


async def test_echo_without_logprobs_and_of_a_token_id_prompt(client, served, model):
    tokenizer = served[1].tokenizer
    ids = tokenizer.encode(PROMPT)
    done = await client.completions.create(model=model, prompt=ids, echo=True, **GREEDY)
    assert done.choices[0].text.startswith(PROMPT)
    assert done.choices[0].logprobs is None


@SDK_STREAM
@pytest.mark.parametrize("max_tokens", [0, 6])
async def test_a_streamed_echo_comes_in_the_first_chunk(client, model, max_tokens):
    kw = dict(model=model, prompt=PROMPT, echo=True, logprobs=1, **{**GREEDY, "max_tokens": max_tokens})
    whole = await client.completions.create(**kw)
    text = whole.choices[0].text
    assert text == PROMPT if max_tokens == 0 else (text.startswith(PROMPT) and text != PROMPT)
    stream = await client.completions.create(stream=True, **kw)
    texts, tokens = [], []
    async with stream:
        async for chunk in stream:
            for c in chunk.choices:
                texts.append(c.text)
                if c.logprobs is not None:
                    tokens.extend(c.logprobs.tokens)
    assert texts[0].startswith(PROMPT)
    assert "".join(texts) == whole.choices[0].text
    assert tokens == whole.choices[0].logprobs.tokens


# ---------------------------------------------------------------------------- best_of

async def test_best_of_returns_the_candidates_with_the_highest_mean_logprob(client, model):
    kw = dict(model=model, prompt=PROMPT, max_tokens=5, temperature=1, seed=11,
              extra_body={"ignore_eos": True})
    every = await client.completions.create(n=4, logprobs=0, **kw)

    def mean(choice) -> float:
        return sum(choice.logprobs.token_logprobs) / len(choice.logprobs.token_logprobs)

    ranked = sorted(every.choices, key=mean, reverse=True)
    assert len({c.text for c in every.choices}) > 1   # seeded choices still differ
    best = await client.completions.create(n=2, best_of=4, **kw)
    assert [c.text for c in best.choices] == [c.text for c in ranked[:2]]
    assert [c.index for c in best.choices] == [0, 1]
    assert all(c.logprobs is None for c in best.choices)   # not asked for
    assert best.usage.completion_tokens == 4 * 5            # every candidate counts


@pytest.mark.parametrize(("extra", "message"), [
    ({"n": 3, "best_of": 2}, "at least n"),
    ({"best_of": 2, "stream": True}, "streamed"),
    ({"best_of": MAX_N + 1}, "between"),
    ({"best_of": 0}, "between"),
    ({"best_of": "2"}, "integer"),
])
async def test_a_bad_best_of_is_a_400(raw, model, extra, message):
    answer = await raw.post("/completions", json={"model": model, "prompt": "x", **extra})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["param"] == "best_of" and message in error["message"]


# ------------------------------------------------------- max_completion_tokens, stream_options

async def test_max_completion_tokens_bounds_both_routes(client, model):
    done = await client.completions.create(model=model, prompt=PROMPT, temperature=0,
                                           extra_body={"max_completion_tokens": 3, "ignore_eos": True})
    assert done.usage.completion_tokens == 3 and done.choices[0].finish_reason == "length"
    chat = await client.chat.completions.create(model=model, messages=CHAT, temperature=0,
                                                max_completion_tokens=2,
                                                extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == 2
    for path, body in (("/completions", {"prompt": "x"}), ("/chat/completions", {"messages": CHAT})):
        with pytest.raises(openai.BadRequestError) as info:
            await client.post(path, cast_to=httpx.Response,
                              body={"model": model, "max_completion_tokens": -1, **body})
        assert info.value.param == "max_completion_tokens"


@SDK_STREAM
@pytest.mark.parametrize("route", ["completions", "chat"])
async def test_include_usage_adds_a_last_chunk_with_the_usage(client, model, route):
    async def chunks(**options):
        if route == "chat":
            stream = await client.chat.completions.create(model=model, messages=CHAT, stream=True,
                                                          **options, **GREEDY)
        else:
            stream = await client.completions.create(model=model, prompt=PROMPT, stream=True,
                                                     **options, **GREEDY)
        async with stream:
            return [chunk async for chunk in stream]

    with_usage = await chunks(stream_options={"include_usage": True})
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in with_usage[:-1])
    without = await chunks()
    assert all(c.usage is None for c in without) and without[-1].choices


async def test_stream_options_without_stream_is_a_400(raw, model):
    answer = await raw.post("/completions", json={"model": model, "prompt": "x",
                                                  "stream_options": {"include_usage": True}})
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "stream_options"


# ------------------------------------------------------- response_format, seed, stop, n

async def test_json_object_response_format_gives_a_json_object(client, model):
    # Random weights would write a key forever: a bias towards '}' (token 109) closes the
    # object soon, and the grammar still has it open with '{' first.
    done = await client.chat.completions.create(
        model=model, messages=CHAT, temperature=0, max_tokens=60,
        response_format={"type": "json_object"}, logit_bias={"109": 5})
    assert done.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(done.choices[0].message.content), dict)


async def test_a_seed_repeats_a_sampled_answer(client, model):
    kw = dict(model=model, prompt=PROMPT, max_tokens=8, temperature=1,
              extra_body={"ignore_eos": True, "return_token_ids": True})
    a = await client.completions.create(seed=1234, **kw)
    b = await client.completions.create(seed=1234, **kw)
    c = await client.completions.create(seed=4321, **kw)
    assert ids_of(a.choices[0]) == ids_of(b.choices[0]) != ids_of(c.choices[0])


async def test_a_stop_list_ends_at_the_first_stop_met(client, model):
    plain = await client.completions.create(model=model, prompt=PROMPT, **GREEDY)
    text = plain.choices[0].text
    stop = text[len(text) // 2:][:3]
    done = await client.completions.create(model=model, prompt=PROMPT, stop=["@@never@@", stop],
                                           **GREEDY)
    assert done.choices[0].finish_reason == "stop"
    assert done.choices[0].model_extra["matched_stop"] == stop
    assert done.choices[0].text == text[: text.index(stop)]


# --------------------------------------------------- accepted, ignored, unknown, wrong types

async def test_fields_openai_defines_are_accepted_and_unknown_ones_ignored(client, model):
    plain = await client.chat.completions.create(model=model, messages=CHAT, **GREEDY)
    extra = {"user": "u-1", "service_tier": "auto", "store": False,
             "metadata": {"project": "x"}, "parallel_tool_calls": True,
             "reasoning_effort": "low", "prediction": {"type": "content", "content": "x"},
             "frobnicate": [1, 2], "web_search_options": {}}
    done = await client.chat.completions.create(
        model=model, messages=CHAT, temperature=0, max_tokens=6,
        extra_body={"ignore_eos": True, "return_token_ids": True, **extra})
    assert ids_of(done.choices[0]) == ids_of(plain.choices[0])
    completion = await client.completions.create(
        model=model, prompt=PROMPT, temperature=0, max_tokens=2,
        extra_body={"user": "u-1", "frobnicate": {"a": 1}, "store": True})
    assert completion.choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize(("route", "field", "value"), [
    ("completions", "n", "2"), ("chat", "n", "2"),
    ("completions", "logprobs", "yes"), ("chat", "logprobs", "yes"),
    ("completions", "stop", 5), ("chat", "stop", {"a": 1}),
    ("chat", "tools", {}), ("chat", "tools", [{"type": "function"}]),
    ("completions", "echo", "yes"), ("completions", "max_completion_tokens", "3"),
    ("chat", "max_completion_tokens", 2.5), ("completions", "seed", "1"),
    ("chat", "user", 5), ("completions", "metadata", "x"), ("chat", "store", "yes"),
    ("chat", "service_tier", 1), ("chat", "parallel_tool_calls", "no"),
    ("chat", "reasoning_effort", "extreme"), ("chat", "reasoning_effort", 3),
    ("chat", "chat_template_kwargs", ["enable_thinking"]),
    ("chat", "chat_template_kwargs", {"messages": []}),
    ("chat", "chat_template_kwargs", {"enable_thinking": "no"}),
    ("chat", "tool_choice", "required"), ("chat", "tool_choice", 5),
    ("chat", "max_thinking_tokens", 5), ("chat", "functions", [{"name": "f"}]),
    ("completions", "suffix", "x"),
])
async def test_wrong_types_and_values_are_a_400_naming_the_field(raw, model, route, field, value):
    path, body = (("/chat/completions", {"messages": CHAT}) if route == "chat"
                  else ("/completions", {"prompt": "x"}))
    answer = await raw.post(path, json={"model": model, "max_tokens": 1, **body, field: value})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == field


async def test_stream_options_include_usage_must_be_a_boolean(raw, model):
    answer = await raw.post("/completions", json={"model": model, "prompt": "x", "stream": True,
                                                  "stream_options": {"include_usage": "yes"}})
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "stream_options"


async def test_logprobs_of_every_choice_are_finite_json(raw, model):
    # Logit-biased tokens far below the rest still serialize (never -inf, never NaN).
    answer = await raw.post("/completions", json={
        "model": model, "prompt": PROMPT, "max_tokens": 2, "logprobs": 5, "echo": True,
        "logit_bias": {"16": -100}, "temperature": 0})
    assert answer.status_code == 200
    values = answer.json()["choices"][0]["logprobs"]["token_logprobs"]
    assert values[0] is None and all(math.isfinite(v) for v in values[1:])
