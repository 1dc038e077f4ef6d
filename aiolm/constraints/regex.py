"""``Regex``: the output must fully match a regular expression."""

from __future__ import annotations

import attrs
import regex as _re

from ..errors import ConstraintError
from .base import ConstraintGrammar, GrammarConstraint

__all__ = ["Regex"]


@attrs.frozen
class Regex(GrammarConstraint):
    """The whole output matches ``pattern`` (Python ``regex`` syntax, implicitly anchored)."""

    pattern: str

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.pattern, str):
            raise TypeError(f"regex: expected a str, got {type(self.pattern).__name__}")
        try:
            _re.compile(self.pattern)
        except _re.error as exc:
            raise ConstraintError(f"regex: {self.pattern!r} does not compile: {exc}") from None

    def as_grammar(self) -> ConstraintGrammar:
        return ConstraintGrammar(kind="regex", source=self.pattern)

    def matches_text(self, text: str) -> bool:
        """``regex.fullmatch(pattern, text)``: the full regex, whatever decoding can express."""
        return _re.fullmatch(self.pattern, text) is not None

    def validate(self) -> None:
        """Raise ``ConstraintError`` if the pattern uses what constrained decoding cannot
        express (lookarounds, backreferences, word boundaries, ...), naming it."""
        super().validate()
