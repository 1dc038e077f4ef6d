"""OpenAI-style error bodies, and which HTTP status each aiolm error becomes."""

from __future__ import annotations

import json
import re
from typing import Any

from ..errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    ConstraintError,
    ContextLengthExceeded,
    EngineError,
    OutOfMemory,
    RateLimited,
    UnsupportedFeature,
)

__all__ = ["ApiError", "api_error_for", "bad", "json_type"]

# Request fields a backend's or the chat layer's ``ValueError`` may start with ("tools: ...",
# "logit_bias: token id 70000 is outside the vocabulary"): the error names that field.
_FIELDS = frozenset({"tools", "tool_choice", "parallel_tool_calls", "logit_bias", "messages",
                     "max_thinking_tokens", "reasoning_effort", "chat_template_kwargs",
                     "response_format", "stop_token_ids"})
_LEADING_FIELD = re.compile(r"([a-z_]+)(?:\[\d+\])?: ")


class ApiError(Exception):
    """An error answer: HTTP ``status`` and the OpenAI body ``{"error": {...}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI clients parse."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def encoded(self) -> bytes:
        return json.dumps(self.body()).encode()


def bad(param: str, message: str) -> ApiError:
    """The 400 for request field ``param``; the message starts with the field's name."""
    return ApiError(400, f"{param}: {message}", param=param, code="invalid_value")


def json_type(value: Any) -> str:
    """The JSON name of ``value``'s type, as the client wrote it ("a boolean", "a list")."""
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"),
                       (str, "a string"), (list, "a list"), (dict, "an object")):
        if isinstance(value, kind):
            return name
    return "null" if value is None else type(value).__name__


def api_error_for(exc: BaseException, *, prompt_param: str = "prompt",
                  constraint_param: str | None = None) -> ApiError:
    """The HTTP error for an exception raised while generating (most specific first).

    ``prompt_param`` and ``constraint_param`` are the request fields a context-length or
    constraint error names. A ``ValueError`` is the backend refusing the request (400). A
    server-side failure (5xx) gets a message that says what happened and what to do, never
    the exception's text: that may carry internals, and goes to the server's log instead.
    """
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ContextLengthExceeded):
        return ApiError(400, str(exc), param=prompt_param, code="context_length_exceeded")
    if isinstance(exc, ConstraintError):
        return ApiError(400, str(exc), param=constraint_param or "response_format",
                        code="invalid_constraint")
    if isinstance(exc, UnsupportedFeature):
        return ApiError(400, str(exc), code="unsupported_feature")
    if isinstance(exc, RateLimited):
        headers = {} if exc.retry_after is None else {"Retry-After": f"{exc.retry_after:g}"}
        return ApiError(429, "The model is rate limited: retry later.", type="rate_limit_error",
                        code="rate_limited", headers=headers)
    if isinstance(exc, BackendTimeout):
        return ApiError(504, "The model did not answer in time: retry later.", type="server_error",
                        code="timeout")
    if isinstance(exc, OutOfMemory):
        return ApiError(503, "The server ran out of memory for this request: retry later, or send "
                             "a shorter one.", type="server_error", code="unavailable")
    if isinstance(exc, BackendUnavailable):
        return ApiError(503, "The model is unavailable (the engine stopped or is restarting): "
                             "retry later.", type="server_error", code="unavailable")
    if isinstance(exc, BackendError):
        return ApiError(502, "The model failed to answer: retry later.", type="server_error",
                        code="backend_error")
    if isinstance(exc, EngineError):
        return ApiError(500, "The engine failed on this request.", type="server_error",
                        code="engine_error")
    if isinstance(exc, ValueError):  # backends raise it for requests they cannot take
        message = str(exc)
        lead = _LEADING_FIELD.match(message)
        param = lead.group(1) if lead is not None and lead.group(1) in _FIELDS else None
        return ApiError(400, message, param=param, code="invalid_value")
    return ApiError(500, "internal server error", type="server_error", code="internal_error")
