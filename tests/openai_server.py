"""Test harness: a real uvicorn server on 127.0.0.1 (a free port, its own thread) serving an
ASGI app, and an ASGI wrapper that counts the generation calls the server receives."""

from __future__ import annotations

import collections
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn

API_KEY = "test-key"
GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions")


class CallCounter:
    """Wraps an ASGI app; ``calls[path]`` counts the POSTs it received per path."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.calls: collections.Counter[str] = collections.Counter()

    @property
    def generation_calls(self) -> int:
        return sum(self.calls[p] for p in GENERATION_ROUTES)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            self.calls[scope["path"]] += 1
        await self.app(scope, receive, send)


@contextlib.contextmanager
def running(app: Any, *, timeout: float = 60.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread; yields the base URL (``http://127.0.0.1:P/v1``).

    The lifespan runs (``lifespan="on"``), so an app that opens an engine there has it open
    once this yields. Stops the server on exit.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                            lifespan="on", http="h11", ws="none")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
