"""``Grammar``: the output follows a context-free grammar (Lark syntax)."""

from __future__ import annotations

import attrs

from .base import ConstraintGrammar, GrammarConstraint

__all__ = ["Grammar"]


@attrs.frozen
class Grammar(GrammarConstraint):
    """The output is a sentence of ``grammar`` (Lark / EBNF, start rule ``start``)."""

    grammar: str

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.grammar, str) or not self.grammar.strip():
            raise ValueError("grammar: expected a non-empty grammar string")

    def as_grammar(self) -> ConstraintGrammar:
        return ConstraintGrammar(kind="lark", source=self.grammar)
