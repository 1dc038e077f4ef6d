"""Translating ``openai`` SDK errors into :mod:`aiolm.errors`, and the retry loop around calls.

The SDK's own retries are off (``max_retries=0`` on the client we build); this module retries
what is worth retrying — 429, 5xx, connection failures, timeouts and malformed bodies — with
exponential backoff and jitter, honouring the server's ``Retry-After``.
"""

from __future__ import annotations

import email.utils
import json
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import attrs

from ..errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    ConstraintError,
    ContextLengthExceeded,
    RateLimited,
)

__all__ = ["MalformedResponse", "RetryPolicy", "map_openai_error", "retrying"]

T = TypeVar("T")

_CONTEXT_MARKERS = ("context_length_exceeded", "maximum context length", "context length",
                    "too many tokens", "prompt is too long")


class MalformedResponse(BackendUnavailable):
    """The API answered 2xx with a body that is not what the protocol promises."""


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """How often and how long to wait between attempts.

    Attempt ``k`` (0-based) that failed waits ``min(max_delay, base_delay * 2**k)`` scaled by a
    random factor in [0.5, 1] (jitter), or the server's ``Retry-After`` when it gave one. A
    ``Retry-After`` longer than ``max_delay`` is not waited for: the error is raised at once.
    """

    max_retries: int = attrs.field(default=4, validator=attrs.validators.ge(0))
    base_delay: float = attrs.field(default=0.5, validator=attrs.validators.ge(0))
    max_delay: float = attrs.field(default=30.0, validator=attrs.validators.ge(0))

    def delay(self, attempt: int, error: BackendError) -> float | None:
        """Seconds to wait before retrying after ``error``, or None to give up."""
        if attempt >= self.max_retries or not isinstance(error, _RETRYABLE):
            return None
        if isinstance(error, RateLimited) and error.retry_after is not None:
            return error.retry_after if error.retry_after <= self.max_delay else None
        backoff = min(self.max_delay, self.base_delay * 2**attempt)
        return backoff * random.uniform(0.5, 1.0)


_RETRYABLE = (RateLimited, BackendTimeout, BackendUnavailable)


def parse_retry_after(headers: Any) -> float | None:
    """Seconds from ``retry-after-ms`` / ``retry-after`` (seconds or an HTTP date), if any."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def map_openai_error(exc: BaseException) -> BackendError | ContextLengthExceeded | ConstraintError | None:
    """The aiolm error for an ``openai`` SDK exception (None if ``exc`` is not one).

    Most specific first: timeouts before connection errors, 429 and context-length before
    other 4xx. The caller raises the result ``from exc``.
    """
    import openai

    if isinstance(exc, json.JSONDecodeError):
        return MalformedResponse(f"the API returned a body that is not JSON: {exc}")
    if isinstance(exc, openai.APITimeoutError):
        return BackendTimeout(f"the API did not answer in time: {exc}")
    if isinstance(exc, openai.APIConnectionError):
        return BackendUnavailable(f"cannot reach the API: {exc}")
    if isinstance(exc, openai.APIResponseValidationError):
        return MalformedResponse(f"the API returned a malformed body: {exc}")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        message = _message(exc)
        if status == 429:
            return RateLimited(f"rate limited (429): {message}",
                               retry_after=parse_retry_after(exc.response.headers))
        if status == 408:
            return BackendTimeout(f"the API timed out (408): {message}")
        if status >= 500:
            return BackendUnavailable(f"the API failed ({status}): {message}")
        text = f"{exc.code or ''} {message}".lower()
        if status in (400, 413, 422) and any(m in text for m in _CONTEXT_MARKERS):
            return ContextLengthExceeded(f"the API says the prompt is too long ({status}): {message}")
        if status == 400 and exc.param in ("response_format", "regex", "grammar"):
            return ConstraintError(f"the API rejected the constraint ({exc.param}): {message}")
        return BackendError(f"the API refused the request ({status}): {message}")
    if isinstance(exc, openai.APIError):
        # An error event inside a stream (no HTTP status): the server gave up mid-answer.
        return BackendError(f"the API reported an error: {_message(exc)}")
    if isinstance(exc, openai.OpenAIError):
        return BackendError(f"openai client error: {exc}")
    return None


def _message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        msg = body.get("message")
        if isinstance(msg, str):
            return msg
    return str(getattr(exc, "message", exc))


async def retrying(
    call: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    on_attempt: Callable[[], None] | None = None,
) -> T:
    """Await ``call()`` until it succeeds, mapping SDK errors and retrying per ``policy``.

    ``on_attempt`` runs before every attempt (statistics). Cancellation is never caught.
    Raises the mapped aiolm error of the last attempt.
    """
    attempt = 0
    while True:
        if on_attempt is not None:
            on_attempt()
        try:
            return await call()
        except Exception as exc:
            mapped = exc if isinstance(exc, BackendError) else map_openai_error(exc)
            if mapped is None:
                raise
            wait = policy.delay(attempt, mapped) if isinstance(mapped, BackendError) else None
            if wait is None:
                if mapped is exc:
                    raise
                raise mapped from exc
        await anyio.sleep(wait)
        attempt += 1
