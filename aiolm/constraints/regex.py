"""``Regex``: the output must fully match a regular expression."""

from __future__ import annotations

from typing import Any

import attrs
import regex as _re

from ..errors import ConstraintError
from .base import Constraint, Matcher

__all__ = ["Regex"]


@attrs.frozen
class Regex(Constraint):
    """The whole output matches ``pattern`` (Python ``regex`` syntax, implicitly anchored)."""

    pattern: str

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.pattern, str):
            raise TypeError(f"regex: expected a str, got {type(self.pattern).__name__}")
        try:
            _re.compile(self.pattern)
        except _re.error as exc:
            raise ConstraintError(f"regex: {self.pattern!r} does not compile: {exc}") from None

    def compile(self, tokenizer: Any) -> Matcher:
        from ._llg import compile_spec

        return compile_spec(self, tokenizer)

    def matches_text(self, text: str) -> bool:
        return _re.fullmatch(self.pattern, text) is not None

    def validate(self) -> None:
        """Raise ``ConstraintError`` if the pattern uses what constrained decoding cannot
        express (lookarounds, backreferences, word boundaries, ...), naming it."""
        from ._llg import validate_spec

        validate_spec(self)
