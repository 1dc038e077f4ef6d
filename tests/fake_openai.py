"""A scripted OpenAI API behind ``httpx.MockTransport``, for the OpenAI backend's tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import openai

Reply = httpx.Response | Callable[[httpx.Request], httpx.Response] | BaseException


def completion(text: str, *, finish: str = "stop", tokens: list[str] | None = None,
               prompt_tokens: int = 3, matched_stop: str | None = None) -> dict[str, Any]:
    """A /v1/completions body (``tokens`` become logprobs)."""
    logprobs = None
    if tokens is not None:
        logprobs = {"tokens": tokens, "token_logprobs": [-0.5] * len(tokens),
                    "top_logprobs": None, "text_offset": [0] * len(tokens)}
    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}
    if matched_stop is not None:
        choice["matched_stop"] = matched_stop
    return {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m",
            "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens or [text]),
                      "total_tokens": 0, "prompt_tokens_details": {"cached_tokens": 1}}}


def chat(text: str, *, finish: str = "stop", tokens: list[str] | None = None) -> dict[str, Any]:
    """A /v1/chat/completions body (``tokens`` become logprobs)."""
    logprobs = None
    if tokens is not None:
        logprobs = {"content": [{"token": t, "logprob": -0.5, "bytes": None, "top_logprobs": []}
                                for t in tokens]}
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish, "logprobs": logprobs}],
            "usage": {"prompt_tokens": 5, "completion_tokens": len(tokens or [text]),
                      "total_tokens": 0}}


def sse(events: list[dict[str, Any] | str], *, done: bool = True) -> httpx.Response:
    """A streamed (server-sent events) response."""
    lines = [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events]
    if done:
        lines.append("data: [DONE]\n\n")
    return httpx.Response(200, content="".join(lines).encode(),
                          headers={"content-type": "text/event-stream"})


def completion_stream(pieces: list[str], *, finish: str = "stop") -> httpx.Response:
    events: list[dict[str, Any] | str] = [
        {"id": "c", "object": "text_completion", "created": 0, "model": "m",
         "choices": [{"index": 0, "text": p, "finish_reason": None, "logprobs": None}]}
        for p in pieces
    ]
    events.append({"id": "c", "object": "text_completion", "created": 0, "model": "m",
                   "choices": [{"index": 0, "text": "", "finish_reason": finish, "logprobs": None}]})
    events.append({"id": "c", "object": "text_completion", "created": 0, "model": "m",
                   "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": len(pieces),
                                            "total_tokens": 0}})
    return sse(events)


def chat_stream(pieces: list[str], *, finish: str = "stop") -> httpx.Response:
    def event(delta: dict[str, Any], fin: str | None) -> dict[str, Any]:
        return {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                "choices": [{"index": 0, "delta": delta, "finish_reason": fin, "logprobs": None}]}

    events: list[dict[str, Any] | str] = [event({"role": "assistant", "content": ""}, None)]
    events += [event({"content": p}, None) for p in pieces]
    events.append(event({}, finish))
    return sse(events)


def error(status: int, message: str = "nope", *, code: str | None = None, param: str | None = None,
          headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}
    return httpx.Response(status, json=body, headers=headers)


class FakeAPI:
    """Answers each request with the next scripted reply (the last one repeats).

    A reply is an ``httpx.Response``, a function of the request, or an exception to raise
    (``httpx.ReadTimeout``, ``httpx.ConnectError``). ``requests`` records (path, JSON body).
    ``owned_by`` is what ``GET /v1/models`` reports (``"aiolm"`` makes it aiolm's server).
    """

    def __init__(self, *replies: Reply, owned_by: str = "openai") -> None:
        self.replies = list(replies)
        self.requests: list[tuple[str, Any]] = []
        self.owned_by = owned_by

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "GET" and path.endswith("/models"):
            return httpx.Response(200, json={"object": "list", "data": [
                {"id": "m", "object": "model", "created": 0, "owned_by": self.owned_by}]})
        self.requests.append((path, json.loads(request.content) if request.content else None))
        reply = self.replies[0] if len(self.replies) == 1 else self.replies.pop(0)
        if isinstance(reply, BaseException):
            raise reply
        if isinstance(reply, httpx.Response):  # a fresh copy: a response body is read once
            return httpx.Response(reply.status_code, headers=reply.headers, content=reply.content)
        return reply(request)

    @property
    def bodies(self) -> list[Any]:
        return [body for _, body in self.requests]

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(api_key="test", base_url="http://fake.test/v1", max_retries=0,
                                  http_client=httpx.AsyncClient(transport=httpx.MockTransport(self.handler)))
