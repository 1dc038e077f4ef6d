"""The POST routes (``/v1/completions``, ``/v1/chat/completions``, ``/v1/aiolm/score``):
one request's body read, parsed on a worker thread, admitted, run on the backend while the
client stays, and answered as JSON or as an SSE stream."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import attrs

from .._program.groups import program_error
from ..backends.base import Backend, Chunk, GenerateRequest, new_request_id
from ..errors import BackendError
from ..sampling import SamplingParams
from ..tools.chat_stream import stream_plan
from ._asgi import Receive, Send, _read_body, _send_error, _send_json, _until_disconnect
from ._server import _Server
from .errors import ApiError, api_error_for
from .images import resolve_image_urls
from .protocol import Limits, Parsed, parse_json, parse_score
from .responses import Choice, Reply, best_of

_log = logging.getLogger("aiolm.server")
_CLIENT_CLOSED = 499   # nginx's status for "the client went away" (metrics only)

_Parse = Callable[[dict[str, Any], Backend, Limits], Parsed]


@attrs.frozen(kw_only=True)
class _ScoreJob:
    """A validated ``/v1/aiolm/score`` request."""

    prefix: GenerateRequest
    continuations: tuple[str, ...]
    method: str
    prompt_param: str

    @property
    def size(self) -> int:
        return len(self.continuations)


class _Answer:
    """The ASGI response of one POST: reads the body, runs the work, answers (or streams)."""

    def __init__(self, server: _Server, route: str, parse: _Parse | None) -> None:
        self._server = server
        self._route = route
        self._parse = parse
        self._started = 0.0   # time.perf_counter() when the request came

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        server = self._server
        status = 500
        self._started = time.perf_counter()
        server.metrics.in_flight += 1
        try:
            status = await self._answer(scope, receive, send)
        finally:
            server.metrics.in_flight -= 1
            server.metrics.count(self._route, status)
        if status == 200:
            server.metrics.answered(self._route, self._started)

    async def _answer(self, scope: dict[str, Any], receive: Receive, send: Send) -> int:
        server = self._server
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            server.check_key(headers)
            server.check_content_type(headers)
            raw = await _read_body(receive, headers, server.max_body_bytes, server.body_timeout)
            # Parsing takes time in proportion to the body (JSON, chat rendering, schema
            # checks): a worker thread keeps the event loop serving everyone else meanwhile.
            job = await anyio.to_thread.run_sync(self._parse_body, raw)
            job = await resolve_image_urls(job, server.image_fetch, job.prompt_param)
            server.admit(job.size)
        except ApiError as err:
            await _send_error(send, err)
            return err.status
        try:
            if isinstance(job, _ScoreJob):
                return await self._score(job, receive, send)
            if job.stream:
                return await self._stream(job, receive, send)
            return await self._complete(job, receive, send)
        finally:
            server.metrics.pending -= job.size

    def _parse_body(self, raw: bytes) -> Parsed | _ScoreJob:
        """The validated request (on a worker thread; raises ``ApiError``)."""
        server = self._server
        body = parse_json(raw, max_depth=server.limits.max_json_depth)
        server.check_model(body)
        if self._parse is not None:
            return self._parse(body, server.backend, server.limits)
        prefix, continuations, method = parse_score(body, server.backend, server.limits)
        return _ScoreJob(prefix=prefix, continuations=continuations, method=method,
                         prompt_param="messages" if body.get("messages") is not None else "prompt")

    async def _complete(self, parsed: Parsed, receive: Receive, send: Send) -> int:
        reply = Reply(kind=parsed.kind, model=self._server.model, logprobs=parsed.logprobs,
                      token_ids=parsed.token_ids)
        try:
            choices, gone = await _until_disconnect(receive, lambda: self._generate(parsed, None))
        except Exception as exc:
            err = _failed(exc, parsed.prompt_param, parsed.constraint_param)
            await _send_error(send, err)
            return err.status
        if gone:
            return _CLIENT_CLOSED
        shown = best_of(choices, parsed.n) if parsed.candidates > parsed.n else choices
        await _send_json(send, 200, reply.body(shown, counted=choices))
        return 200

    async def _generate(self, parsed: Parsed,
                        on_piece: Callable[[Choice, Chunk], Awaitable[None]] | None) -> list[Choice]:
        """Run every choice (``n`` per prompt) concurrently; return them in order."""
        plan = parsed.plan   # a chat planned while parsing: its rendered request is the base
        jobs = []
        for pi, req in enumerate(parsed.requests):
            base = plan.request if plan is not None else req
            offset = parsed.prompt_offsets[pi] if parsed.prompt_offsets else 0
            echo = parsed.echo[pi] if parsed.echo else ""
            for k in range(parsed.candidates):
                choice = Choice(index=len(jobs), prompt_index=pi, offset=offset, echo=echo)
                jobs.append((choice, attrs.evolve(base, request_id=new_request_id(),
                                                  sampling=_choice_sampling(base.sampling, k))))
        backend = self._server.backend
        metrics = self._server.metrics

        async def run(choice: Choice, request: GenerateRequest) -> None:
            # A chat API backend takes tools and reasoning natively: its request goes as it is.
            opened = (stream_plan(backend, attrs.evolve(plan, request=request))
                      if plan is not None else backend.stream(request))
            timer = metrics.timer(self._route, self._started)
            async with opened as chunks:
                async for chunk in chunks:
                    timer.chunk(chunk)
                    chunk = choice.add(chunk)
                    if on_piece is not None:
                        await on_piece(choice, chunk)
            if choice.finish_reason is None:
                raise BackendError(f"{backend.model_name}: stream ended without a finish reason")
            self._server.metrics.add_usage(choice.usage)

        if len(jobs) == 1:
            await run(*jobs[0])
            return [jobs[0][0]]
        error: BaseException | None = None
        try:
            async with anyio.create_task_group() as tg:
                for job in jobs:
                    tg.start_soon(run, *job)
        except BaseExceptionGroup as group:
            error = program_error(group)
        if error is not None:
            raise error
        return [choice for choice, _ in jobs]

    async def _stream(self, parsed: Parsed, receive: Receive, send: Send) -> int:
        """SSE: headers go out with the first event, so an error before it is a normal 4xx/5xx."""
        reply = Reply(kind=parsed.kind, model=self._server.model, logprobs=parsed.logprobs,
                      token_ids=parsed.token_ids)
        started = False
        opened: set[int] = set()
        lock = anyio.Lock()

        async def event(data: bytes, *, more: bool = True) -> None:
            nonlocal started
            async with lock:
                if not started:
                    await send({"type": "http.response.start", "status": 200, "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-cache")]})
                    started = True
                await send({"type": "http.response.body", "body": data, "more_body": more})

        def sse(payload: dict[str, Any]) -> bytes:
            return b"data: " + json.dumps(payload, allow_nan=False).encode() + b"\n\n"

        async def on_piece(choice: Choice, chunk: Chunk) -> None:
            if choice.index not in opened:
                opened.add(choice.index)
                first = reply.first_chunk(choice.index)
                if first is not None:
                    await event(sse(first))
            if (payload := reply.chunk(choice, chunk)) is not None:
                await event(sse(payload))

        try:
            choices, gone = await _until_disconnect(receive, lambda: self._generate(parsed, on_piece))
        except Exception as exc:
            err = _failed(exc, parsed.prompt_param, parsed.constraint_param)
            if not started:
                await _send_error(send, err)
                return err.status
            await event(sse(err.body()))
            await event(b"data: [DONE]\n\n", more=False)
            return err.status
        if gone:
            return _CLIENT_CLOSED
        if parsed.include_usage:
            await event(sse(reply.usage_chunk(choices)))
        await event(b"data: [DONE]\n\n", more=False)
        return 200

    async def _score(self, job: _ScoreJob, receive: Receive, send: Send) -> int:
        backend = self._server.backend
        continuations = job.continuations
        try:
            result, gone = await _until_disconnect(
                receive, lambda: backend.score(job.prefix, continuations, job.method))
        except Exception as exc:
            err = _failed(exc, job.prompt_param)
            await _send_error(send, err)
            return err.status
        if gone:
            return _CLIENT_CLOSED
        self._server.metrics.add_usage(result.usage)

        def finite(values: Any) -> list[float | None]:
            return [v if math.isfinite(v) else None for v in values]

        u = result.usage
        await _send_json(send, 200, {
            "object": "aiolm.score", "model": self._server.model, "index": result.index,
            "choice": continuations[result.index],
            "normalized_logprobs": finite(result.normalized_logprobs),
            "token_logprobs": [finite(row) for row in result.token_logprobs],
            "unconditional_logprobs": (None if result.unconditional_logprobs is None
                                       else [finite(r) for r in result.unconditional_logprobs]),
            "usage": {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                      "total_tokens": u.prompt_tokens + u.completion_tokens,
                      "prompt_tokens_details": {"cached_tokens": u.cached_tokens}},
        })
        return 200


def _choice_sampling(sampling: SamplingParams, k: int) -> SamplingParams:
    """The sampling of choice ``k`` of a prompt: with a ``seed``, each choice draws from its
    own (``seed + k``), so ``n`` seeded choices differ and the first equals ``n=1``'s."""
    if sampling.seed is None or k == 0:
        return sampling
    return attrs.evolve(sampling, seed=(sampling.seed + k) % 2**64)


def _failed(exc: Exception, prompt_param: str, constraint_param: str | None = None) -> ApiError:
    """The error answer for ``exc``; the server's own failures are logged with their details.

    ``exc`` is what :func:`~aiolm._program.groups.program_error` raised: for several choices
    that failed at once (a flat group), the answer is the first one's (an HTTP error
    carries one); the log has them all.
    """
    shown = exc.exceptions[0] if isinstance(exc, ExceptionGroup) else exc
    err = api_error_for(shown, prompt_param=prompt_param, constraint_param=constraint_param)
    if err.status >= 500:
        _log.error("request failed (%s): %r", err.code, exc, exc_info=exc)
    return err
