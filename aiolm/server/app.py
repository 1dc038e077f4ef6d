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

Here: :func:`create_app`, its middleware and error pages. The server's options, checks and
GET routes are in :mod:`._server`, the POST routes in :mod:`._answer`, the raw ASGI
helpers they use in :mod:`._asgi`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..backends.base import Backend
from ._answer import _Answer, _Parse
from ._server import _Server
from .errors import ApiError
from .guard import RequestGuard
from .images import ImageFetch
from .protocol import Limits, Parsed, parse_chat, parse_completion

__all__ = ["DEFAULT_BODY_TIMEOUT", "DEFAULT_MAX_BODY_BYTES", "DEFAULT_MAX_PENDING", "create_app"]

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_BODY_TIMEOUT = 30.0
DEFAULT_MAX_PENDING = 1024
_DEFAULT_LIMITS = Limits()


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
    image_fetch: ImageFetch | None = None,
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

    Chat ``image_url`` parts: data URLs always; http(s) URLs only with ``image_fetch`` (an
    :class:`~aiolm.server.images.ImageFetch`: its size and time limits), which the server
    then fetches before the backend sees the request; without it they are a 400.
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
                     reasoning_parser=reasoning_parser, image_fetch=image_fetch)

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
