"""``ThinkingBudget``: a thinking model reasons freely for at most so many tokens, then
answers under the answer's own constraint.

The output is ``start`` (forced, when the output must open the thinking itself), free
thinking up to ``end``, then the answer. When the thinking reaches ``max_thinking_tokens``
without ending, ``end + after_end`` is forced (jump-forward appends it in one pass) and the
answer follows. The end of the thinking is found in the text of the thinking tokens (decoded
one by one, special tokens kept), so ``end`` may be one special token (Qwen3, DeepSeek-R1)
or several ordinary ones.

NOTE: when ``end`` is ordinary text, a token could finish it and carry on with text of the
answer that the answer's matcher never saw; such tokens are masked while thinking (a token
that finishes ``end`` followed only by whitespace is allowed, and the whitespace is not part
of the answer's constrained text).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import Any

import attrs

from ._llg_matcher import set_single_token
from .base import Constraint, Matcher
from .limits import ConstraintLimits

__all__ = ["ThinkingBudget"]


@attrs.frozen
class ThinkingBudget(Constraint):
    """Thinking of at most ``max_thinking_tokens`` tokens (None: unbounded) ended by
    ``end``, then an answer under ``inner`` (None: free).

    ``start``: text forced first when the output must open the thinking (Qwen3:
    ``"<think>"``); None when the prompt already opened it (DeepSeek-R1 distills).
    ``after_end``: text forced after ``end`` when the budget ends the thinking. While
    thinking every token is allowed, except EOS when ``inner`` is set (an answer must
    follow). Raises ``TypeError`` / ``ValueError`` for a malformed spec.
    """

    inner: Constraint | None = None
    end: str = "</think>"
    start: str | None = None
    max_thinking_tokens: int | None = None
    after_end: str = "\n\n"

    def __attrs_post_init__(self) -> None:
        if self.inner is not None and not isinstance(self.inner, Constraint):
            raise TypeError(f"thinking: inner must be a Constraint or None, got "
                            f"{type(self.inner).__name__}")
        if not isinstance(self.end, str) or not self.end:
            raise ValueError("thinking: end must be a non-empty string")
        if self.start is not None and (not isinstance(self.start, str) or not self.start):
            raise ValueError("thinking: start must be a non-empty string or None")
        budget = self.max_thinking_tokens
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)
                                   or budget < 0):
            raise ValueError(f"thinking: max_thinking_tokens must be a non-negative int or "
                             f"None, got {budget!r}")
        if not isinstance(self.after_end, str):
            raise ValueError("thinking: after_end must be a string")

    def compile(self, tokenizer: Any) -> Matcher:
        return self.compile_for(tokenizer, ConstraintLimits())

    def compile_for(self, tokenizer: Any, limits: ConstraintLimits) -> Matcher:
        """The matcher; the answer's constraint is compiled under ``limits``."""
        from ._llg import _eos_ids

        hf = getattr(tokenizer, "hf", tokenizer)
        texts = _token_texts(hf)
        run_ons = _run_on_tokens(hf, texts, self.end) if self.inner is not None else None
        return _ThinkingMatcher(
            spec=self,
            start_ids=tuple(hf.encode(self.start, add_special_tokens=False)) if self.start else (),
            end_ids=tuple(hf.encode(self.end + self.after_end, add_special_tokens=False)),
            texts=texts,
            run_ons=run_ons,
            eos=frozenset(_eos_ids(tokenizer, hf)),
            inner=self.inner.compile_for(tokenizer, limits) if self.inner is not None else None,
        )

    def matches_text(self, text: str) -> bool:
        """True when ``text`` has ``end`` and what follows it (less ``after_end``, or less
        its leading whitespace) is an answer ``inner`` allows."""
        i = text.find(self.end)
        if i < 0:
            return False
        if self.inner is None:
            return True
        answer = text[i + len(self.end):]
        answer = answer.removeprefix(self.after_end) if self.after_end else answer
        return any(self.inner.matches_text(a) for a in dict.fromkeys((answer, answer.lstrip())))

    def validate(self) -> None:
        if self.inner is not None:
            self.inner.validate()


_START, _THINK, _FORCE, _ANSWER = "start", "think", "force", "answer"


