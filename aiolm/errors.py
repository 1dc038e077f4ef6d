"""The aiolm exception tree.

Every error aiolm raises on purpose is one of these (bad arguments are plain
``ValueError`` / ``TypeError`` naming the argument)::

    AiolmError
    ├── BackendError                 a backend failed to answer
    │   ├── RateLimited              the API said 429; retry later
    │   ├── BackendTimeout           no answer in time
    │   └── BackendUnavailable       connection refused, 5xx, engine not started or closed
    ├── EngineError                  the in-process engine refused or failed a request
    │   ├── ContextLengthExceeded    prompt (+ max_tokens) is longer than the model's context
    │   └── OutOfMemory              the KV cache cannot hold even this one request
    ├── ConstraintError              a regex / JSON schema / grammar is invalid or unsatisfied
    ├── UnsupportedFeature           the backend cannot do what the program asks
    └── ProgramError                 misuse of a program state
        ├── VariableNotReady         ``s[name]`` read before the gen finished
        └── UnknownVariable          no such variable was ever enqueued
"""

from __future__ import annotations

__all__ = [
    "AiolmError",
    "BackendError",
    "BackendTimeout",
    "BackendUnavailable",
    "ConstraintError",
    "ContextLengthExceeded",
    "EngineError",
    "OutOfMemory",
    "ProgramError",
    "RateLimited",
    "UnknownVariable",
    "UnsupportedFeature",
    "VariableNotReady",
]


class AiolmError(Exception):
    """Base class of every error aiolm raises on purpose."""


class BackendError(AiolmError):
    """A backend failed to produce an answer."""


class RateLimited(BackendError):
    """The backend refused the request for rate limiting (HTTP 429).

    ``retry_after`` is the delay in seconds the server asked for, if it said one.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BackendTimeout(BackendError):
    """The backend did not answer in time."""


class BackendUnavailable(BackendError):
    """The backend cannot be reached, failed with a server error, or is closed."""


class EngineError(AiolmError):
    """The in-process engine refused or failed a request."""


class ContextLengthExceeded(EngineError, ValueError):
    """The prompt (plus the tokens asked for) does not fit the model's context."""


class OutOfMemory(EngineError):
    """The KV cache cannot hold the request even with everything else evicted."""


class ConstraintError(AiolmError, ValueError):
    """A constraint is invalid (bad regex, malformed schema) or an output violates it."""


class UnsupportedFeature(AiolmError):
    """The chosen backend cannot do what the program asks (say which backend can)."""


class ProgramError(AiolmError):
    """A program used its state wrongly."""


class VariableNotReady(ProgramError, KeyError):
    """``state[name]`` was read while the variable is still being generated."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class UnknownVariable(ProgramError, KeyError):
    """No variable of that name was ever enqueued on the state."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
