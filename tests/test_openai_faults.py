"""The OpenAI backend under API faults (httpx.MockTransport): what is retried, what each
failure becomes in aiolm.errors, and that nothing hangs."""

from __future__ import annotations

import anyio
import httpx
import pytest
from fake_openai import FakeAPI, chat_stream, completion_stream, error, sse

import aiolm
from aiolm.backends import GenerateRequest
from aiolm.backends._openai_errors import MalformedResponse, RetryPolicy, parse_retry_after
from aiolm.errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    ConstraintError,
    ContextLengthExceeded,
    RateLimited,
)

pytestmark = pytest.mark.anyio

REQUEST = GenerateRequest(prompt="Hello")


def backend(api: FakeAPI, *, chat: bool = False, **kw) -> aiolm.OpenAI:
    kw.setdefault("max_retries", 3)
    return aiolm.OpenAI("m", client=api.client(), chat=chat, backoff=0.001, max_backoff=0.05,
                        aiolm_server=False, **kw)


async def generate(b: aiolm.OpenAI, request: GenerateRequest = REQUEST):
    with anyio.fail_after(10):
        return await b.generate(request)


async def test_429_with_retry_after_is_retried_then_succeeds():
    api = FakeAPI(error(429, "slow down", headers={"retry-after": "0.01"}),
                  completion_stream(["Hi", " there"]))
    b = backend(api)
    done = await generate(b)
    assert done.text == "Hi there"
    stats = b.statistics()
    assert (stats.calls, stats.retries) == (2, 1)


async def test_429_that_persists_raises_rate_limited_with_retry_after():
    api = FakeAPI(error(429, "slow down", headers={"retry-after": "0.01"}))
    b = backend(api, max_retries=2)
    with pytest.raises(RateLimited) as info:
        await generate(b)
    assert info.value.retry_after == pytest.approx(0.01)
    assert isinstance(info.value.__cause__, Exception)   # raised from the SDK's error
    assert len(api.requests) == 3


async def test_retry_after_longer_than_the_backoff_limit_is_not_waited_for():
    api = FakeAPI(error(429, "come back in an hour", headers={"retry-after": "3600"}))
    with pytest.raises(RateLimited) as info:
        await generate(backend(api))
    assert info.value.retry_after == 3600
    assert len(api.requests) == 1


async def test_server_errors_are_retried_then_raise_backend_unavailable():
    api = FakeAPI(error(500, "boom"), error(503, "busy"), completion_stream(["ok"]))
    assert (await generate(backend(api))).text == "ok"
    api = FakeAPI(error(502, "bad gateway"))
    with pytest.raises(BackendUnavailable, match="502"):
        await generate(backend(api, max_retries=1))
    assert len(api.requests) == 2


async def test_timeouts_are_retried_then_raise_backend_timeout():
    api = FakeAPI(httpx.ReadTimeout("slow"), completion_stream(["late"]))
    assert (await generate(backend(api))).text == "late"
    api = FakeAPI(httpx.ReadTimeout("slow"))
    with pytest.raises(BackendTimeout):
        await generate(backend(api, max_retries=2))
    assert len(api.requests) == 3


async def test_connection_errors_raise_backend_unavailable():
    api = FakeAPI(httpx.ConnectError("refused"))
    with pytest.raises(BackendUnavailable):
        await generate(backend(api, max_retries=1))
    assert len(api.requests) == 2


async def test_malformed_bodies_are_retried_then_raise():
    garbage = httpx.Response(200, content=b"<html>proxy error</html>",
                             headers={"content-type": "application/json"})
    ok = {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": '{"choice": "no"}'},
                       "finish_reason": "stop"}]}
    api = FakeAPI(garbage, httpx.Response(200, json=ok))
    b = backend(api, chat=True)
    result = await b.score(GenerateRequest(messages=(aiolm.Message(role="user"),)), ["yes", "no"])
    assert result.index == 1
    api = FakeAPI(httpx.Response(200, json={"unexpected": True}))
    with pytest.raises(MalformedResponse):
        await backend(api, chat=True, max_retries=1).score(
            GenerateRequest(messages=(aiolm.Message(role="user"),)), ["yes", "no"])


