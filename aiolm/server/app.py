"""``create_app(backend)``: an OpenAI-compatible ASGI app (Starlette) over any aiolm backend.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (SSE streaming with
``"stream": true``), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text),
and aiolm's ``POST /v1/aiolm/score`` (``select`` scoring for remote programs).

A chat request with tools, tool turns or reasoning runs through
:func:`aiolm.tools.stream_chat`, which renders it with the model's own chat template, forces
calls with a grammar where asked, and parses calls and thinking out of the answer in the
server's tool-call and reasoning formats (configured, or detected from the template).

Every generation runs while a watcher reads the client's ``receive`` channel: when the
client disconnects, the work is cancelled, which leaves the backend's stream context and so
aborts the backend request.

Hostile input is bounded before it costs anything: the body's size and read time, its JSON
nesting and what one request may ask for (:class:`~aiolm.server.protocol.Limits`, 400), the
work admitted at once (429), and, on a key-less server, who may call (:mod:`.guard`). The
body is parsed on a worker thread, so a large one never stalls the event loop.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import attrs
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .._program.groups import program_error
from ..backends.base import Backend, Chunk, GenerateRequest, new_request_id
from ..errors import BackendError
from ..sampling import SamplingParams
from ..tools.chat_stream import stream_plan
from .errors import ApiError, api_error_for
from .guard import RequestGuard
from .metrics import Metrics
from .protocol import (
    ChatParsers,
    Limits,
    Parsed,
    parse_chat,
    parse_completion,
    parse_json,
    parse_score,
)
from .responses import Choice, Reply, best_of

__all__ = ["DEFAULT_BODY_TIMEOUT", "DEFAULT_MAX_BODY_BYTES", "DEFAULT_MAX_PENDING", "create_app"]

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_BODY_TIMEOUT = 30.0
DEFAULT_MAX_PENDING = 1024
_DEFAULT_LIMITS = Limits()
_log = logging.getLogger("aiolm.server")
_CLIENT_CLOSED = 499   # nginx's status for "the client went away" (metrics only)

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]
_Parse = Callable[[dict[str, Any], Backend, Limits], Parsed]


def create_app(
    backend: Backend,
    *,
    model_name: str | None = None,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    lifespan: Callable[[Any], Any] | None = None,
    allowed_hosts: Sequence[str] = (),
    allowed_origins: Sequence[str] = (),
    body_timeout: float | None = DEFAULT_BODY_TIMEOUT,
    max_pending: int = DEFAULT_MAX_PENDING,
    max_json_depth: int = _DEFAULT_LIMITS.max_json_depth,
    max_prompts: int = _DEFAULT_LIMITS.max_prompts,
    max_n: int = _DEFAULT_LIMITS.max_n,
    max_choices: int = _DEFAULT_LIMITS.max_choices,
    max_score_continuations: int = _DEFAULT_LIMITS.max_score_continuations,
    tool_parser: str | None = None,
    reasoning_parser: str | None = None,
) -> Starlette:
    """An ASGI app serving ``backend`` under the OpenAI API.

    ``model_name`` is the id clients must send (default ``backend.model_name``); with
    ``api_key`` every ``/v1`` route and ``/metrics`` need ``Authorization: Bearer <key>``.
    ``lifespan`` is Starlette's (e.g. to open an engine when the server starts). The backend
    is not opened or closed by the app.

    Limits (each answered with an OpenAI-style error naming the field): bodies over
    ``max_body_bytes`` get 413, bodies not received within ``body_timeout`` seconds 408,
    JSON nested over ``max_json_depth`` levels 400; over ``max_prompts`` prompts, ``n`` over
    ``max_n``, prompts x ``n`` over ``max_choices``, over ``max_score_continuations``
    continuations: 400; a request that would take the backend requests admitted and not yet
    done (one per choice or scored continuation) past ``max_pending``: 429 with
    ``Retry-After``. POST bodies must be ``Content-Type: application/json`` (415).

    Without ``api_key``, requests must come from this machine's names, an IP address or
    ``allowed_hosts``, and carry no ``Origin`` outside ``allowed_origins`` (403; see
    :mod:`aiolm.server.guard`). ``allowed_origins`` also get CORS headers, so a web UI on
    one of them can call the server.

    ``tool_parser`` / ``reasoning_parser`` name the formats the model writes tool calls and
    thinking in (``aiolm.tools.parsers.TOOL_PARSERS``, ``aiolm.tools.reasoning.REASONING_PARSERS``);
    None: detected from ``backend.chat_template_source`` at the first chat request. With a
    reasoning parser, chat answers think (``reasoning_content``) unless a request sends
    ``chat_template_kwargs: {"enable_thinking": false}``. Raises ``ValueError`` naming a bad
    option.
    """
    if not isinstance(backend, Backend):
        raise TypeError(f"backend: expected an aiolm Backend, got {type(backend).__name__}")
    for name, value in (("max_body_bytes", max_body_bytes), ("max_pending", max_pending)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if body_timeout is not None and not (isinstance(body_timeout, int | float) and body_timeout > 0):
        raise ValueError(f"body_timeout: expected a positive number of seconds or None, got {body_timeout!r}")
    for name, value in (("allowed_hosts", allowed_hosts), ("allowed_origins", allowed_origins)):
        if isinstance(value, str) or not all(isinstance(v, str) for v in value):
            raise TypeError(f"{name}: expected a list of strings, got {value!r}")
    limits = Limits(max_json_depth=max_json_depth, max_prompts=max_prompts, max_n=max_n,
                    max_choices=max_choices, max_score_continuations=max_score_continuations)
    for name in ("max_choices", "max_score_continuations"):
        if getattr(limits, name) > max_pending:
            raise ValueError(f"{name}: {getattr(limits, name)} is over max_pending ({max_pending}): "
                             "such a request could never be admitted")
    _check_parsers(tool_parser, reasoning_parser)
    server = _Server(backend=backend, model=model_name or backend.model_name, api_key=api_key,
                     max_body_bytes=max_body_bytes, body_timeout=body_timeout,
                     max_pending=max_pending, limits=limits, tool_parser=tool_parser,
                     reasoning_parser=reasoning_parser)

    def post(route: str, parse: _Parse | None) -> Route:
        async def endpoint(request: Request) -> _Answer:
            return _Answer(server, route, parse)
        return Route(route, endpoint, methods=["POST"])

    def chat(body: dict[str, Any], backend: Backend, limits: Limits) -> Parsed:
        return parse_chat(body, backend, limits, parsers=server.chat_parsers())

    routes = [
        post("/v1/completions", parse_completion),
        post("/v1/chat/completions", chat),
        post("/v1/aiolm/score", None),
        Route("/v1/models", server.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", server.get_model, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.metrics_text, methods=["GET"]),
    ]
    middleware = []
    if allowed_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(allowed_origins),
                                     allow_methods=["GET", "POST"],
                                     allow_headers=["authorization", "content-type"]))
    if api_key is None:
        middleware.append(Middleware(RequestGuard, allowed_hosts=allowed_hosts,
                                     allowed_origins=allowed_origins))
    handlers = {404: _not_found, 405: _not_allowed, Exception: _internal_error}
    return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers,
                     lifespan=lifespan)


def _check_parsers(tool_parser: str | None, reasoning_parser: str | None) -> None:
    """Raise ``ValueError`` naming an unknown tool-call or reasoning format."""
    if tool_parser is not None:
        from ..tools.parsers import get_tool_parser

        get_tool_parser(tool_parser)
    if reasoning_parser is not None:
        from ..tools.reasoning import get_reasoning_parser

        get_reasoning_parser(reasoning_parser)


async def _not_found(request: Request, exc: Exception) -> Response:
    err = ApiError(404, f"no route {request.method} {request.url.path}", code="not_found")
    return JSONResponse(err.body(), status_code=404)


async def _not_allowed(request: Request, exc: Exception) -> Response:
    err = ApiError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")
    return JSONResponse(err.body(), status_code=405)


async def _internal_error(request: Request, exc: Exception) -> Response:
    # Starlette logs the traceback (it re-raises to the server); the client learns nothing more.
    err = ApiError(500, "internal server error", type="server_error", code="internal_error")
    return JSONResponse(err.body(), status_code=500)


@attrs.define(eq=False)
class _Server:
    backend: Backend
    model: str
    api_key: str | None
    max_body_bytes: int
    body_timeout: float | None
    max_pending: int
    limits: Limits
    tool_parser: str | None = None
    reasoning_parser: str | None = None
    created: int = attrs.field(factory=lambda: int(time.time()))
    metrics: Metrics = attrs.field(init=False)
    _parsers: ChatParsers | None = attrs.field(default=None, init=False)

    @metrics.default
    def _metrics(self) -> Metrics:
        return Metrics(self.backend, self.failure)

    def chat_parsers(self) -> ChatParsers:
        """The tool-call and thinking formats: those configured, the rest detected from the
        backend's chat template (known once the backend has loaded its model)."""
        if self._parsers is not None:
            return self._parsers
        source = self.backend.chat_template_source
        if source is None:   # no template (yet: the engine loads its model when it starts)
            return ChatParsers(tool=self.tool_parser, reasoning=self.reasoning_parser)
        from ..tools.parsers import detect_tool_parser
        from ..tools.reasoning import detect_reasoning_parser

        self._parsers = ChatParsers(tool=self.tool_parser or detect_tool_parser(source),
                                    reasoning=self.reasoning_parser or detect_reasoning_parser(source))
        return self._parsers

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

    def check_content_type(self, headers: dict[str, str]) -> None:
        """Raise 415 unless the body is declared JSON.

        A web page can send ``text/plain`` (or, through a ``Blob``, no type at all) to any
        server without a CORS preflight; requiring JSON stops such requests. A missing type
        is accepted when a key is set: the page cannot send the key without a preflight.
        """
        declared = headers.get("content-type")
        if declared is None and self.api_key is not None:
            return
        media = (declared or "").partition(";")[0].strip().lower()
        if media != "application/json":
            shown = "none" if declared is None else repr(declared)
            raise ApiError(415, f"Content-Type must be application/json (got {shown}).",
                           code="unsupported_media_type")

    def admit(self, size: int) -> None:
        """Count ``size`` more pending backend requests, or raise 429 when that passes the limit."""
        if self.metrics.pending + size > self.max_pending:
            raise ApiError(429, f"The server is busy ({self.metrics.pending} generations pending, "
                                f"limit {self.max_pending}): retry shortly.",
                           type="rate_limit_error", code="server_busy", headers={"Retry-After": "1"})
        self.metrics.pending += size

    def failure(self) -> BaseException | None:
        """The error that stopped the backend's engine loop (None while it serves)."""
        return getattr(self.backend, "failure", None)

    def check_model(self, body: dict[str, Any]) -> None:
        """Raise 404 for a request naming another model (a missing or mistyped ``model`` is
        the body model's 400)."""
        model = body.get("model")
        if isinstance(model, str) and model and model != self.model:
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
        failure = self.failure()
        if failure is None:
            return JSONResponse({"status": "ok", "model": self.model})
        return JSONResponse({"status": "failed", "model": self.model,
                             "failure": type(failure).__name__,
                             "message": "The engine stopped on an error; restart the server."},
                            status_code=503)

    async def metrics_text(self, request: Request) -> Response:
        if (err := self._guarded(request, "/metrics")) is not None:
            return JSONResponse(err.body(), status_code=err.status)
        body, media_type = self.metrics.exposition()
        return Response(body, media_type=media_type)


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


