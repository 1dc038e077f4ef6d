"""``Grammar``: the output follows a context-free grammar (Lark syntax)."""

from __future__ import annotations

from typing import Any

import attrs

from .base import Constraint, Matcher

__all__ = ["Grammar"]


@attrs.frozen
class Grammar(Constraint):
    """The output is a sentence of ``grammar`` (Lark / EBNF, start rule ``start``)."""

    grammar: str

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.grammar, str) or not self.grammar.strip():
            raise ValueError("grammar: expected a non-empty grammar string")

    def compile(self, tokenizer: Any) -> Matcher:
        from ._llg import compile_spec

        return compile_spec(self, tokenizer)

    def matches_text(self, text: str) -> bool:
        from ._llg import text_matches

        return text_matches(self, text)

    def validate(self) -> None:
        from ._llg import validate_spec

        validate_spec(self)