class _ThinkingMatcher(Matcher):
    """The matcher of a :class:`ThinkingBudget` (see its docstring for the phases)."""

    def __init__(self, *, spec: ThinkingBudget, start_ids: tuple[int, ...],
                 end_ids: tuple[int, ...], texts: Sequence[str],
                 run_ons: tuple[Any, ...] | None, eos: frozenset[int],
                 inner: Matcher | None) -> None:
        self._end = spec.end
        self._budget = spec.max_thinking_tokens
        self._start_ids = start_ids
        self._end_ids = end_ids
        self._texts = texts
        self._run_ons = run_ons
        self._eos = eos
        self._inner = inner
        self._phase = _START if start_ids else _THINK if self._budget != 0 else _FORCE
        self._pos = 0  # tokens of start_ids / end_ids already advanced
        self._count = 0  # thinking tokens
        self._tail = ""  # the thinking text's last len(end) - 1 characters
        self._to_inner = False  # the last token went to the inner matcher
        # The state before each advanced token, so that rollback is exact.
        self._history: list[tuple[str, int, int, str]] = []

    def fill_next_token_mask(self, bitmask_row: Any) -> None:
        phase = self._phase
        if phase == _START or phase == _FORCE:
            ids = self._start_ids if phase == _START else self._end_ids
            set_single_token(bitmask_row, ids[self._pos])
        elif phase == _ANSWER and self._inner is not None:
            self._inner.fill_next_token_mask(bitmask_row)
        else:
            target = bitmask_row.numpy() if hasattr(bitmask_row, "numpy") else bitmask_row
            _allow_below(target, len(self._texts))
            if phase == _THINK and self._inner is not None:
                _disallow(target, self._refused_while_thinking())

    def only_token(self) -> int | None:
        if self._phase == _START:
            return self._start_ids[self._pos]
        if self._phase == _FORCE:
            return self._end_ids[self._pos]
        if self._phase == _ANSWER and self._inner is not None:
            return self._inner.only_token()
        return None

    def llguidance_mask(self, words: int) -> Any | None:
        if self._phase == _ANSWER and self._inner is not None:
            return self._inner.llguidance_mask(words)
        return None

    def error(self) -> str:
        return self._inner.error() if self._inner is not None else ""

    def advance(self, token_id: int) -> bool:
        state = (self._phase, self._pos, self._count, self._tail)
        phase, to_inner = self._phase, False
        if phase == _START or phase == _FORCE:
            ids = self._start_ids if phase == _START else self._end_ids
            if token_id != ids[self._pos]:
                return False
            self._pos += 1
            if self._pos == len(ids):
                self._pos = 0
                self._phase = (_THINK if self._budget != 0 else _FORCE) if phase == _START \
                    else _ANSWER
        elif phase == _THINK:
            if not 0 <= token_id < len(self._texts) or \
                    (self._inner is not None and token_id in self._eos):
                return False
            text = self._tail + self._texts[token_id]
            at = text.find(self._end)
            if at >= 0 and self._inner is not None and text[at + len(self._end):].strip():
                return False  # it would carry answer text past the end (masked)
            self._count += 1
            if at >= 0:
                self._phase = _ANSWER
            elif self._budget is not None and self._count >= self._budget:
                self._phase = _FORCE
            else:
                self._tail = text[len(text) - len(self._end) + 1:] if len(self._end) > 1 else ""
        elif self._inner is not None:
            if not self._inner.advance(token_id):
                return False
            to_inner = True
        self._to_inner = to_inner
        self._history.append(state)
        return True

    def forced_tokens(self) -> list[int]:
        if self._phase == _START:
            return list(self._start_ids[self._pos:])
        if self._phase == _FORCE:
            return list(self._end_ids[self._pos:])
        if self._phase == _ANSWER and self._inner is not None:
            return self._inner.forced_tokens()
        return []

    def jump_forward(self) -> tuple[int, list[int]]:
        if self._to_inner:  # the inner matcher may re-split its own last token
            assert self._inner is not None
            self._to_inner = False
            back, tokens = self._inner.jump_forward()
            if back:
                del self._history[len(self._history) - back:]
            return back, tokens
        return 0, self.forced_tokens()

    def is_finished(self) -> bool:
        return self._phase == _ANSWER and self._inner is not None and self._inner.is_finished()

    def accepts_eos(self) -> bool:
        if self._phase == _THINK:
            return self._inner is None
        if self._phase == _ANSWER:
            return self._inner is None or self._inner.accepts_eos()
        return False

    def fork(self) -> _ThinkingMatcher:
        twin = object.__new__(_ThinkingMatcher)
        twin.__dict__.update(self.__dict__)
        twin._history = list(self._history)
        twin._inner = self._inner.fork() if self._inner is not None else None
        return twin

    def rollback(self, n: int) -> None:
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"rollback: n must be a non-negative int, got {n!r}")
        if n > len(self._history):
            raise ValueError(f"rollback: n={n} exceeds the {len(self._history)} tokens advanced")
        if n == 0:
            return
        undone = self._history[len(self._history) - n:]
        inner_tokens = sum(1 for state in undone if state[0] == _ANSWER)
        if inner_tokens and self._inner is not None:
            self._inner.rollback(inner_tokens)
        del self._history[len(self._history) - n:]
        self._phase, self._pos, self._count, self._tail = undone[0]
        self._to_inner = False

    def _refused_while_thinking(self) -> Any:
        """EOS and the tokens that would finish ``end`` and carry on past it."""
        import numpy as np

        assert self._run_ons is not None
        parts = [np.array(sorted(self._eos), dtype=np.int64), self._run_ons[0]]
        for k in range(1, len(self._end)):
            if self._tail.endswith(self._end[:k]):
                parts.append(self._run_ons[k])
        return np.concatenate(parts)


