"""Deciding when a request stops, and which decoded text is safe to stream.

One :class:`StopChecker` per request, fed every output token in order (sampled or forced by
jump-forward). It detokenizes incrementally and checks, after each token:

- stop token ids and EOS (unless ``ignore_eos``): the token is kept in the ids but not in
  the text;
- stop strings and ``stop_regex``, by the one matcher every backend uses
  (:class:`aiolm.stops.StopMatcher`, whose docstring states the rules): a stop counts as
  soon as the text so far contains it, also when split across tokens; its text and
  anything after it are dropped; text that could still begin a stop is held back, so
  streamed text never contains (part of) a stop. The ``stop_regex`` searches of one
  :meth:`StopChecker.feed` share a time budget (``regex_timeout``); past it ``feed``
  raises ``ValueError`` and the engine fails that request alone;
- ``max_tokens``: finish reason ``"length"``.

No stop condition applies before the request has ``min_tokens`` output tokens.
``matched_stop`` records the stop string, the matched regex text, or the stop token id.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import attrs

from ..sampling import SamplingParams
from ..stops import STOP_REGEX_TIMEOUT, StopMatcher

if TYPE_CHECKING:
    from .tokenizer import IncrementalDetokenizer

__all__ = ["STOP_REGEX_TIMEOUT", "StopChecker", "StopUpdate"]


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
        self._stops = StopMatcher(sampling.stop, sampling.stop_regex, regex_timeout=regex_timeout)
        self.num_tokens = 0
        self.finish_reason: str | None = None
        self.matched_stop: str | int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """The output text streamed so far."""
        return self._stops.text[: self._stops.released]

    def feed(self, token_ids: Sequence[int]) -> StopUpdate:
        """Append the request's next output tokens and check the stop conditions.

        Returns the text that became safe to stream and, if the request stopped, why.
        Feeding a finished checker consumes nothing. Raises ``ValueError`` when the
        ``stop_regex`` searches take longer than ``regex_timeout`` (the request must end).
        """
        if self.finished:
            return StopUpdate(consumed=0, text="")
        self._stops.start_budget()
        consumed = 0
        for tok in token_ids:
            consumed += 1
            self.num_tokens += 1
            if self._check_token(tok):
                break
            if self.num_tokens >= self.sampling.max_tokens:
                self._finish("length", None)
                break
        return self._update(consumed)

    def finish_length(self) -> StopUpdate:
        """Finish with ``"length"`` (the context is full); returns the held-back text."""
        if not self.finished:
            self._finish("length", None)
        return self._update(0)

    def _update(self, consumed: int) -> StopUpdate:
        text = self._stops.flush() if self.finished else self._stops.release()
        return StopUpdate(consumed=consumed, text=text, finish_reason=self.finish_reason,
                          matched_stop=self.matched_stop)

    def _check_token(self, tok: int) -> bool:
        active = self.num_tokens >= self.sampling.min_tokens
        if active and tok in self._stop_ids:
            self._finish("stop", tok)
            return True
        if self._detok is None:
            return False
        matched = self._stops.append(self._detok.feed([tok]), can_stop=active)
        if matched is not None:
            self.finish_reason, self.matched_stop = "stop", matched
            return True
        return False

    def _finish(self, reason: str, matched: str | int | None) -> None:
        self.finish_reason, self.matched_stop = reason, matched
        if self._detok is not None:
            # The detokenizer's held bytes (an unfinished character) end the text as they are.
            self._stops.append(self._detok.flush(), can_stop=False)
