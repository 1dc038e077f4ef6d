"""``aiolm serve``: the OpenAI-compatible server over an in-process :class:`aiolm.Engine`.

Exit status: 0 after a normal shutdown (Ctrl-C; on SIGTERM the process ends by that signal,
as under uvicorn),
:data:`EXIT_STARTUP_FAILED` when the server did not start (the model failed to load, the port
was taken), :data:`EXIT_ENGINE_FAILED` when the engine loop died while serving: the server
then stops by itself, so a supervisor (systemd ``Restart=on-failure``, Kubernetes) restarts it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import errno
import logging
import socket
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import attrs

from ..cli import add_engine_arguments, engine_options
from .app import DEFAULT_BODY_TIMEOUT, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_PENDING
from .connections import DEFAULT_HEAD_TIMEOUT, default_connection_limit, http_protocol
from .guard import is_loopback_host
from .images import ImageFetch
from .protocol import Limits

if TYPE_CHECKING:
    import uvicorn

    from ..backends.base import Backend

__all__ = ["EXIT_ENGINE_FAILED", "EXIT_STARTUP_FAILED", "bind_socket", "build_parser",
           "engine_options", "run_server", "serve_main"]

#: ``aiolm serve`` exits with this when the server could not start (uvicorn's own code).
EXIT_STARTUP_FAILED = 3
#: ``aiolm serve`` exits with this when the engine loop died while serving.
EXIT_ENGINE_FAILED = 4

_DEFAULT_KEEP_ALIVE = 5.0
_DEFAULT_MAX_HEAD_BYTES = 16 * 1024   # uvicorn's h11 default
_POLL_S = 0.5
_log = logging.getLogger("aiolm.server")
_LIMITS = Limits()


def build_parser() -> argparse.ArgumentParser:
    """The ``aiolm serve`` options (server options, tool calls and reasoning, limits,
    connections, then the engine's)."""
    p = argparse.ArgumentParser(
        prog="aiolm serve",
        description="Serve a model under the OpenAI API (/v1/completions, /v1/chat/completions, "
                    "/v1/models, /health, /metrics).",
        epilog=f"Exit status: 0 after a normal shutdown, {EXIT_STARTUP_FAILED} if the server did not "
               f"start, {EXIT_ENGINE_FAILED} if the engine died while serving (restart it).",
    )
    add_engine_arguments(p, ["model"])
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every /v1 route")
    p.add_argument("--served-model-name", default=None, help="the id clients send as model (default: the model's name)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    from ..tools.parsers import TOOL_PARSERS
    from ..tools.reasoning import REASONING_PARSERS

    t = p.add_argument_group("tool calls and reasoning (/v1/chat/completions)")
    t.add_argument("--tool-parser", default=None, choices=sorted(TOOL_PARSERS),
                   help="the format the model writes tool calls in (default: detected from its "
                        "chat template)")
    t.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_PARSERS),
                   help="the format the model writes its thinking in; answers then carry "
                        "reasoning_content (default: detected from its chat template)")
    add_engine_arguments(t, ["chat_template"])
    x = p.add_argument_group("exposure (without --api-key)")
    x.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="also answer requests with this Host name (repeatable; '*' any; '*.example.com' "
                        "its subdomains). Default: localhost names, IP addresses and --host")
    x.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                   help="accept (and send CORS headers to) web pages of this origin, e.g. "
                        "https://ui.example.com (repeatable; '*' any). Default: none")
    im = p.add_argument_group("images (/v1/chat/completions image_url parts)")
    im.add_argument("--allow-image-urls", action="store_true",
                    help="fetch http(s) image URLs (default: refused; data: URLs are always taken)")
    im.add_argument("--image-url-max-bytes", type=int, default=ImageFetch().max_bytes,
                    metavar="N", help="largest image fetched from a URL (default %(default)s)")
    im.add_argument("--image-url-timeout", type=float, default=ImageFetch().timeout,
                    metavar="S", help="seconds to fetch one image URL (default %(default)s)")
    lim = p.add_argument_group("limits (per request and per server)")
    lim.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                     help="largest request body (413 above; default %(default)s)")
    lim.add_argument("--max-json-depth", type=int, default=_LIMITS.max_json_depth,
                     help="deepest JSON nesting of a body (400 above; default %(default)s)")
    lim.add_argument("--max-prompts", type=int, default=_LIMITS.max_prompts,
                     help="prompts in one /v1/completions request (default %(default)s)")
    lim.add_argument("--max-n", type=int, default=_LIMITS.max_n, help="largest n (default %(default)s)")
    lim.add_argument("--max-choices", type=int, default=_LIMITS.max_choices,
                     help="prompts x n in one request (default %(default)s)")
    lim.add_argument("--max-score-continuations", type=int, default=_LIMITS.max_score_continuations,
                     help="continuations in one /v1/aiolm/score request (default %(default)s)")
    lim.add_argument("--max-pending", type=int, default=DEFAULT_MAX_PENDING,
                     help="generations (one per choice) admitted at once; 429 with Retry-After "
                          "above (default %(default)s)")
    c = p.add_argument_group("connections")
    c.add_argument("--timeout-keep-alive", type=float, default=_DEFAULT_KEEP_ALIVE,
                   help="close an idle keep-alive connection after this many seconds (default %(default)s)")
    c.add_argument("--timeout-headers", type=float, default=DEFAULT_HEAD_TIMEOUT,
                   help="close a connection that has not sent a whole request head this many seconds "
                        "after opening or after its last response (default %(default)s)")
    c.add_argument("--timeout-body", type=float, default=DEFAULT_BODY_TIMEOUT,
                   help="answer 408 when a request body takes longer than this (default %(default)s)")
    c.add_argument("--limit-concurrency", type=int, default=None,
                   help="most open connections; a new one beyond gets 503 at once (default: the "
                        "descriptor limit minus 64, at most 4096)")
    c.add_argument("--h11-max-incomplete-event-size", type=int, default=_DEFAULT_MAX_HEAD_BYTES,
                   help="largest request head in bytes (h11; default %(default)s)")
    e = p.add_argument_group("engine (the options of aiolm.Engine; docs/engine.md)")
    add_engine_arguments(e, exclude=("model", "chat_template"))
    r = p.add_argument_group("replicas on Ray Serve (pip install 'aiolm[ray]'; docs/serving.md)")
    r.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="run N engine replicas on a local Ray instance behind one endpoint")
    r.add_argument("--routing", default="cache-aware",
                   choices=("cache-aware", "round-robin", "power-of-two"),
                   help="how requests pick a replica (default %(default)s)")
    r.add_argument("--imbalance", type=int, default=4, metavar="K",
                   help="cache-aware: spill to the least-loaded replica when the cache's holder "
                        "runs more than K requests more (default %(default)s)")
    return p


