"""``ConstraintLimits``: how much work the grammar engine (llguidance) may do for a request.

llguidance bounds the work of each grammar so that no schema can stall the engine: the fuel
its lexer may spend building regular-expression states (at the start and at each token),
the Earley items per token, the lexer states kept, the grammar's size. Its defaults are
tight for real-world schemas: a string property with a word-count pattern and a large
``maxLength`` (``"^(?:\\S+\\s+){0,99}\\S+$"``, ``maxLength: 1000``) spends about 210,000
units of lexer fuel on its first mask, past llguidance's 200,000 per token, and fails with
``lexer error: too many expressions constructed``. aiolm's defaults allow ten times that per
token (about 15 ms of lexer work at worst, once: the states are kept for the rest of the
request) and keep llguidance's other limits.

A matcher that hits a limit is dropped with its request (``ConstraintError`` carrying
llguidance's message); compiled grammars are never shared between requests, so one that
hits a limit affects nothing else.
"""

from __future__ import annotations

from typing import Any

import attrs

__all__ = ["ConstraintLimits"]


def _positive(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"constraint_limits: {attribute.name} must be a positive int, "
                         f"got {value!r}")


@attrs.frozen(kw_only=True)
class ConstraintLimits:
    """Resource limits of one compiled constraint (llguidance's ``LLParserLimits``).

    ``step_lexer_fuel``: lexer work per token (about 14,000 units per millisecond);
    ``initial_lexer_fuel``: lexer work when the grammar is built; ``step_max_items``: Earley
    items per token; ``max_items_in_row``: the branching of one grammar row;
    ``max_lexer_states``: lexer states kept (1-2 kB each); ``max_grammar_size``: symbols in
    the grammar's productions. ``precompute_large_lexemes`` runs large regular expressions
    over the whole vocabulary when the grammar is built (slower to build, faster masks).
    Raises ``ValueError`` for a limit that is not a positive int.
    """

    step_lexer_fuel: int = attrs.field(default=2_000_000, validator=_positive)
    initial_lexer_fuel: int = attrs.field(default=2_000_000, validator=_positive)
    step_max_items: int = attrs.field(default=100_000, validator=_positive)
    max_items_in_row: int = attrs.field(default=2_000, validator=_positive)
    max_lexer_states: int = attrs.field(default=250_000, validator=_positive)
    max_grammar_size: int = attrs.field(default=500_000, validator=_positive)
    precompute_large_lexemes: bool = attrs.field(
        default=True, validator=attrs.validators.instance_of(bool))

    def to_llguidance(self) -> Any:
        """These limits as an ``llguidance.LLParserLimits``."""
        import llguidance

        # The fields are named as llguidance's own keyword arguments.
        return llguidance.LLParserLimits(**attrs.asdict(self), verbose_errors=True)
