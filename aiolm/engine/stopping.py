"""Deciding when a request stops, and which decoded text is safe to stream.

One :class:`StopChecker` per request, fed every output token in order (sampled or forced by
jump-forward). It detokenizes incrementally and checks, after each token:

- stop token ids and EOS (unless ``ignore_eos``): the token is kept in the ids but not in
  the text;
- stop strings, also when split across tokens: the checker holds back the longest tail of
  the text that could still be the start of a stop string, so streamed text never contains
  (part of) a stop string that later completes;
- ``stop_regex``, with the ``regex`` module's partial matching: text from the start of a
  possible (partial) match is held back the same way. A user's pattern may backtrack
  exponentially, so its searches in one :meth:`StopChecker.feed` share a time budget
  (``regex_timeout``, :data:`STOP_REGEX_TIMEOUT` by default) and release the GIL while they
  run (``concurrent=True``); past the budget ``feed`` raises ``ValueError`` and the engine
  fails that request alone;
- ``max_tokens``: finish reason ``"length"``.

No stop condition applies before the request has ``min_tokens`` output tokens. The text of
a stop string / regex match and anything after it is dropped; ``matched_stop`` records the
stop string, the matched regex text, or the stop token id.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from ..sampling import SamplingParams

if TYPE_CHECKING:
    from .tokenizer import IncrementalDetokenizer

__all__ = ["STOP_REGEX_TIMEOUT", "StopChecker", "StopUpdate"]

#: Seconds the ``stop_regex`` searches of one request may take in one engine step.
STOP_REGEX_TIMEOUT = 0.25


@attrs.frozen(kw_only=True)
class StopUpdate:
    """What :meth:`StopChecker.feed` decided.

    ``consumed``: how many of the fed tokens belong to the output (tokens after the one
    that stopped the request are dropped). ``text``: the new text safe to stream.
    """

    consumed: int
    text: str
    finish_reason: str | None = None
    matched_stop: str | int | None = None


class StopChecker:
    """Stop conditions and stream-safe text of one request (used by the engine thread).

    ``detokenizer`` is ``None`` when the engine has no tokenizer (token-id-only requests);
    then text is empty and stop strings / regexes are refused with ``ValueError``.
    Raises ``ValueError`` for a ``stop_regex`` that matches the empty string. ``regex_timeout``
    is the seconds the ``stop_regex`` searches of one :meth:`feed` may take.
    """

    def __init__(self, sampling: SamplingParams, *, eos_token_ids: Iterable[int],
                 detokenizer: IncrementalDetokenizer | None,
                 regex_timeout: float = STOP_REGEX_TIMEOUT) -> None:
        if detokenizer is None and (sampling.stop or sampling.stop_regex):
            raise ValueError("stop: stop strings and stop_regex need an engine with a tokenizer")
        self.sampling = sampling
        self._stop_ids = frozenset(sampling.stop_token_ids) | (
            frozenset() if sampling.ignore_eos else frozenset(eos_token_ids)
        )
        self._detok = detokenizer
        self._regex: Any = None
        self._regex_timeout = regex_timeout
        self._deadline = 0.0
        # The last partial search: (len(text), search_from) it saw, and where its match began.
        self._partial: tuple[tuple[int, int], int | None] | None = None
        if sampling.stop_regex is not None:
            import regex

            self._regex = regex.compile(sampling.stop_regex)
            # NOTE: this runs on the caller's thread: SamplingParams refused recursion and
            # large repeats, and the budget bounds what is left.
            try:
                empty = self._regex.fullmatch("", timeout=regex_timeout)
            except TimeoutError:
                raise ValueError("stop_regex: too slow even on the empty string; simplify "
                                 "it") from None
            if empty:
                raise ValueError(f"stop_regex: {sampling.stop_regex!r} matches the empty string")
        self._text = ""          # all decoded output text so far (stop tokens left out)
        self._emitted = 0        # characters of ``_text`` already streamed
        self._search_from = 0    # no stop match may start before this character
        self.num_tokens = 0
        self.finish_reason: str | None = None
        self.matched_stop: str | int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """The output text streamed so far."""
        return self._text[: self._emitted]

    def feed(self, token_ids: Sequence[int]) -> StopUpdate:
        """Append the request's next output tokens and check the stop conditions.

        Returns the text that became safe to stream and, if the request stopped, why.
        Feeding a finished checker consumes nothing. Raises ``ValueError`` when the
        ``stop_regex`` searches take longer than ``regex_timeout`` (the request must end).
        """
        if self.finished:
            return StopUpdate(consumed=0, text="")
        if self._regex is not None:
            self._deadline = time.monotonic() + self._regex_timeout
        consumed = 0
        for tok in token_ids:
            consumed += 1
            self.num_tokens += 1
            if self._check_token(tok):
                break
            if self.num_tokens >= self.sampling.max_tokens:
                self._finish("length", None)
                break
        return StopUpdate(consumed=consumed, text=self._take_safe_text(),
                          finish_reason=self.finish_reason, matched_stop=self.matched_stop)

    def finish_length(self) -> StopUpdate:
        """Finish with ``"length"`` (the context is full); returns the held-back text."""
        if not self.finished:
            self._finish("length", None)
        return StopUpdate(consumed=0, text=self._take_safe_text(),
                          finish_reason=self.finish_reason, matched_stop=self.matched_stop)

    def _check_token(self, tok: int) -> bool:
        active = self.num_tokens >= self.sampling.min_tokens
        if active and tok in self._stop_ids:
            self._finish("stop", tok)
            return True
        if self._detok is None:
            return False
        self._text += self._detok.feed([tok])
        if not active:
            self._search_from = len(self._text)
            return False
        hit = self._find_stop()
        if hit is not None:
            start, matched = hit
            self._text = self._text[:start]
            self.finish_reason, self.matched_stop = "stop", matched
            return True
        return False

    def _finish(self, reason: str, matched: str | int | None) -> None:
        self.finish_reason, self.matched_stop = reason, matched
        if self._detok is not None:
            self._text += self._detok.flush()

    def _find_stop(self) -> tuple[int, str] | None:
        text, start = self._text, self._search_from
        best: tuple[int, str] | None = None
        for s in self.sampling.stop:
            i = text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if self._regex is not None:
            m = self._search(text, start)
            self._partial = ((len(text), start), m.start() if m is not None and m.partial
                             else None)
            if m is not None and not m.partial and m.end() > m.start():
                if best is None or m.start() < best[0]:
                    best = (m.start(), m.group(0))
        return best

    def _search(self, text: str, start: int = 0) -> Any:
        """The first (possibly partial) ``stop_regex`` match in ``text[start:]``, within
        what is left of this feed's time budget (``ValueError`` past it)."""
        left = self._deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            return self._regex.search(text, start, partial=True, concurrent=True, timeout=left)
        except TimeoutError:
            raise ValueError(
                f"stop_regex: took longer than {self._regex_timeout * 1000:g} ms on "
                f"{len(text) - start} characters of output; simplify it "
                "(avoid nested or overlapping repeats)") from None

    def _hold_start(self) -> int:
        """The first character that could still begin a stop match (len(text) if none)."""
        text, start = self._text, self._search_from
        hold = len(text)
        tail = text[start:]
        for s in self.sampling.stop:
            for k in range(min(len(s) - 1, len(tail)), 0, -1):
                if tail.endswith(s[:k]):
                    hold = min(hold, len(text) - k)
                    break
        if self._regex is not None:
            partial = self._partial
            if partial is not None and partial[0] == (len(text), start):
                held = partial[1]   # _find_stop searched this very text
            else:
                m = self._search(text, start)
                held = m.start() if m is not None and m.partial else None
            if held is not None:
                hold = min(hold, held)
        return hold

    def _take_safe_text(self) -> str:
        end = len(self._text) if self.finished else max(self._emitted, self._hold_start())
        out = self._text[self._emitted:end]
        self._emitted = end
        if not self.finished:
            self._search_from = max(self._search_from, self._emitted)
        return out
