"""Pluggable output constraints: regex, JSON schema, grammar, choices, or your own.

A :class:`Constraint` is an immutable, hashable spec. ``constraint.compile(tokenizer)``
returns a per-request :class:`Matcher` that the engine asks for token masks and forced
(jump-forward) tokens. See ``docs/constraints.md``.
"""

from .base import Constraint as Constraint
from .base import ConstraintGrammar as ConstraintGrammar
from .base import GrammarConstraint as GrammarConstraint
from .base import Matcher as Matcher
from .base import pack_allowed_tokens as pack_allowed_tokens
from .choices import Choices as Choices
from .grammar import Grammar as Grammar
from .json_schema import JSONSchema as JSONSchema
from .limits import ConstraintLimits as ConstraintLimits
from .regex import Regex as Regex
from .thinking import ThinkingBudget as ThinkingBudget

__all__ = [
    "Choices", "Constraint", "ConstraintGrammar", "ConstraintLimits", "Grammar",
    "GrammarConstraint", "JSONSchema", "Matcher", "Regex", "ThinkingBudget",
    "pack_allowed_tokens",
]