async def test_malformed_stream_events_raise_a_backend_error():
    api = FakeAPI(sse(["{not json"]))
    with pytest.raises(MalformedResponse):
        await generate(backend(api))


async def test_an_error_event_mid_stream_raises_a_backend_error():
    first = {"id": "c", "object": "text_completion", "created": 0, "model": "m",
             "choices": [{"index": 0, "text": "Hel", "finish_reason": None, "logprobs": None}]}
    api = FakeAPI(sse([first, {"error": {"message": "engine fell over", "type": "server_error"}}]))
    with pytest.raises(BackendError, match="engine fell over"):
        await generate(backend(api))


async def test_a_stream_cut_short_raises_a_backend_error():
    first = {"id": "c", "object": "text_completion", "created": 0, "model": "m",
             "choices": [{"index": 0, "text": "Hel", "finish_reason": None, "logprobs": None}]}
    api = FakeAPI(sse([first], done=False))
    with pytest.raises(BackendError, match="without a finish reason"):
        await generate(backend(api))


async def test_context_length_errors_are_not_retried():
    api = FakeAPI(error(400, "This model's maximum context length is 8 tokens",
                        code="context_length_exceeded"))
    with pytest.raises(ContextLengthExceeded):
        await generate(backend(api))
    assert len(api.requests) == 1


async def test_client_errors_are_backend_errors_and_not_retried():
    for status in (401, 403, 404, 422):
        api = FakeAPI(error(status, "refused"))
        with pytest.raises(BackendError, match=str(status)) as info:
            await generate(backend(api, chat=True),
                           GenerateRequest(messages=(aiolm.Message(role="user"),)))
        assert type(info.value) is BackendError
        assert len(api.requests) == 1


async def test_a_rejected_response_format_is_a_constraint_error():
    api = FakeAPI(error(400, "Invalid schema for response_format", param="response_format"))
    request = GenerateRequest(messages=(aiolm.Message(role="user"),),
                              constraint=aiolm.constraints.JSONSchema({"type": "object"}))
    with pytest.raises(ConstraintError):
        await generate(backend(api, chat=True), request)


async def test_cancelling_during_backoff_stops_at_once():
    api = FakeAPI(error(429, "wait", headers={"retry-after": "5"}))
    b = aiolm.OpenAI("m", client=api.client(), chat=True, max_backoff=60, aiolm_server=False)
    with anyio.move_on_after(0.2) as scope:
        await b.generate(GenerateRequest(messages=(aiolm.Message(role="user"),)))
    assert scope.cancelled_caught
    assert len(api.requests) == 1


async def test_leaving_a_stream_early_closes_it():
    api = FakeAPI(chat_stream(["a", "b", "c", "d"]))
    b = backend(api, chat=True)
    async with b.stream(GenerateRequest(messages=(aiolm.Message(role="user"),))) as chunks:
        async for chunk in chunks:
            assert chunk.text == "a"
            break
    assert (await generate(b, GenerateRequest(messages=(aiolm.Message(role="user"),)))).text == "abcd"


def test_retry_policy_backs_off_exponentially_with_jitter_and_honours_retry_after():
    policy = RetryPolicy(max_retries=5, base_delay=1.0, max_delay=10.0)
    unavailable = BackendUnavailable("x")
    for attempt in range(5):
        delay = policy.delay(attempt, unavailable)
        cap = min(10.0, 2.0**attempt)
        assert cap / 2 <= delay <= cap
    assert policy.delay(5, unavailable) is None
    assert policy.delay(0, RateLimited("x", retry_after=7.0)) == 7.0
    assert policy.delay(0, RateLimited("x", retry_after=70.0)) is None
    assert policy.delay(0, BackendError("4xx")) is None


def test_retry_after_headers_parse_seconds_milliseconds_and_dates():
    assert parse_retry_after(httpx.Headers({"retry-after": "2"})) == 2.0
    assert parse_retry_after(httpx.Headers({"retry-after-ms": "250"})) == 0.25
    assert parse_retry_after(httpx.Headers({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0.0
    assert parse_retry_after(httpx.Headers({"retry-after": "soon"})) is None
    assert parse_retry_after(httpx.Headers({})) is None
