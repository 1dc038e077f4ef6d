"""The OpenAI backend under API faults (httpx.MockTransport): what is retried, what each
failure becomes in aiolm.errors, and that nothing hangs."""

from __future__ import annotations

import json

import anyio
import httpx
import pytest
import tenacity
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


def multi_line_event(event: dict, *, newline: str = "\n") -> str:
    """``event`` as one server-sent event whose JSON spans several ``data:`` lines."""
    lines = json.dumps(event, indent=1).splitlines()
    return newline.join(f"data: {line}" for line in lines) + newline * 2


async def test_events_spanning_several_data_lines_are_read_whole():
    def piece(text: str, finish: str | None = None) -> dict:
        return {"id": "c", "object": "text_completion", "created": 0, "model": "m",
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}

    body = (": a comment, then a keep-alive event without data\n\nevent: ping\n\n"
            + multi_line_event(piece("Hel")) + multi_line_event(piece("lo"), newline="\r\n")
            + multi_line_event(piece("", "stop")) + "data: [DONE]\n\n")
    api = FakeAPI(httpx.Response(200, content=body.encode(),
                                 headers={"content-type": "text/event-stream"}))
    done = await generate(backend(api))
    assert (done.text, done.finish_reason) == ("Hello", "stop")


async def test_a_stream_answered_without_server_sent_events_is_malformed():
    api = FakeAPI(httpx.Response(200, json={"choices": []}))
    with pytest.raises(MalformedResponse, match="server-sent events"):
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


def failed_attempt(policy: RetryPolicy, number: int, error: BaseException) -> tenacity.RetryCallState:
    """tenacity's record of attempt ``number`` (1-based) of a call, failed with ``error``."""
    state = tenacity.RetryCallState(policy.retrying(), fn=None, args=(), kwargs={})
    state.attempt_number = number
    state.set_exception((type(error), error, None))
    return state


def test_retry_policy_backs_off_exponentially_with_jitter_and_honours_retry_after():
    policy = RetryPolicy(max_retries=5, base_delay=1.0, max_delay=10.0)
    unavailable = BackendUnavailable("x")
    for attempt in range(1, 6):
        cap = min(10.0, 2.0 ** (attempt - 1))
        delays = {policy.wait(failed_attempt(policy, attempt, unavailable)) for _ in range(20)}
        assert all(cap / 2 <= d <= cap for d in delays) and len(delays) > 1
    controller = policy.retrying()
    assert not controller.stop(failed_attempt(policy, 5, unavailable))
    assert controller.stop(failed_attempt(policy, 6, unavailable))   # 5 retries, then give up
    assert policy.wait(failed_attempt(policy, 1, RateLimited("x", retry_after=7.0))) == 7.0
    assert policy.should_retry(RateLimited("x", retry_after=7.0))
    assert not policy.should_retry(RateLimited("x", retry_after=70.0))
    assert not policy.should_retry(BackendError("4xx"))
    assert not policy.should_retry(ContextLengthExceeded("long"))


def test_retry_after_headers_parse_seconds_milliseconds_and_dates():
    assert parse_retry_after(httpx.Headers({"retry-after": "2"})) == 2.0
    assert parse_retry_after(httpx.Headers({"retry-after-ms": "250"})) == 0.25
    assert parse_retry_after(httpx.Headers({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0.0
    assert parse_retry_after(httpx.Headers({"retry-after": "soon"})) is None
    assert parse_retry_after(httpx.Headers({})) is None
