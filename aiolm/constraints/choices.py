"""``Choices``: the output is exactly one of a list of strings."""

from __future__ import annotations

from typing import Any

import attrs

from .base import ConstraintGrammar, GrammarConstraint

__all__ = ["Choices"]


def _to_choices(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        raise TypeError("choices: expected a list of strings, got a single str")
    items = tuple(value)
    if not items:
        raise ValueError("choices: must not be empty")
    for c in items:
        if not isinstance(c, str) or not c:
            raise ValueError(f"choices: expected non-empty strings, got {c!r}")
    return items


@attrs.frozen
class Choices(GrammarConstraint):
    """The output is exactly one of ``choices`` (generated, not scored: see ``select``)."""

    choices: tuple[str, ...] = attrs.field(converter=_to_choices)

    def as_grammar(self) -> ConstraintGrammar:
        return ConstraintGrammar(kind="choices", source=self.choices)

    def matches_text(self, text: str) -> bool:
        return text in self.choices
