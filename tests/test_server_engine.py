"""The OpenAI-compatible server over the in-process Engine with a tiny dummy model (random
weights, token-id prompts), opened in the app's lifespan, driven by the real ``openai``
client against uvicorn on 127.0.0.1."""

from __future__ import annotations

import contextlib

import anyio
import httpx
import openai
import pytest
from openai_server import running

from aiolm.backends.engine import Engine, LoadedModel
from aiolm.server import create_app

pytestmark = pytest.mark.anyio

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
# NOTE: tests that iterate the SDK's own stream run on asyncio only (see test_server.py).
SDK_STREAM = pytest.mark.parametrize("anyio_backend", ["asyncio"])


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return LoadedModel.load("tiny-llama", load_format="dummy", device="cpu", seed=0)


@pytest.fixture(scope="module")
def served(tiny):
    engine = Engine(tiny, max_total_tokens=4096)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        async with engine:
            yield

    with running(create_app(engine, lifespan=lifespan)) as url:
        yield url, engine


@pytest.fixture
async def client(served):
    async with openai.AsyncOpenAI(base_url=served[0], api_key="none", max_retries=0) as c:
        yield c


GREEDY = dict(model="tiny-llama", temperature=0, max_tokens=12,
              extra_body={"ignore_eos": True, "return_token_ids": True})


@SDK_STREAM
async def test_streamed_tokens_match_the_whole_answer_under_greedy(client):
    whole = await client.completions.create(prompt=PROMPT, **GREEDY)
    assert len(whole.choices[0].model_extra["token_ids"]) == 12
    assert whole.choices[0].finish_reason == "length"
    ids: list[int] = []
    stream = await client.completions.create(prompt=PROMPT, stream=True, **GREEDY)
    async with stream:
        async for chunk in stream:
            for c in chunk.choices:
                ids.extend(c.model_extra["token_ids"])
    assert ids == whole.choices[0].model_extra["token_ids"]


async def test_a_repeated_prefix_is_served_from_the_cache(client):
    prompt = [*PROMPT, 77, 78, 79]
    first = await client.completions.create(prompt=prompt, **GREEDY)
    again = await client.completions.create(prompt=prompt, **GREEDY)
    assert first.usage.prompt_tokens == again.usage.prompt_tokens == len(prompt)
    assert again.usage.prompt_tokens_details.cached_tokens == len(prompt) - 1
    assert again.choices[0].model_extra["token_ids"] == first.choices[0].model_extra["token_ids"]


async def test_greedy_choices_agree_and_are_counted(client):
    done = await client.completions.create(prompt=PROMPT, n=3, **GREEDY)
    ids = [c.model_extra["token_ids"] for c in done.choices]
    assert ids[0] == ids[1] == ids[2]
    assert done.usage.completion_tokens == 3 * 12


async def test_a_prompt_over_the_context_is_a_400_and_the_server_goes_on(client, tiny):
    too_long = [5] * (tiny.model_config.context_len + 1)
    with pytest.raises(openai.BadRequestError) as info:
        await client.completions.create(prompt=too_long, **GREEDY)
    assert info.value.code == "context_length_exceeded"
    done = await client.completions.create(prompt=PROMPT, **GREEDY)
    assert len(done.choices[0].model_extra["token_ids"]) == 12


async def test_metrics_export_the_engine_statistics(client, served):
    await client.completions.create(prompt=PROMPT, **GREEDY)
    async with httpx.AsyncClient() as raw:
        text = (await raw.get(served[0].removesuffix("/v1") + "/metrics")).text
    for name in ("aiolm_queue_depth", "aiolm_cache_hit_rate", "aiolm_backend_finished_requests",
                 "aiolm_backend_free_kv_slots", 'aiolm_requests_total{route="/v1/completions",status="200"}'):
        assert name in text


@SDK_STREAM
async def test_a_client_disconnect_aborts_the_engine_request(client, served, tiny):
    engine = served[1]
    most = tiny.model_config.context_len - len(PROMPT)
    before = engine.statistics().completion_tokens
    stream = await client.completions.create(
        model="tiny-llama", prompt=PROMPT, max_tokens=most, temperature=0, stream=True,
        extra_body={"ignore_eos": True})
    async with stream:
        async for _ in stream:
            break
    with anyio.fail_after(30):
        while engine.statistics().running_requests:
            await anyio.sleep(0.01)
    assert engine.statistics().completion_tokens - before < most


async def test_a_request_the_engine_refuses_is_a_400(client):
    # Dummy weights have no tokenizer: a text prompt cannot be encoded.
    with pytest.raises(openai.BadRequestError, match="tokenizer"):
        await client.completions.create(model="tiny-llama", prompt="Hello", max_tokens=4)
