"""The OpenAI-compatible server over the ScriptedBackend, driven by the real ``openai`` client
(and raw httpx for malformed input) against a real uvicorn on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json

import anyio
import conformance
import httpx
import jsonschema
import openai
import pytest
from openai_server import API_KEY, running

from aiolm.backends import GenerateRequest, ScriptedBackend
from aiolm.chat import SIMPLE_TEMPLATE, Message, TextPart, render_text
from aiolm.errors import ConstraintError, ContextLengthExceeded
from aiolm.server import create_app

pytestmark = pytest.mark.anyio

MODEL = "scripted"
QA = "Q: What is the capital of France?\nA:"
CITY_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "population": {"type": "integer"}},
    "required": ["name", "population"],
}
MAX_BODY = 4096
CONTEXT_WORDS = 40


class ContextLimited(ScriptedBackend):
    """The conformance model with a context of ``CONTEXT_WORDS`` words."""

    def stream(self, request: GenerateRequest):
        if len(self.prompt_text(request).split()) > CONTEXT_WORDS:
            raise ContextLengthExceeded(f"the prompt is longer than {CONTEXT_WORDS} words")
        return super().stream(request)


@pytest.fixture(scope="module")
def backend():
    return ContextLimited(conformance.scripted_reply)


@pytest.fixture(scope="module")
def base_url(backend):
    with running(create_app(backend, api_key=API_KEY, max_body_bytes=MAX_BODY)) as url:
        yield url


@pytest.fixture
async def client(base_url):
    async with openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0) as c:
        yield c


@pytest.fixture
async def raw(base_url):
    async with httpx.AsyncClient(base_url=base_url.removesuffix("/v1"), timeout=10) as c:
        yield c


AUTH = {"Authorization": f"Bearer {API_KEY}"}


async def test_completion_answers_with_stop_and_usage(client):
    done = await client.completions.create(model=MODEL, prompt=QA, max_tokens=16, stop="\n",
                                           temperature=0)
    choice = done.choices[0]
    assert choice.text == " Paris"
    assert choice.finish_reason == "stop"
    assert choice.model_extra["matched_stop"] == "\n"
    assert done.usage.completion_tokens == 1
    assert done.usage.prompt_tokens == len(QA.split())
    assert done.usage.prompt_tokens_details.cached_tokens == 0


async def test_chat_renders_through_the_backend_chat_template(client, backend):
    done = await client.chat.completions.create(
        model=MODEL, temperature=0,
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "What is the capital of France?"}])
    assert done.choices[0].message.content == "The capital of France is Paris."
    assert done.choices[0].message.role == "assistant"
    turns = [Message(role="system", parts=(TextPart(text="Be brief."),)),
             Message(role="user", parts=(TextPart(text="What is the capital of France?"),))]
    assert backend.requests[-1].prompt == render_text(turns, SIMPLE_TEMPLATE, open_role="assistant")


async def test_chat_continue_final_message_continues_the_assistant_turn(client, backend):
    done = await client.chat.completions.create(
        model=MODEL, temperature=0, extra_body={"continue_final_message": True},
        messages=[{"role": "user", "content": "Answer yes or no."},
                  {"role": "assistant", "content": "My answer:"}])
    assert backend.requests[-1].prompt.endswith("USER: Answer yes or no.\nASSISTANT: My answer:")
    assert done.choices[0].finish_reason == "stop"


# NOTE: the openai SDK's own stream parser leaves an inner async generator unfinished after
# "[DONE]"; trio finalizes it after the test's run and pytest reports that. aiolm.OpenAI
# reads streams itself; tests that iterate an SDK stream run on asyncio only.
SDK_STREAM = pytest.mark.parametrize("anyio_backend", ["asyncio"])


@SDK_STREAM
@pytest.mark.parametrize("kind", ["completion", "chat"])
async def test_streamed_chunks_concatenate_to_the_non_streamed_text(client, kind):
    if kind == "completion":
        kw = dict(model=MODEL, prompt="Write.\nIntro:", max_tokens=20, temperature=0)
        whole = await client.completions.create(**kw)
        stream = await client.completions.create(**kw, stream=True,
                                                 stream_options={"include_usage": True})
    else:
        kw = dict(model=MODEL, temperature=0,
                  messages=[{"role": "user", "content": "What is the capital of France?"}])
        whole = await client.chat.completions.create(**kw)
        stream = await client.chat.completions.create(**kw, stream=True,
                                                      stream_options={"include_usage": True})
    pieces, finishes, usage = [], [], None
    async with stream:
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                pieces.append(c.text if kind == "completion" else (c.delta.content or ""))
                finishes.append(c.finish_reason)
    expected = whole.choices[0].text if kind == "completion" else whole.choices[0].message.content
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces) == expected
    assert finishes[-1] == whole.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


async def test_n_choices_and_several_prompts_are_indexed_in_order(client):
    done = await client.completions.create(model=MODEL, prompt=[QA, "Doc 3: "], n=2,
                                           max_tokens=8, stop="\n", temperature=0)
    assert [c.index for c in done.choices] == [0, 1, 2, 3]
    assert [c.text for c in done.choices] == [" Paris", " Paris",
                                              "summary of document 3", "summary of document 3"]
    assert done.usage.completion_tokens == 2 * (1 + 4)


async def test_completion_logprobs_align_with_the_text(client):
    done = await client.completions.create(model=MODEL, prompt="Write.\nIntro:", max_tokens=5,
                                           logprobs=1, temperature=0)
    lp = done.choices[0].logprobs
    assert "".join(lp.tokens) == done.choices[0].text
    assert len(lp.token_logprobs) == len(lp.tokens) == 5
    assert lp.text_offset[0] == len("Write.\nIntro:")
    assert all(len(top) == 1 for top in lp.top_logprobs)


async def test_chat_logprobs_list_each_token(client):
    done = await client.chat.completions.create(
        model=MODEL, temperature=0, logprobs=True, top_logprobs=2,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    content = done.choices[0].logprobs.content
    assert "".join(t.token for t in content) == done.choices[0].message.content
    assert all(t.top_logprobs for t in content)


async def test_json_schema_response_format_yields_valid_json(client):
    done = await client.completions.create(
        model=MODEL, prompt="Describe Paris as JSON: ", max_tokens=32, temperature=0,
        extra_body={"response_format": {"type": "json_schema",
                                        "json_schema": {"name": "city", "schema": CITY_SCHEMA}}})
    jsonschema.validate(json.loads(done.choices[0].text), CITY_SCHEMA)


async def test_regex_extension_constrains_the_answer(client):
    done = await client.completions.create(
        model=MODEL, prompt="Q: How many legs does a spider have?\nA: ", max_tokens=4,
        temperature=0, extra_body={"regex": "[0-9]+"})
    assert done.choices[0].text == "8"


async def test_models_health_and_metrics(client, raw):
    models = await client.models.list()
    assert [(m.id, m.owned_by) for m in models.data] == [(MODEL, "aiolm")]
    await client.completions.create(model=MODEL, prompt=QA, max_tokens=4, stop="\n")
    health = await raw.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert (await raw.get("/metrics")).status_code == 401
    text = (await raw.get("/metrics", headers=AUTH)).text
    assert 'aiolm_requests_total{route="/v1/completions",status="200"}' in text
    assert "aiolm_completion_tokens_total" in text and "aiolm_cache_hit_rate" in text
    assert "aiolm_backend_calls " in text   # the backend's own statistics()


def _error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


async def test_malformed_json_is_a_400(raw):
    response = await raw.post("/v1/completions", content=b"{not json", headers=AUTH)
    assert response.status_code == 400
    assert _error(response)["code"] == "invalid_json"


async def test_bad_parameters_are_a_400_naming_them(client):
    with pytest.raises(openai.BadRequestError) as info:
        await client.completions.create(model=MODEL, prompt=QA, temperature=-1)
    assert info.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "x"}])
    assert info.value.param == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=MODEL, messages=[{"role": "tool", "content": "x"}])
    assert info.value.param == "messages[0].tool_call_id"


async def test_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        await client.completions.create(model="gpt-nope", prompt=QA)
    assert info.value.code == "model_not_found"


async def test_missing_or_wrong_api_key_is_a_401(base_url, raw):
    response = await raw.post("/v1/completions", json={"model": MODEL, "prompt": QA})
    assert response.status_code == 401 and _error(response)["code"] == "invalid_api_key"
    async with openai.AsyncOpenAI(base_url=base_url, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            await bad.completions.create(model=MODEL, prompt=QA)


async def test_oversized_body_is_a_413(raw):
    big = {"model": MODEL, "prompt": "x" * (2 * MAX_BODY)}
    response = await raw.post("/v1/completions", json=big, headers=AUTH)
    assert response.status_code == 413 and _error(response)["code"] == "request_too_large"


async def test_prompt_over_the_context_is_a_400(client):
    long_prompt = "word " * (CONTEXT_WORDS + 10)
    with pytest.raises(openai.BadRequestError) as info:
        await client.completions.create(model=MODEL, prompt=long_prompt)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(
            model=MODEL, stream=True, messages=[{"role": "user", "content": long_prompt}])
    assert info.value.code == "context_length_exceeded" and info.value.param == "messages"


async def test_invalid_response_format_is_a_400(client):
    for fmt in ({"type": "json_schema", "json_schema": {"name": "x"}},
                {"type": "yaml"},
                {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}):
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(
                model=MODEL, response_format=fmt, messages=[{"role": "user", "content": "Hi"}])
        assert info.value.param == "response_format"


async def test_the_server_keeps_serving_after_errors(client, raw):
    await raw.post("/v1/completions", content=b"\xff\xfe", headers=AUTH)
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="other", prompt=QA)
    with pytest.raises(openai.BadRequestError):
        await client.completions.create(model=MODEL, prompt="word " * 100)
    done = await client.completions.create(model=MODEL, prompt=QA, max_tokens=4, stop="\n")
    assert done.choices[0].text == " Paris"
    response = await raw.get("/v1/nowhere", headers=AUTH)
    assert response.status_code == 404 and _error(response)["code"] == "not_found"


@SDK_STREAM
async def test_client_disconnect_aborts_the_backend_stream():
    slow = ScriptedBackend(lambda prompt: " tick" * 500, delay=0.02)
    with running(create_app(slow)) as url:
        async with openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0) as client:
            stream = await client.completions.create(model=MODEL, prompt="Go:", max_tokens=500,
                                                     stream=True)
            async with stream:
                seen = 0
                async for _chunk in stream:
                    seen += 1
                    if seen == 3:
                        assert slow.statistics().active_streams == 1
                        break
            # The whole reply would take 10 s: only an abort ends the stream this soon.
            with anyio.fail_after(5):
                while slow.statistics().active_streams:
                    await anyio.sleep(0.02)
    assert slow.statistics().calls == 1


def test_aiolm_serve_binds_localhost_and_passes_engine_options():
    import inspect

    from aiolm.backends.engine import Engine
    from aiolm.server.cli import build_parser, engine_options

    args = build_parser().parse_args([])
    assert (args.host, args.port, args.api_key) == ("127.0.0.1", 8000, None)
    args = build_parser().parse_args(["--model", "m.gguf", "--api-key", "k", "--no-radix-cache",
                                      "--schedule-policy", "fcfs", "--max-body-bytes", "1000"])
    options = engine_options(args)
    assert options["enable_radix_cache"] is False and options["schedule_policy"] == "fcfs"
    assert set(options) <= set(inspect.signature(Engine).parameters)
    assert (args.model, args.api_key, args.max_body_bytes) == ("m.gguf", "k", 1000)


# ------------------------------------------------------------------- metrics, one error rule


async def _asgi_post(app, path: str, body: dict) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://127.0.0.1") as http:
        return await http.post(path, json=body)


async def _scrape(app) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://127.0.0.1") as http:
        response = await http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {family.name: family for family in text_string_to_metric_families(response.text)}


def _sample(family, suffix: str, **labels) -> float:
    return sum(s.value for s in family.samples
               if s.name == family.name + suffix and labels.items() <= s.labels.items())


async def test_metrics_have_their_types_and_latency_histograms():
    app = create_app(ScriptedBackend(lambda prompt: "one two three four"))
    body = {"model": MODEL, "max_tokens": 8, "n": 2, "stream": True,
            "messages": [{"role": "user", "content": "Count."}]}
    response = await _asgi_post(app, "/v1/chat/completions", body)
    assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")
    families = await _scrape(app)
    kinds = {name: families[name].type for name in (
        "aiolm_requests", "aiolm_completion_tokens", "aiolm_requests_in_flight",
        "aiolm_pending_generations", "aiolm_engine_up", "aiolm_time_to_first_token_seconds",
        "aiolm_inter_token_latency_seconds", "aiolm_request_latency_seconds")}
    assert kinds == {"aiolm_requests": "counter", "aiolm_completion_tokens": "counter",
                     "aiolm_requests_in_flight": "gauge", "aiolm_pending_generations": "gauge",
                     "aiolm_engine_up": "gauge",
                     "aiolm_time_to_first_token_seconds": "histogram",
                     "aiolm_inter_token_latency_seconds": "histogram",
                     "aiolm_request_latency_seconds": "histogram"}
    route = "/v1/chat/completions"
    assert _sample(families["aiolm_requests"], "_total", route=route, status="200") == 1
    # Two choices of four pieces each: two first tokens, three gaps each.
    assert _sample(families["aiolm_time_to_first_token_seconds"], "_count", route=route) == 2
    assert _sample(families["aiolm_inter_token_latency_seconds"], "_count", route=route) == 6
    latency = families["aiolm_request_latency_seconds"]
    assert _sample(latency, "_count", route=route) == 1 and _sample(latency, "_sum", route=route) > 0
    assert _sample(families["aiolm_completion_tokens"], "_total") == 8


class FailingChoices(ScriptedBackend):
    """Every choice of a request fails at once, with a constraint error of its own."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self._width = width
        self._open = 0
        self._all_open = anyio.Event()

    def stream(self, request: GenerateRequest):
        @contextlib.asynccontextmanager
        async def failing():
            self._open += 1
            index = self._open
            if self._open == self._width:
                self._all_open.set()   # and fail at once, before the others are cancelled
            else:
                await self._all_open.wait()
            raise ConstraintError(f"choice {index} broke the constraint")
            yield

        return failing()


