"""The engine loop's values and messages: the events it posts to the async side
(:class:`RequestOutput`, :class:`CommandDone`, :class:`EngineFailed`), the snapshots it
reports (:class:`EngineStatistics`, :class:`IntegrityReport`) and the commands its inbox
takes. :mod:`aiolm.engine.core` re-exports the public ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from ..values import TokenLogprob, Usage

if TYPE_CHECKING:
    from .request import Req

__all__ = ["CommandDone", "EngineFailed", "EngineStatistics", "Event", "IntegrityReport",
           "RequestOutput"]


@attrs.frozen(kw_only=True)
class RequestOutput:
    """What one step produced for one request (an event posted to the async side).

    ``error`` set: the request failed (it is finished). ``scores`` (scoring requests only):
    ``(position, logprob, is_greedy)`` of every known token whose logits were computed.
    ``prompt_logprobs`` (the request's first event, when it asked): one entry per prompt
    token, ``None`` for the first and for an image's placeholders.
    """

    rid: str
    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None
    matched_stop: str | int | None = None
    usage: Usage | None = None
    error: BaseException | None = None
    scores: tuple[tuple[int, float, bool], ...] = ()
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


@attrs.frozen(kw_only=True)
class CommandDone:
    """A command's reply: ``ticket`` identifies the command, ``value`` is its result."""

    ticket: int
    value: Any = None


@attrs.frozen(kw_only=True)
class EngineFailed:
    """The loop stopped on an unexpected error; every open request is lost."""

    error: BaseException


@attrs.frozen(kw_only=True)
class EngineStatistics:
    """A snapshot of the engine as its last step left it.

    ``prompt_tokens`` / ``cached_tokens`` count each request's prompt, and the part of it
    served from the prefix cache, once, when it is first scheduled; ``cache_hit_rate`` is
    the radix cache's (:attr:`~aiolm.cache.radix.RadixCacheStatistics.hit_rate`):
    ``cached_tokens / prompt_tokens``. ``completion_tokens`` totals finished requests.
    """

    running_requests: int = 0
    queued_requests: int = 0
    free_kv_slots: int = 0
    total_kv_slots: int = 0
    cached_kv_tokens: int = 0
    evictable_kv_tokens: int = 0
    protected_kv_tokens: int = 0
    finished_requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    forward_passes: int = 0
    retractions: int = 0
    cache_hit_rate: float = 0.0


@attrs.frozen(kw_only=True)
class IntegrityReport:
    """What :meth:`EngineCore.check_integrity` verified, taken between two steps.

    ``request_slots``: KV slots held by requests (neither free nor in the radix cache);
    ``locked_tokens``: cached tokens locked by running requests; ``rows_in_use``: taken
    ``req_to_token`` rows. Once idle (no request waiting or running) all three are 0.
    """

    idle: bool
    running_requests: int
    waiting_requests: int
    free_slots: int
    cached_tokens: int
    request_slots: int
    locked_tokens: int
    rows_in_use: int


@attrs.frozen
class _Add:
    req: Req


@attrs.frozen
class _Abort:
    rid: str


@attrs.frozen
class _Flush:
    ticket: int


@attrs.frozen
class _Check:
    ticket: int


@attrs.frozen
class _Shutdown:
    pass


Event = RequestOutput | CommandDone | EngineFailed
