"""The raw ASGI pieces of the POST routes: reading a bounded body, running work until the
client disconnects, and sending a JSON answer or an error."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from .._program.groups import program_error
from .errors import ApiError

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


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


async def _send_json(send: Send, status: int, payload: dict[str, Any],
                     headers: dict[str, str] | None = None) -> None:
    body = json.dumps(payload, allow_nan=False).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_error(send: Send, err: ApiError) -> None:
    await _send_json(send, err.status, err.body(), err.headers)
