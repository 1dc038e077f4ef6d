"""Connection limits uvicorn lacks: a deadline for each request head, and a cap on connections
enforced when a connection opens.

uvicorn closes a keep-alive connection only after a response (``timeout_keep_alive``), and
checks ``limit_concurrency`` only once a whole request head has arrived. A socket that
connects and sends nothing, or trickles a header a byte at a time, holds a descriptor
forever; enough of them exhaust the process's descriptors, and then even ``/health`` cannot
be accepted. :func:`http_protocol` returns uvicorn's own HTTP protocol class (h11, or
httptools when installed) with both guards added: it is passed to uvicorn as ``http=``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from .errors import ApiError

__all__ = ["DEFAULT_HEAD_TIMEOUT", "default_connection_limit", "http_protocol"]

DEFAULT_HEAD_TIMEOUT = 10.0
_WARN_EVERY_S = 10.0
_log = logging.getLogger("aiolm.server")


def default_connection_limit() -> int:
    """A connection cap that keeps accepting under this process's descriptor limit.

    64 descriptors stay free for everything else (model files, logs, the engine); at most
    4096 connections; 1024 where the limit cannot be read.
    """
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return 1024
    if soft == resource.RLIM_INFINITY:
        return 4096
    return max(16, min(4096, soft - 64))


def _full_response() -> bytes:
    err = ApiError(503, "The server has too many open connections: retry shortly.",
                   type="server_error", code="too_many_connections")
    body = err.encoded()
    head = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nretry-after: 1\r\nconnection: close\r\n\r\n")
    return head.encode() + body


class _ConnectionGuard:
    """Mixed in before uvicorn's HTTP protocol class (uses its ``connections``, ``cycle``,
    ``loop``, ``transport`` and ``on_response_complete``)."""

    head_timeout: float
    max_connections: int | None
    # Shared by every connection of one server (a class made per server): when the last
    # "too many connections" warning went out, so a flood logs one line per 10 s, not one each.
    warned: list[float]
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        if self.max_connections is not None and len(self.connections) > self.max_connections:  # type: ignore[attr-defined]
            transport.write(_full_response())
            transport.close()
            now = time.monotonic()
            if now - self.warned[0] > _WARN_EVERY_S:
                self.warned[0] = now
                _log.warning("over %d open connections: refusing new ones (503) until some close",
                             self.max_connections)
            return
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm_head_timer(self) -> None:
        """Give the next request head ``head_timeout`` seconds to arrive whole."""
        if self._head_timer is not None:
            self._head_timer.cancel()
        transport = self.transport  # type: ignore[attr-defined]
        self._head_timer = None if transport.is_closing() else self.loop.call_later(  # type: ignore[attr-defined]
            self.head_timeout, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        cycle = self.cycle  # type: ignore[attr-defined]
        waiting = cycle is None or cycle.response_complete   # no request being answered
        if waiting and not self.transport.is_closing():  # type: ignore[attr-defined]
            self.transport.close()  # type: ignore[attr-defined]


def http_protocol(*, head_timeout: float = DEFAULT_HEAD_TIMEOUT,
                  max_connections: int | None = None) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol with the guards, for ``uvicorn.Config(http=...)``.

    A connection that has not sent a whole request head ``head_timeout`` seconds after it
    opened (or after its previous response) is closed. Beyond ``max_connections`` open
    connections (None: no cap), a new one is answered 503 (``Retry-After: 1``) and closed
    at once, so its descriptor is free again.
    """
    if not head_timeout > 0:
        raise ValueError(f"head_timeout: expected a positive number of seconds, got {head_timeout!r}")
    if max_connections is not None and max_connections < 1:
        raise ValueError(f"max_connections: expected a positive int or None, got {max_connections!r}")
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return type("GuardedHTTPProtocol", (_ConnectionGuard, AutoHTTPProtocol),
                {"head_timeout": float(head_timeout), "max_connections": max_connections,
                 "warned": [float("-inf")]})
