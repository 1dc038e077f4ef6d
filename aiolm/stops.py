"""Stop strings and ``stop_regex``: where an output stops, and which of its text is safe to stream.

One matcher for every backend — the engine, the OpenAI backend (for the stops the API cannot
apply), its speculative execution and the scripted backend — so that a stop behaves the same
on each. The rules:

- Text arrives in pieces (a backend's tokens, or a stream's deltas). After each piece the
  output stops at the earliest stop in the text so far: the leftmost occurrence of a stop
  string or complete ``stop_regex`` match (at one position a stop string wins over the
  regex, and an earlier-listed stop string over a later one). So a stop counts as soon as
  the pieces generated so far contain it, also when it is split across pieces.
- The output is the text before the stop: the stop's own text and everything after it are
  dropped. The matched stop is the stop string, or the text the regex matched.
- A pattern that matches the empty string is refused (it would stop every output before it
  began); a zero-width match elsewhere (``\\b``) is never a stop.
- Streaming never shows text that may turn out to be part of a stop: the longest tail that
  is a proper prefix of a stop string is held back, and with ``stop_regex`` the text from
  where a partial match begins (the ``regex`` module's partial matching). Held text is
  released once it can no longer begin a stop, or when the output ends.
- No stop begins in text already released, nor in text appended with ``can_stop=False``
  (the engine's ``min_tokens``).
- A user's pattern may backtrack exponentially: the searches between two
  :meth:`StopMatcher.start_budget` calls share ``regex_timeout`` seconds
  (:data:`STOP_REGEX_TIMEOUT` by default) and release the GIL while they run
  (``concurrent=True``); past the budget a search raises ``ValueError``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from .sampling import normalize_stop

__all__ = ["STOP_REGEX_TIMEOUT", "StopMatcher"]

#: Seconds the ``stop_regex`` searches of one step (one budget) may take.
STOP_REGEX_TIMEOUT = 0.25


class StopMatcher:
    """The stop strings and ``stop_regex`` of one output, fed its text piece by piece.

    ``stop``: a stop string or several (checked by :func:`aiolm.sampling.normalize_stop`,
    which raises for an empty one); ``stop_regex``: a pattern of the ``regex`` module, or
    None. Raises ``ValueError`` for a ``stop_regex`` that matches the empty string or is
    too slow even on it, ``regex.error`` for one that does not compile. Not thread-safe:
    one output, one thread.

    ``text`` is the output so far (cut before the stop once one is met), ``matched`` the
    stop met (None until then), ``released`` how many characters of ``text`` were streamed.
    """

    def __init__(self, stop: str | Iterable[str] | None = (), stop_regex: str | None = None, *,
                 regex_timeout: float = STOP_REGEX_TIMEOUT) -> None:
        self._stops = normalize_stop(stop)
        self._timeout = regex_timeout
        self._regex: Any = None
        if stop_regex is not None:
            import regex

            self._regex = regex.compile(stop_regex)
            # NOTE: this runs on the caller's thread: SamplingParams refused recursion and
            # large repeats, and the budget bounds what is left.
            try:
                empty = self._regex.fullmatch("", timeout=regex_timeout)
            except TimeoutError:
                raise ValueError("stop_regex: too slow even on the empty string; simplify "
                                 "it") from None
            if empty:
                raise ValueError(f"stop_regex: {stop_regex!r} matches the empty string")
        self.text = ""
        self.matched: str | None = None
        self.released = 0
        self._search_from = 0     # no stop may begin before this character
        # The last regex search: ((len(text), search_from) it saw, where a partial match began).
        self._partial: tuple[tuple[int, int], int | None] | None = None
        self._deadline = 0.0
        self.start_budget()

    def start_budget(self) -> None:
        """Start a new time budget for the ``stop_regex`` searches (call it once per step,
        before that step's :meth:`append` calls; :meth:`feed` does)."""
        if self._regex is not None:   # only the regex searches read the deadline
            self._deadline = time.monotonic() + self._timeout

    def append(self, piece: str, *, can_stop: bool = True) -> str | None:
        """Add the next ``piece`` of text; return the stop it completed, if any.

        Once a stop is met, ``text`` ends before it and further pieces are ignored.
        ``can_stop=False`` appends text in which no stop may begin. Raises ``ValueError``
        past the ``stop_regex`` time budget.
        """
        if self.matched is not None:
            return self.matched
        self.text += piece
        if not can_stop:
            self._search_from = len(self.text)
            return None
        hit = self._find()
        if hit is not None:
            start, self.matched = hit
            self.text = self.text[:start]
        return self.matched

    def release(self) -> str:
        """The text that became safe to stream since the last call (all of it up to the
        stop once one is met; otherwise up to what could still begin a stop)."""
        end = len(self.text) if self.matched is not None else max(self.released,
                                                                    self._hold_start())
        out = self.text[self.released:end]
        self.released = end
        self._search_from = max(self._search_from, end)
        return out

    def flush(self) -> str:
        """At the end of the output: the text not yet streamed (held text included)."""
        out = self.text[self.released:]
        self.released = len(self.text)
        return out

    def feed(self, piece: str) -> tuple[str, str | None]:
        """One step of a stream: :meth:`append` ``piece`` under a fresh budget, then
        :meth:`release`. Returns (text safe to stream now, the stop met or None)."""
        self.start_budget()
        matched = self.append(piece)
        return self.release(), matched

    # ------------------------------------------------------------------ matching

    def _find(self) -> tuple[int, str] | None:
        """The earliest stop in ``text`` at or after the search start: (start, matched)."""
        text, start = self.text, self._search_from
        best: tuple[int, str] | None = None
        for s in self._stops:
            i = text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if self._regex is not None:
            # A partial search returns the leftmost complete match if there is one, else
            # where the leftmost partial match begins (kept for the hold-back).
            m = self._search(text, start)
            self._partial = ((len(text), start), m.start() if m is not None and m.partial
                             else None)
            if m is not None and not m.partial and m.end() > m.start():
                if best is None or m.start() < best[0]:
                    best = (m.start(), m.group(0))
        return best

    def _hold_start(self) -> int:
        """The first character that could still begin a stop (len(text) if none)."""
        text, start = self.text, self._search_from
        hold = len(text)
        tail = text[start:]
        for s in self._stops:
            for k in range(min(len(s) - 1, len(tail)), 0, -1):
                if tail.endswith(s[:k]):
                    hold = min(hold, len(text) - k)
                    break
        if self._regex is not None:
            partial = self._partial
            if partial is not None and partial[0] == (len(text), start):
                held = partial[1]   # _find searched this very text
            else:
                m = self._search(text, start)
                held = m.start() if m is not None and m.partial else None
            if held is not None:
                hold = min(hold, held)
        return hold

    def _search(self, text: str, start: int) -> Any:
        """The first (possibly partial) ``stop_regex`` match in ``text[start:]``, within
        what is left of the time budget (``ValueError`` past it)."""
        left = self._deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            return self._regex.search(text, start, partial=True, concurrent=True, timeout=left)
        except TimeoutError:
            raise ValueError(
                f"stop_regex: took longer than {self._timeout * 1000:g} ms on "
                f"{len(text) - start} characters of output; simplify it "
                "(avoid nested or overlapping repeats)") from None
