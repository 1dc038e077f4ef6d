"""Who may drive a server that has no API key: the ``Host`` and ``Origin`` checks.

Without a key, anything that can reach the port can use the model, and that includes web
pages in a browser on the same machine: through DNS rebinding (a page on ``evil.example``
whose name then resolves to 127.0.0.1, so the browser sends ``Host: evil.example``) or a
cross-site request (which carries the page's ``Origin``). So a key-less server answers only

- requests whose ``Host`` is a loopback name (``localhost``, ``*.localhost``), an IP address
  (a rebinding attack needs a name the attacker controls; an address cannot be rebound), or
  a name the operator allowed; a request without ``Host`` (HTTP/1.0; no browser) passes;
- requests without an ``Origin`` header (the ``openai`` SDK, curl, servers), or whose origin
  the operator allowed (those also get CORS headers, see :func:`create_app`).

With an API key the key is the protection (a page cannot read it, and a cross-site request
that carries it needs a CORS preflight the server only approves for allowed origins), and
these checks are off. Starlette's ``TrustedHostMiddleware`` is not used: it splits the port
off at the first colon, which breaks ``[::1]:8000``, and answers in plain text.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from starlette.responses import JSONResponse

from .errors import ApiError

__all__ = ["RequestGuard", "host_name", "is_loopback_host"]

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]
App = Callable[[dict[str, Any], Receive, Send], Awaitable[None]]


def host_name(value: str) -> str:
    """The host of a ``Host`` header or an allowed-host entry: lower case, no port or brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else value
    if value.count(":") == 1:  # name:port or v4:port (a bare IPv6 address has several colons)
        value = value.partition(":")[0]
    return value.rstrip(".")


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a name or address, as :func:`host_name` gives it) is this machine only."""
    host = host_name(host)
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RequestGuard:
    """ASGI middleware: 403 (OpenAI-style) for a request whose ``Host`` or ``Origin`` is not allowed.

    ``allowed_hosts``: names accepted besides loopback names and IP addresses (``"*"``: any;
    ``"*.example.com"``: that domain's subdomains). ``allowed_origins``: exact origins
    (``"https://ui.example.com"``) accepted on requests that carry one (``"*"``: any).
    """

    def __init__(self, app: App, *, allowed_hosts: Iterable[str] = (),
                 allowed_origins: Iterable[str] = ()) -> None:
        self.app = app
        self._hosts = frozenset(h if h.startswith("*") else host_name(h) for h in allowed_hosts)
        self._origins = frozenset(o.rstrip("/").lower() for o in allowed_origins)

    def host_allowed(self, host: str) -> bool:
        name = host_name(host)
        if "*" in self._hosts or name in self._hosts or _is_address(name) or is_loopback_host(name):
            return True
        return any(h.startswith("*.") and name.endswith(h[1:]) for h in self._hosts)

    def origin_allowed(self, origin: str) -> bool:
        return "*" in self._origins or origin.rstrip("/").lower() in self._origins

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            err = self._check(headers)
            if err is not None:
                await JSONResponse(err.body(), status_code=err.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _check(self, headers: dict[str, str]) -> ApiError | None:
        host = headers.get("host")
        if host is not None and not self.host_allowed(host):
            return ApiError(403, f"Host {host!r} is not allowed: a server without an API key answers "
                                 "only to localhost and IP addresses. Allow the name (aiolm serve "
                                 "--allowed-host, create_app(allowed_hosts=...)) or set an API key.",
                            code="host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and not self.origin_allowed(origin):
            return ApiError(403, f"Origin {origin!r} is not allowed: a server without an API key "
                                 "refuses requests from web pages. Allow the origin (aiolm serve "
                                 "--allowed-origin, create_app(allowed_origins=...)) or set an API key.",
                            code="origin_not_allowed")
        return None
