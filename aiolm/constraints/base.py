"""The constraint protocol: an immutable spec (:class:`Constraint`) and its per-request
state machine (:class:`Matcher`).

A user's own constraint subclasses :class:`Constraint` (frozen and hashable, so compiled
forms can be cached by spec) and returns its own :class:`Matcher` from ``compile``. The
built-in constraints are :class:`GrammarConstraint` subclasses: each is one grammar
(:meth:`Constraint.as_grammar`), and everything else (compiling, checking, sending it to an
API) dispatches on that grammar.
"""

from __future__ import annotations

import abc
from typing import Any, Literal

import attrs

from .limits import ConstraintLimits

__all__ = ["Constraint", "ConstraintGrammar", "GrammarConstraint", "Matcher",
           "pack_allowed_tokens"]

GrammarKind = Literal["regex", "choices", "lark", "json_schema"]


@attrs.frozen(kw_only=True)
class ConstraintGrammar:
    """The grammar a built-in constraint stands for: ``kind`` and its ``source``.

    ``regex``: a pattern in Python syntax (the whole output matches it); ``choices``: a
    tuple of strings (the output is one of them); ``lark``: a Lark (or GBNF) grammar text;
    ``json_schema``: a schema as compact JSON text (the output is one valid JSON value).
    """

    kind: GrammarKind
    source: str | tuple[str, ...]


class Matcher(abc.ABC):
    """Per-request constraint state, advanced one sampled token at a time.

    The engine calls, for each decode step of a constrained request:
    ``fill_next_token_mask(row)`` (before sampling), then ``advance(token)``, then
    ``jump_forward()``; when that returns two or more tokens, it appends them all and
    computes them in one forward pass (jump-forward), advancing the matcher through each.
    Once ``is_finished()`` the request ends. Matchers are used by one thread at a time (the
    engine loop) and need no locking.

    A minimal matcher implements the four abstract methods; ``forced_tokens`` may always
    return ``[]`` (no jump-forward). The engine never calls ``fork`` or ``rollback`` (its
    jump-forward goes through :meth:`jump_forward`); they are there for your own tools, and
    by default raise ``NotImplementedError``.

    The engine fills the masks of a whole batch together: a row whose :meth:`only_token`
    names a token is a one-bit write, a row whose :meth:`llguidance_mask` gives an
    llguidance matcher is computed in llguidance's thread pool with the GIL released (with
    the other such rows), and any other row calls :meth:`fill_next_token_mask`.
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

    def fork(self) -> Matcher:
        """An independent copy in the same state. The engine never calls it; the default
        raises ``NotImplementedError``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement fork()")

    def rollback(self, n: int) -> None:
        """Undo the last ``n`` advanced tokens. The engine never calls it; the default
        accepts ``n == 0`` and raises ``NotImplementedError`` otherwise."""
        if n != 0:
            raise NotImplementedError(f"{type(self).__name__} does not implement rollback()")

    def error(self) -> str:
        """Why the last :meth:`advance` refused its token, or why the matcher can go no
        further (the grammar engine's own message); empty when nothing went wrong. The
        engine puts it in the ``ConstraintError`` that ends the request."""
        return ""

    def only_token(self) -> int | None:
        """The one token the next mask admits, when the matcher knows it without computing
        the mask (a forced token); None otherwise (the default)."""
        return None

    def llguidance_mask(self, words: int) -> Any | None:
        """An ``llguidance.LLMatcher`` whose next mask, in rows of ``words`` int32 words, is
        exactly this matcher's, so the engine computes it with the batch's other llguidance
        rows in llguidance's thread pool; None (the default) to be asked for
        :meth:`fill_next_token_mask` instead. The engine only reads the returned matcher.

        When llguidance's tokenizer has fewer tokens than the model has logits (its mask is
        ``width < words`` words), return ``(matcher, width)``: the engine computes the
        ``width`` words and disallows the tokens past them."""
        return None

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

    #: How many outputs a program generates for one ``gen`` whose output fails
    #: :meth:`check_output` (or whose backend rejects it) before it raises ``ConstraintError``.
    attempts: int = 1

    def as_grammar(self) -> ConstraintGrammar | None:
        """The grammar this constraint stands for, or None (the default) for a constraint
        with its own matcher. Backends that send constraints elsewhere (an API's
        ``response_format``) read it; a constraint without one is enforced only in process."""
        return None

    def compile_for(self, tokenizer: Any, limits: ConstraintLimits) -> Matcher:
        """:meth:`compile` under the engine's grammar-engine ``limits`` (what the engine
        calls). The default ignores the limits: ``compile(tokenizer)``."""
        return self.compile(tokenizer)

    def checked_after(self) -> tuple[object, ...]:
        """The parts of the rule checked on the finished output rather than while decoding
        (each prints as ``keyword at path``); empty (the default) when the matcher enforces
        everything. A program regenerates an output that fails them."""
        return ()

    def check_output(self, text: str) -> str | None:
        """Why ``text``, a complete output that the matcher let through, still does not
        satisfy the constraint, or None. Non-None only for constraints that check part of
        their rule after decoding (a JSON schema's ``uniqueItems``, ...); a program then
        generates again, up to :attr:`attempts` outputs. The default: None."""
        return None


class GrammarConstraint(Constraint):
    """A constraint that is one grammar for llguidance (:meth:`as_grammar`): compiling,
    validating and the default text check all come from it."""

    @abc.abstractmethod
    def as_grammar(self) -> ConstraintGrammar:
        """The grammar (see :class:`ConstraintGrammar`)."""

    def compile(self, tokenizer: Any) -> Matcher:
        return self.compile_for(tokenizer, ConstraintLimits())

    def compile_for(self, tokenizer: Any, limits: ConstraintLimits) -> Matcher:
        """A fresh llguidance matcher for one request (never shared with another)."""
        from ._llg import compile_spec

        return compile_spec(self, tokenizer, limits)

    def matches_text(self, text: str) -> bool:
        from ._llg import text_matches

        return text_matches(self, text)

    def validate(self) -> None:
        from ._llg import validate_spec

        validate_spec(self)


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
