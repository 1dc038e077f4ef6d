"""The constraint protocol: an immutable spec (:class:`Constraint`) and its per-request
state machine (:class:`Matcher`).

A user's own constraint subclasses :class:`Constraint` (frozen and hashable, so compiled
forms can be cached by spec) and returns its own :class:`Matcher` from ``compile``.
"""

from __future__ import annotations

import abc
from typing import Any

__all__ = ["Constraint", "Matcher", "pack_allowed_tokens"]


class Matcher(abc.ABC):
    """Per-request constraint state, advanced one sampled token at a time.

    The engine calls, for each decode step of a constrained request:
    ``fill_next_token_mask(row)`` (before sampling), then ``advance(token)``, then
    ``jump_forward()``; when that returns two or more tokens, it appends them all and
    computes them in one forward pass (jump-forward), advancing the matcher through each.
    Once ``is_finished()`` the request ends. Matchers are used by one thread at a time (the
    engine loop) and need no locking.

    A minimal matcher implements the six abstract methods; ``forced_tokens`` may always
    return ``[]`` (no jump-forward) and ``accepts_eos``/``jump_forward`` have defaults.
    """

    @abc.abstractmethod
    def fill_next_token_mask(self, bitmask_row: Any) -> None:
        """Write the allowed next tokens into ``bitmask_row``.

        ``bitmask_row`` is a 1-D int32 tensor (or numpy array) of ``ceil(vocab / 32)`` words;
        bit ``t % 32`` of word ``t // 32`` set means token ``t`` is allowed. Mutates only the row.
        """

    @abc.abstractmethod
    def advance(self, token_id: int) -> bool:
        """Consume one token. Returns False (and changes nothing) if it was not allowed."""

    @abc.abstractmethod
    def forced_tokens(self) -> list[int]:
        """The tokens the constraint forces next (empty when more than one path is open).

        These are the canonical tokenization of the forced text, so appending them gives the
        same text step-by-step decoding would.
        """

    @abc.abstractmethod
    def is_finished(self) -> bool:
        """True once the output is complete (only EOS / stopping is allowed)."""

    @abc.abstractmethod
    def fork(self) -> Matcher:
        """An independent copy in the same state (for forked branches)."""

    @abc.abstractmethod
    def rollback(self, n: int) -> None:
        """Undo the last ``n`` advanced tokens."""

    def accepts_eos(self) -> bool:
        """True when the output may end here (the default: when it is finished)."""
        return self.is_finished()

    def jump_forward(self) -> tuple[int, list[int]]:
        """What to do after a sampled token was advanced: ``(rollback, tokens)``.

        The engine drops the last ``rollback`` output tokens (this matcher has already
        undone them), then may append ``tokens`` in order, advancing the matcher through each
        one it appends (it appends at least ``rollback`` of them). ``rollback`` is 1 when the
        sampled token followed by the forced text tokenizes differently (canonical tokens at
        the boundary), else 0. The default is ``(0, self.forced_tokens())``.
        """
        return 0, self.forced_tokens()


class Constraint(abc.ABC):
    """An immutable, hashable description of the allowed outputs.

    Subclasses must be hashable and compare by value (``attrs.frozen`` does both): the
    engine caches compiled forms by spec.
    """

    @abc.abstractmethod
    def compile(self, tokenizer: Any) -> Matcher:
        """Return a fresh matcher for one request.

        ``tokenizer`` is the engine's :class:`aiolm.engine.tokenizer.Tokenizer`. Raises
        :class:`aiolm.ConstraintError` when the spec is invalid or unsupported, before any
        token is generated.
        """

    @abc.abstractmethod
    def matches_text(self, text: str) -> bool:
        """True when ``text`` is a complete output this constraint allows.

        Used by backends that cannot constrain decoding token by token (the scripted and
        OpenAI backends) to check an answer instead.
        """

    def validate(self) -> None:
        """Check the spec fully (may be costly); raise ``ConstraintError`` if it is invalid.

        Called when a program submits the constraint, before generation starts. The
        default accepts: a spec valid by construction needs no further check.
        """
        return None


def pack_allowed_tokens(allowed: Any, bitmask_row: Any) -> None:
    """Write a boolean vector of allowed token ids into a bitmask row, in place.

    ``allowed`` is a 1-D bool array or tensor (``allowed[t]`` true: token ``t`` may come
    next; ids past its end are disallowed). ``bitmask_row`` is the row given to
    :meth:`Matcher.fill_next_token_mask`. Raises ``ValueError`` when ``allowed`` is longer
    than the row holds. A helper for writing your own matcher.
    """
    import numpy as np

    if hasattr(allowed, "detach"):  # a torch tensor
        allowed = allowed.detach().cpu().numpy()
    flags = np.asarray(allowed, dtype=bool).ravel()
    target = bitmask_row.numpy() if hasattr(bitmask_row, "numpy") else bitmask_row
    bits = target.shape[0] * 32
    if flags.size > bits:
        raise ValueError(f"allowed: {flags.size} tokens do not fit a row of {bits} bits")
    padded = np.zeros(bits, dtype=bool)
    padded[: flags.size] = flags
    target[:] = np.packbits(padded, bitorder="little").view("<i4")