async def _read_body(receive: Receive, headers: dict[str, str], limit: int,
                     timeout: float | None) -> bytes:
    """The whole request body: 413 as soon as it passes ``limit`` bytes, 408 when it takes
    longer than ``timeout`` seconds (a slow client must not hold a connection forever)."""
    too_big = ApiError(413, f"Request body too large: the limit is {limit} bytes.",
                       code="request_too_large")
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    parts, size = [], 0
    with anyio.move_on_after(timeout):
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
    raise ApiError(408, f"The request body took over {timeout:g} s to arrive.", code="request_timeout",
                   headers={"Connection": "close"})


async def _until_disconnect(receive: Receive, work: Callable[[], Awaitable[Any]]) -> tuple[Any, bool]:
    """Run ``work()`` unless the client disconnects first: (its result, whether it left).

    Cancelling ``work`` leaves the backend's stream context, which aborts its request.
    """
    result: Any = None
    gone = False
    error: BaseException | None = None
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
        error = program_error(group)
    if error is not None:
        raise error
    return result, gone


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


async def _send_json(send: Send, status: int, payload: dict[str, Any],
                     headers: dict[str, str] | None = None) -> None:
    body = json.dumps(payload, allow_nan=False).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_error(send: Send, err: ApiError) -> None:
    await _send_json(send, err.status, err.body(), err.headers)