async def test_choices_that_fail_at_once_get_one_error_answer():
    response = await _asgi_post(create_app(FailingChoices(3)), "/v1/completions",
                                {"model": MODEL, "prompt": "x", "n": 3, "regex": "[0-9]+"})
    assert response.status_code == 400
    error = _error(response)
    assert error["code"] == "invalid_constraint" and error["param"] == "regex"
    assert "broke the constraint" in error["message"]


@pytest.mark.parametrize(("path", "extra", "param", "message"), [
    ("/v1/completions", {"prompt": "x", "best_of": "2"},
     "best_of", "best_of: Input should be a valid integer (got a string)"),
    ("/v1/completions", {"prompt": [1, "a"]},
     "prompt", "prompt[1]: Input should be a valid integer (got a string)"),
    ("/v1/completions", {"prompt": "x", "stop": {"a": 1}},
     "stop", "stop: expected a string or a list of strings (got an object)"),
    ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": {"include_usage": 1}},
     "stream_options", "stream_options.include_usage: Input should be a valid boolean"),
    ("/v1/completions", {"prompt": "x", "response_format": {"type": "json_schema",
                                                            "json_schema": {"name": "x"}}},
     "response_format", "response_format.json_schema.schema: Field required"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "messages[0].content[0].text", "messages[0].content[0].text: Field required"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "retrieval"}]},
     "tools", "tools[0].type: Input should be 'function' (got 'retrieval')"),
    ("/v1/aiolm/score", {"prompt": "x", "continuations": ["a"], "method": "GREEDY"},
     "method", "method: Input should be 'token_length_normalized'"),
])
async def test_a_body_that_does_not_validate_is_a_400_naming_the_place(path, extra, param, message):
    response = await _asgi_post(create_app(ScriptedBackend()), path, {"model": MODEL, **extra})
    assert response.status_code == 400
    error = _error(response)
    assert error["param"] == param and error["code"] == "invalid_value"
    assert error["message"].startswith(message)