def serve_main(argv: Sequence[str]) -> int:
    """Run ``aiolm serve`` until interrupted or the engine dies; returns the exit status.

    The port is bound first: a busy port (or an address this machine cannot bind) ends it
    at once with :data:`EXIT_STARTUP_FAILED` and a message on stderr, before any model
    loads. Then the engine is built (options validated) and started in the app's
    lifespan, so the model loads when uvicorn starts and the engine closes when it stops.
    """
    import sys

    parser = build_parser()
    args = parser.parse_args(list(argv))
    if args.replicas is not None:
        return _serve_replicas(parser, args)
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        print(f"aiolm serve: {exc.strerror}", file=sys.stderr)
        return EXIT_STARTUP_FAILED
    with sock:
        from ..backends.engine import Engine

        return run_server(Engine(**engine_options(args)), args, sockets=[sock])


def app_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keywords of :func:`~aiolm.server.create_app` that the ``aiolm serve`` options set."""
    allowed_hosts = list(args.allowed_host)
    if args.host not in ("0.0.0.0", "::", ""):  # a wildcard bind is no name a client sends
        allowed_hosts.append(args.host)
    return dict(
        model_name=args.served_model_name, api_key=args.api_key,
        allowed_hosts=allowed_hosts, allowed_origins=args.allowed_origin,
        max_body_bytes=args.max_body_bytes, body_timeout=args.timeout_body,
        max_pending=args.max_pending, max_json_depth=args.max_json_depth,
        max_prompts=args.max_prompts, max_n=args.max_n, max_choices=args.max_choices,
        max_score_continuations=args.max_score_continuations, tool_parser=args.tool_parser,
        reasoning_parser=args.reasoning_parser,
        image_fetch=ImageFetch(max_bytes=args.image_url_max_bytes,
                               timeout=args.image_url_timeout)
        if args.allow_image_urls else None)


def _serve_replicas(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``aiolm serve --replicas N``: the same app on N engine replicas on a local Ray
    instance (:func:`aiolm.serve_ray.run_local`); Serve's HTTP proxy listens on
    ``--host:--port`` (the --timeout-*/--limit-concurrency/--h11-* options are uvicorn's and
    do not apply there)."""
    if args.replicas < 1:
        parser.error(f"--replicas: must be at least 1 (got {args.replicas})")
    if args.imbalance < 0:
        parser.error(f"--imbalance: must be at least 0 (got {args.imbalance})")
    try:
        from ..serve_ray import run_local
    except ImportError as exc:
        parser.error(f"--replicas needs Ray Serve: pip install 'aiolm[ray]' ({exc})")
    options = engine_options(args)
    from ..backends.engine import Engine

    Engine(**options)  # validate the options here, before Ray starts
    logging.basicConfig(level=args.log_level.upper())
    return run_local(options, replicas=args.replicas, host=args.host, port=args.port,
                     routing=args.routing, imbalance=args.imbalance,
                     server_options=app_options(args))


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` (not listening yet: uvicorn listens once the
    app has started, so clients are refused, not kept waiting, while the model loads).

    Raises ``OSError`` whose message names the address and says what to do: for a busy
    port, to stop the other server or choose another ``--port``.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn decides
    address = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As uvicorn: a restart may bind while the last run's connections linger (TIME_WAIT).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise OSError(exc.errno, f"cannot listen on {address}: the address is already in "
                          "use (another server?); stop it or choose another --port") from exc
        raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror or exc}; check "
                      "--host and --port") from exc
    return sock


def run_server(backend: Backend, args: argparse.Namespace, *,
               sockets: Sequence[socket.socket] | None = None) -> int:
    """Serve ``backend`` with uvicorn under the ``aiolm serve`` options ``args``; the exit status.

    The backend is opened in the app's lifespan when it is an async context manager (an
    Engine). While serving, a task watches the backend's ``failure``: once set, the server
    shuts down and this returns :data:`EXIT_ENGINE_FAILED`. ``sockets``: already bound
    sockets to serve on instead of ``--host``/``--port`` (``serve_main`` binds its own
    before the model loads, see :func:`bind_socket`; tests bind free ports).
    """
    import uvicorn

    from .app import create_app

    watch = _Watch(backend)
    app = create_app(backend, lifespan=watch.lifespan, **app_options(args))
    limit = args.limit_concurrency or default_connection_limit()
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, log_config=_log_config(args.log_level),
        lifespan="on", ws="none", timeout_keep_alive=args.timeout_keep_alive,
        http=http_protocol(head_timeout=args.timeout_headers, max_connections=limit),
        h11_max_incomplete_event_size=args.h11_max_incomplete_event_size)
    if not is_loopback_host(args.host) and args.api_key is None:
        _log.warning("serving on %s without --api-key: anyone who can reach this address can use "
                     "the model. Set --api-key (or bind 127.0.0.1).", args.host)
    server = uvicorn.Server(config)
    watch.server = server
    try:
        server.run(sockets=list(sockets) if sockets is not None else None)
    except SystemExit:  # uvicorn exits by itself when the lifespan or the bind fails
        if server.started:
            raise
        return EXIT_STARTUP_FAILED
    except KeyboardInterrupt:  # Ctrl-C: uvicorn re-raises it once shut down (as uvicorn.run)
        pass
    if watch.failure is not None:
        return EXIT_ENGINE_FAILED
    return 0 if server.started else EXIT_STARTUP_FAILED


def _log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging set-up, with aiolm's own log printed the same way at ``level``."""
    import uvicorn.config

    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["loggers"]["aiolm"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


@attrs.define(eq=False)
class _Watch:
    """The lifespan of ``aiolm serve``: opens the backend, and stops the server if it dies."""

    backend: Backend
    server: uvicorn.Server | None = None
    failure: BaseException | None = None

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Any) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            if isinstance(self.backend, contextlib.AbstractAsyncContextManager):
                await stack.enter_async_context(self.backend)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch)
                yield
                tg.cancel_scope.cancel()

    async def _watch(self) -> None:
        # Polled: the backend protocol has no "wait until failed", and twice a second is free.
        while (failure := getattr(self.backend, "failure", None)) is None:
            await anyio.sleep(_POLL_S)
        self.failure = failure
        _log.critical("the engine stopped on %s: shutting the server down (exit status %d) so "
                      "that it can be restarted", type(failure).__name__, EXIT_ENGINE_FAILED,
                      exc_info=failure)
        if self.server is not None:
            self.server.should_exit = True
