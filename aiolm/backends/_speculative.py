"""API speculative execution: one call answers several consecutive ``gen``\\ s.

The first eligible ``gen`` of a program run asks the API for at least ``spec_tokens`` tokens
with no stop and remembers the whole continuation (a :class:`Speculation`) in the run's
:class:`SpecSession`. A later request whose prompt is the remembered prompt plus a prefix of
that continuation (the earlier answers and the program's literal text, matched exactly) is
answered by cutting the rest of the continuation with the request's own stop / max_tokens
rules — no API call. Anything that does not match, or that the speculated text cannot decide
(it ran out before a stop), falls back to a real call.

The session belongs to one program run (``Backend.new_session()``), so concurrent runs,
``run_batch`` and forks never see each other's speculation; branches of one run share it
safely because matching checks the full prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import attrs

from ..sampling import SamplingParams
from ..stops import StopMatcher

__all__ = ["Cut", "SpecSession", "Speculation", "cut", "sampling_key", "speculable"]

_MAX_ENTRIES = 8


def sampling_key(sampling: SamplingParams) -> tuple[Any, ...]:
    """The parameters that must agree for one continuation to stand in for another call."""
    return (sampling.temperature, sampling.top_p, sampling.top_k, sampling.min_p,
            sampling.frequency_penalty, sampling.presence_penalty, sampling.ignore_eos)


def speculable(sampling: SamplingParams, constraint: Any) -> bool:
    """True when a request can be answered from (or start) a speculation.

    Constrained decoding, logprobs, ``min_tokens`` and stop token ids need the model itself
    (the continuation carries no token ids and was not constrained).
    """
    return (constraint is None and not sampling.logprobs and sampling.min_tokens == 0
            and not sampling.stop_token_ids)


@attrs.frozen(kw_only=True)
class Speculation:
    """A speculated continuation.

    ``key`` says what it continues (the prompt text for completion models; the turns before
    the assistant turn for chat models). ``tokens`` are the continuation split at token
    boundaries (None when the API did not say). ``finished`` means the model itself ended
    the text (end of sequence) before the token limit, so nothing follows it.
    """

    key: Any
    text: str
    tokens: tuple[str, ...] | None
    finished: bool
    sampling: tuple[Any, ...]


@attrs.frozen(kw_only=True)
class Cut:
    """One ``gen``'s answer cut out of a speculated continuation."""

    text: str
    finish_reason: Literal["stop", "length"]
    matched_stop: str | None = None
    num_tokens: int | None = None


@attrs.define(eq=False)
class _Entry:
    spec: Speculation
    used_end: int = 0  # how far into spec.text answers were already served


@attrs.define(eq=False)
class SpecSession:
    """Per-program-run speculation state (what ``OpenAI.new_session()`` returns).

    ``spec_tokens`` is the run's speculation length (None: speculation off). Holds the few
    most recent speculations. Only plain list operations between awaits, so the tasks of one
    run (fork branches) can share it.
    """

    spec_tokens: int | None = None
    _entries: list[_Entry] = attrs.field(factory=list, init=False)

    def remember(self, speculation: Speculation) -> None:
        """Keep ``speculation`` (the most recent first; old ones are dropped)."""
        self._entries.insert(0, _Entry(spec=speculation))
        del self._entries[_MAX_ENTRIES:]

    def has(self, key: Any, sampling: SamplingParams) -> bool:
        """Whether a speculation of ``key`` under these sampling parameters is remembered."""
        wanted = sampling_key(sampling)
        return any(e.spec.key == key and e.spec.sampling == wanted for e in self._entries)

    def serve(self, consumed: Callable[[Speculation], str | None], sampling: SamplingParams) -> Cut | None:
        """Answer a request from a remembered speculation, or None.

        ``consumed(spec)`` returns the part of the new prompt that follows ``spec.key`` (None
        if the prompt does not continue it); it must be a prefix of the speculated text. When
        sampling, each stretch of speculated text answers at most one request (two fork
        branches continuing from the same point must get independent samples).
        """
        key = sampling_key(sampling)
        for entry in self._entries:
            spec = entry.spec
            if spec.sampling != key:
                continue
            used = consumed(spec)
            if used is None or not spec.text.startswith(used):
                continue
            if not sampling.greedy and len(used) < entry.used_end:
                continue
            answer = cut(spec, len(used), sampling)
            if answer is None:
                continue
            entry.used_end = len(used) + len(answer.text)
            return answer
        return None


def cut(spec: Speculation, offset: int, sampling: SamplingParams) -> Cut | None:
    """Answer a request whose output starts at ``spec.text[offset:]``, or None if undecided.

    Applies the request's ``stop`` strings, ``stop_regex`` and ``max_tokens`` the way the
    model would have during its own call: the speculated tokens are fed one by one to the
    stop matcher every backend uses (:class:`aiolm.stops.StopMatcher`), so a stop counts
    once the tokens generated so far contain it, and the answer is the text before it.
    Without token boundaries the text is fed a character at a time, and a stop is accepted
    only when even one token per byte fits in ``max_tokens``.
    """
    if sampling.max_tokens == 0:
        return Cut(text="", finish_reason="length", num_tokens=0)
    rest = spec.text[offset:]
    ends = _token_ends(spec.tokens, offset) if spec.tokens is not None else None
    finished = spec.finished and not sampling.ignore_eos
    stops = StopMatcher(sampling.stop, sampling.stop_regex)
    limit = sampling.max_tokens
    checkpoints = ends if ends is not None else range(1, len(rest) + 1)
    done = 0
    for i, end in enumerate(checkpoints):
        if ends is not None and i >= limit:
            return Cut(text=rest[: ends[limit - 1]], finish_reason="length", num_tokens=limit)
        _, matched = stops.feed(rest[done:end])
        done = end
        if matched is None:
            continue
        if ends is None and len(rest[:end].encode()) > limit:
            return None
        return Cut(text=stops.text, finish_reason="stop", matched_stop=matched,
                   num_tokens=i + 1 if ends is not None else None)
    if ends is not None:
        if len(ends) >= limit:
            return Cut(text=rest[: ends[limit - 1]], finish_reason="length", num_tokens=limit)
        return Cut(text=rest, finish_reason="stop", num_tokens=len(ends)) if finished else None
    if finished and len(rest.encode()) <= limit:
        return Cut(text=rest, finish_reason="stop")
    return None


def _token_ends(tokens: tuple[str, ...], offset: int) -> list[int]:
    """End offsets, relative to ``offset``, of the tokens that end after it."""
    ends, pos = [], 0
    for tok in tokens:
        pos += len(tok)
        if pos > offset:
            ends.append(pos - offset)
    return ends
