"""Translating ``openai`` SDK errors into :mod:`aiolm.errors`, and the retries around calls.

The SDK's own retries are off (``max_retries=0`` on the client): retries are ``tenacity``'s
(a maintained retry library), so that every attempt passes through one counting hook
(:attr:`OpenAIStatistics.calls` / ``retries``) and one policy. What is retried: 429, 5xx,
connection failures, timeouts and malformed bodies, with exponential backoff and jitter,
honouring the server's ``Retry-After``.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import attrs
import tenacity

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
    """How often to retry an API call and how long to wait in between (tenacity's terms).

    At most ``max_retries`` retries, only of retryable failures (:meth:`should_retry`).
    After failed attempt ``k`` (1-based) the wait is ``min(max_delay, base_delay * 2**(k-1))``
    scaled by a random factor in [0.5, 1] (jitter), or the server's ``Retry-After`` when it
    gave one; a ``Retry-After`` longer than ``max_delay`` is not waited for: the error is
    raised at once.
    """

    max_retries: int = attrs.field(default=4, validator=attrs.validators.ge(0))
    base_delay: float = attrs.field(default=0.5, validator=attrs.validators.ge(0))
    max_delay: float = attrs.field(default=30.0, validator=attrs.validators.ge(0))
    # Half the capped exponential, plus up to as much again: "equal jitter".
    _backoff: tenacity.wait.wait_base = attrs.field(init=False, eq=False, repr=False)

    @_backoff.default
    def _equal_jitter(self) -> tenacity.wait.wait_base:
        half, cap = self.base_delay / 2, self.max_delay / 2
        return (tenacity.wait_exponential(multiplier=half, max=cap)
                + tenacity.wait_random_exponential(multiplier=half, max=cap))

    def should_retry(self, error: BaseException) -> bool:
        """Whether a call that failed with ``error`` (already an aiolm error) is tried again."""
        if not isinstance(error, _RETRYABLE):
            return False
        retry_after = error.retry_after if isinstance(error, RateLimited) else None
        return retry_after is None or retry_after <= self.max_delay

    def wait(self, state: tenacity.RetryCallState) -> float:
        """Seconds to wait after the failed attempt ``state`` (a tenacity wait strategy)."""
        error = state.outcome.exception() if state.outcome is not None else None
        if isinstance(error, RateLimited) and error.retry_after is not None:
            return error.retry_after
        return self._backoff(state)

    def retrying(self, before: Callable[[tenacity.RetryCallState], None] | None = None
                 ) -> tenacity.AsyncRetrying:
        """A tenacity controller for one call; ``before`` runs before every attempt."""
        return tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(self.max_retries + 1),
            wait=self.wait,
            retry=tenacity.retry_if_exception(self.should_retry),
            before=before or tenacity.before_nothing,
            sleep=anyio.sleep,   # asyncio or trio, whichever runs
            reraise=True,
        )


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
    before: Callable[[tenacity.RetryCallState], None] | None = None,
) -> T:
    """Await ``call()`` until it succeeds, mapping SDK errors and retrying per ``policy``.

    ``before(state)`` runs before every attempt (``state.attempt_number`` counts from 1: the
    statistics' hook). Cancellation is never retried. Raises the mapped aiolm error of the
    last attempt (``from`` the SDK's).
    """
    return await policy.retrying(before)(_mapped, call)


async def _mapped(call: Callable[[], Awaitable[T]]) -> T:
    """``await call()``, an SDK error raised as its aiolm error."""
    try:
        return await call()
    except Exception as exc:
        mapped = None if isinstance(exc, BackendError) else map_openai_error(exc)
        if mapped is None:
            raise
        raise mapped from exc