def _allow_below(target: Any, n: int) -> None:
    """Allow exactly tokens ``0 .. n-1`` (those that fit) in an int32 bitmask row."""
    import numpy as np

    words = target.shape[0]
    target.fill(0)
    full = min(n // 32, words)
    target[:full] = -1
    rest = n - full * 32
    if full < words and 0 < rest < 32:
        target[full] = np.uint32((1 << rest) - 1).view(np.int32)


def _disallow(target: Any, ids: Any) -> None:
    """Clear the bits of token ``ids`` (a numpy int array) in an int32 bitmask row."""
    import numpy as np

    ids = ids[ids < target.shape[0] * 32]
    if ids.size:
        bits = target.view(np.uint32)
        np.bitwise_and.at(bits, ids >> 5, ~(np.uint32(1) << (ids & 31).astype(np.uint32)))


_lock = threading.Lock()
# NOTE: module-level caches, keyed weakly by the HF tokenizer so they die with it; guarded
# by ``_lock`` (requests compile on worker threads).
_texts: weakref.WeakKeyDictionary[Any, list[str]] = weakref.WeakKeyDictionary()
_run_on_cache: weakref.WeakKeyDictionary[Any, dict[str, tuple[Any, ...]]] = (
    weakref.WeakKeyDictionary()
)


def _token_texts(hf: Any) -> list[str]:
    """Each token's text decoded alone, special tokens kept (once per tokenizer: ~0.4 s for
    a 50k vocabulary)."""
    with _lock:
        texts = _texts.get(hf)
    if texts is None:
        texts = hf.batch_decode([[i] for i in range(len(hf))], skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)
        with _lock:
            texts = _texts.setdefault(hf, texts)
    return texts


def _run_on_tokens(hf: Any, texts: Sequence[str], end: str) -> tuple[Any, ...]:
    """For each ``k < len(end)``: the tokens that, after thinking text ending in
    ``end[:k]``, would finish ``end`` and carry on with non-whitespace text."""
    import numpy as np

    with _lock:
        cached = _run_on_cache.get(hf, {}).get(end)
    if cached is not None:
        return cached
    found: list[list[int]] = [[] for _ in end]
    last = end[-1]
    for token, text in enumerate(texts):
        if last not in text:  # every token that finishes ``end`` holds its last character
            continue
        for k in range(len(end)):
            joined = end[:k] + text
            at = joined.find(end)
            if at >= 0 and joined[at + len(end):].strip():
                found[k].append(token)
    run_ons = tuple(np.array(ids, dtype=np.int64) for ids in found)
    with _lock:
        return _run_on_cache.setdefault(hf, {}).setdefault(end, run_ons)
