"""``create_app(backend)``: an OpenAI-compatible ASGI app (Starlette) over any aiolm backend.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (SSE streaming with
``"stream": true``), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text),
and aiolm's ``POST /v1/aiolm/score`` (``select`` scoring for remote programs).

Every generation runs while a watcher reads the client's ``receive`` channel: when the
client disconnects, the work is cancelled, which leaves the backend's stream context and so
aborts the backend request.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import attrs
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..backends.base import Backend, Chunk, new_request_id
from ..errors import BackendError
from .errors import ApiError, api_error_for
from .metrics import Metrics
from .protocol import Parsed, parse_chat, parse_completion, parse_json, parse_score
from .responses import Choice, Reply

__all__ = ["DEFAULT_MAX_BODY_BYTES", "create_app"]

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
_log = logging.getLogger("aiolm.server")
_CLIENT_CLOSED = 499   # nginx's status for "the client went away" (metrics only)

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


def create_app(
    backend: Backend,
    *,
    model_name: str | None = None,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    lifespan: Callable[[Any], Any] | None = None,
) -> Starlette:
    """An ASGI app serving ``backend`` under the OpenAI API.

    ``model_name`` is the id clients must send (default ``backend.model_name``); with
    ``api_key`` every ``/v1`` route and ``/metrics`` need ``Authorization: Bearer <key>``;
    bodies over ``max_body_bytes`` get 413. ``lifespan`` is Starlette's (e.g. to open an
    engine when the server starts). The backend is not opened or closed by the app.
    """
    if not isinstance(backend, Backend):
        raise TypeError(f"backend: expected an aiolm Backend, got {type(backend).__name__}")
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes: expected a positive int, got {max_body_bytes!r}")
    server = _Server(backend=backend, model=model_name or backend.model_name, api_key=api_key,
                     max_body_bytes=max_body_bytes)

    def post(route: str, parse: Callable[[dict[str, Any], Backend], Any] | None) -> Route:
        async def endpoint(request: Request) -> _Answer:
            return _Answer(server, route, parse)
        return Route(route, endpoint, methods=["POST"])

    routes = [
        post("/v1/completions", parse_completion),
        post("/v1/chat/completions", parse_chat),
        post("/v1/aiolm/score", None),
        Route("/v1/models", server.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", server.get_model, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.metrics_text, methods=["GET"]),
    ]
    handlers = {404: _not_found, 405: _not_allowed}
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)


async def _not_found(request: Request, exc: Exception) -> Response:
    err = ApiError(404, f"no route {request.method} {request.url.path}", code="not_found")
    return JSONResponse(err.body(), status_code=404)


async def _not_allowed(request: Request, exc: Exception) -> Response:
    err = ApiError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")
    return JSONResponse(err.body(), status_code=405)


@attrs.define(eq=False)
class _Server:
    backend: Backend
    model: str
    api_key: str | None
    max_body_bytes: int
    metrics: Metrics = attrs.field(factory=Metrics)
    created: int = attrs.field(factory=lambda: int(time.time()))

    def check_key(self, headers: dict[str, str]) -> None:
        """Raise 401 unless the request carries the API key (when one is set)."""
        if self.api_key is None:
            return
        given = headers.get("authorization", "")
        if not given.lower().startswith("bearer "):
            raise ApiError(401, "Missing API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")
        if not hmac.compare_digest(given[7:].strip().encode(), self.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    def check_model(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "model: required (a string)", param="model", code="invalid_value")
        if model != self.model:
            raise ApiError(404, f"The model {model!r} does not exist; this server serves {self.model!r}.",
                           param="model", code="model_not_found")

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model, "object": "model", "created": self.created, "owned_by": "aiolm"}

    def _guarded(self, request: Request, route: str) -> ApiError | None:
        try:
            self.check_key({k.lower(): v for k, v in request.headers.items()})
        except ApiError as err:
            self.metrics.count(route, err.status)
            return err
        self.metrics.count(route, 200)
        return None

    async def list_models(self, request: Request) -> Response:
        if (err := self._guarded(request, "/v1/models")) is not None:
            return JSONResponse(err.body(), status_code=err.status)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def get_model(self, request: Request) -> Response:
        if (err := self._guarded(request, "/v1/models/{model}")) is not None:
            return JSONResponse(err.body(), status_code=err.status)
        if request.path_params["model"] != self.model:
            err = ApiError(404, f"The model {request.path_params['model']!r} does not exist.",
                           param="model", code="model_not_found")
            return JSONResponse(err.body(), status_code=404)
        return JSONResponse(self._model_card())

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.model})

    async def metrics_text(self, request: Request) -> Response:
        if (err := self._guarded(request, "/metrics")) is not None:
            return JSONResponse(err.body(), status_code=err.status)
        return PlainTextResponse(self.metrics.render(self.backend),
                                 media_type="text/plain; version=0.0.4")


class _Answer:
    """The ASGI response of one POST: reads the body, runs the work, answers (or streams)."""

    def __init__(self, server: _Server, route: str,
                 parse: Callable[[dict[str, Any], Backend], Parsed] | None) -> None:
        self._server = server
        self._route = route
        self._parse = parse

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        server = self._server
        status = 500
        server.metrics.in_flight += 1
        try:
            status = await self._answer(scope, receive, send)
        finally:
            server.metrics.in_flight -= 1
            server.metrics.count(self._route, status)

    async def _answer(self, scope: dict[str, Any], receive: Receive, send: Send) -> int:
        server = self._server
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            server.check_key(headers)
            body = parse_json(await _read_body(receive, headers, server.max_body_bytes))
            server.check_model(body)
            if self._parse is None:
                return await self._score(body, receive, send)
            parsed = self._parse(body, server.backend)
        except ApiError as err:
            await _send_error(send, err)
            return err.status
        param = "messages" if parsed.kind == "chat" else "prompt"
        if parsed.stream:
            return await self._stream(parsed, param, receive, send)
        reply = Reply(kind=parsed.kind, model=server.model, logprobs=parsed.logprobs,
                      token_ids=parsed.token_ids)
        try:
            choices, gone = await _until_disconnect(receive, lambda: self._generate(parsed, None))
        except Exception as exc:
            err = _log_error(api_error_for(exc, prompt_param=param), exc)
            await _send_error(send, err)
            return err.status
        if gone:
            return _CLIENT_CLOSED
        await _send_json(send, 200, reply.body(choices))
        return 200

    async def _generate(self, parsed: Parsed,
                        on_piece: Callable[[Choice, Chunk], Awaitable[None]] | None) -> list[Choice]:
        """Run every choice (``n`` per prompt) concurrently; return them in order."""
        jobs = []
        for pi, req in enumerate(parsed.requests):
            offset = parsed.prompt_offsets[pi] if parsed.prompt_offsets else 0
            for _ in range(parsed.n):
                choice = Choice(index=len(jobs), prompt_index=pi, offset=offset)
                jobs.append((choice, attrs.evolve(req, request_id=new_request_id())))

        async def run(choice: Choice, request: Any) -> None:
            async with self._server.backend.stream(request) as chunks:
                async for chunk in chunks:
                    choice.add(chunk)
                    if on_piece is not None:
                        await on_piece(choice, chunk)
            if choice.finish_reason is None:
                raise BackendError(f"{self._server.backend.model_name}: stream ended without a finish reason")
            self._server.metrics.add_usage(choice.usage)

        if len(jobs) == 1:
            await run(*jobs[0])
        else:
            try:
                async with anyio.create_task_group() as tg:
                    for job in jobs:
                        tg.start_soon(run, *job)
            except BaseExceptionGroup as group:
                _raise_first(group)
        return [choice for choice, _ in jobs]

    async def _stream(self, parsed: Parsed, param: str, receive: Receive, send: Send) -> int:
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
            if chunk.text or chunk.token_ids or chunk.logprobs or chunk.finish_reason is not None:
                await event(sse(reply.chunk(choice, chunk)))

        try:
            choices, gone = await _until_disconnect(receive, lambda: self._generate(parsed, on_piece))
        except Exception as exc:
            err = _log_error(api_error_for(exc, prompt_param=param), exc)
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

    async def _score(self, body: dict[str, Any], receive: Receive, send: Send) -> int:
        backend = self._server.backend
        prefix, continuations, method = parse_score(body, backend)
        try:
            result, gone = await _until_disconnect(
                receive, lambda: backend.score(prefix, continuations, method))
        except Exception as exc:
            err = _log_error(api_error_for(exc), exc)
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


async def _read_body(receive: Receive, headers: dict[str, str], limit: int) -> bytes:
    """The whole request body; 413 as soon as it passes ``limit`` bytes."""
    too_big = ApiError(413, f"Request body too large: the limit is {limit} bytes.",
                       code="request_too_large")
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ApiError(400, "the client disconnected while sending the body", code="disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_big
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


async def _until_disconnect(receive: Receive, work: Callable[[], Awaitable[Any]]) -> tuple[Any, bool]:
    """Run ``work()`` unless the client disconnects first: (its result, whether it left).

    Cancelling ``work`` leaves the backend's stream context, which aborts its request.
    """
    result: Any = None
    gone = False
    try:
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                nonlocal gone
                while (await receive())["type"] != "http.disconnect":
                    pass
                gone = True
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            try:
                result = await work()
            finally:
                tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        _raise_first(group)
    return result, gone


def _raise_first(group: BaseExceptionGroup) -> None:
    """Re-raise the first real error of a task group (cancellations re-raise the group)."""
    errors, _ = group.split(Exception)
    if errors is None:
        raise group
    first: BaseException = errors
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    raise first


def _log_error(err: ApiError, exc: BaseException) -> ApiError:
    if err.status >= 500:
        _log.error("request failed: %s", err.message, exc_info=exc)
    return err


async def _send_json(send: Send, status: int, payload: dict[str, Any],
                     headers: dict[str, str] | None = None) -> None:
    body = json.dumps(payload, allow_nan=False).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_error(send: Send, err: ApiError) -> None:
    await _send_json(send, err.status, err.body(), err.headers)
