"""``JSONSchema``: the output is a JSON value valid under a schema."""

from __future__ import annotations

import json
from typing import Any

import attrs

from ..errors import ConstraintError
from ._schema_split import Deferred, split_schema, text_problem
from .base import ConstraintGrammar, GrammarConstraint, Matcher
from .limits import ConstraintLimits

__all__ = ["JSONSchema", "pydantic_schema"]


def pydantic_schema(model: type) -> dict[str, Any]:
    """The JSON schema of pydantic model class ``model``, closed: an object of a model that
    does not say ``extra="allow"`` takes no keys beyond its fields.

    pydantic's own schema leaves such objects open (its default ``extra="ignore"`` drops
    unknown keys when validating), so a model would be free to invent keys until
    ``max_tokens``; ``additionalProperties: false`` is added to every object schema with
    ``properties`` that does not set it (``extra="allow"`` models and ``dict`` fields set it).
    """
    schema = model.model_json_schema()
    stack: list[Any] = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return schema


def _to_schema_json(schema: Any) -> str:
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):  # pydantic v2 model
        schema = pydantic_schema(schema)
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise ConstraintError(f"json_schema: not valid JSON: {exc}") from None
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise ConstraintError(
            f"json_schema: expected a dict, a JSON string or a pydantic model class, "
            f"got {type(schema).__name__}"
        )
    try:  # key order is kept: properties are generated in the schema's order
        return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ConstraintError(f"json_schema: cannot be serialized: {exc}") from None


_MODES = ("validate", "error")


def _check_attempts(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 20:
        raise ValueError(f"json_schema: attempts must be an int from 1 to 20, got {value!r}")


@attrs.frozen
class JSONSchema(GrammarConstraint):
    """The output is JSON valid under ``schema`` (dict, JSON string or pydantic model class).

    A pydantic model's objects are closed (no keys beyond its fields) unless the model
    says ``model_config = ConfigDict(extra="allow")``: see :func:`pydantic_schema`.

    The spec keeps the schema as compact JSON text (``schema_json``) so it is hashable; key
    order is kept, since properties are generated in the order the schema lists them.
    Generated JSON is on one line with ``", "`` and ``": "`` separators unless the schema's
    ``"x-guidance"`` options say otherwise (see ``docs/constraints.md``).

    Keywords the grammar engine cannot enforce token by token (``not``, ``if``/``then``/
    ``else``, ``uniqueItems``, ``dependentRequired``, ``oneOf``'s exclusivity, formats it does
    not know, ...: :meth:`checked_after`) are handled by ``unenforceable``: ``"validate"``
    (the default) enforces the rest while decoding and checks the finished value against
    the whole schema with ``jsonschema``; a program generates a value that fails again, up
    to ``attempts`` values, then raises ``ConstraintError`` naming the keyword and the path.
    ``"error"``: :meth:`validate` raises ``ConstraintError`` naming them, before any token.
    """

    schema_json: str = attrs.field(converter=_to_schema_json)
    unenforceable: str = attrs.field(default="validate", kw_only=True)
    attempts: int = attrs.field(default=3, kw_only=True, validator=_check_attempts)

    @unenforceable.validator
    def _check_mode(self, attribute: attrs.Attribute, value: Any) -> None:
        if value not in _MODES:
            raise ValueError(f"json_schema: unenforceable must be 'validate' or 'error', "
                             f"got {value!r}")

    @property
    def schema(self) -> dict[str, Any]:
        return json.loads(self.schema_json)

    def as_grammar(self) -> ConstraintGrammar:
        return ConstraintGrammar(kind="json_schema", source=self.schema_json)

    def checked_after(self) -> tuple[Deferred, ...]:
        """The keywords checked on the finished value instead of while decoding, with the
        paths of the subschemas that hold them (empty when the grammar enforces it all).
        Raises ``ConstraintError`` for a schema the grammar engine rejects."""
        from ._llg import json_plan

        return json_plan(self.schema_json).deferred

    def validate(self) -> None:
        """Raise ``ConstraintError`` for a schema the engine cannot use, naming the problem;
        with ``unenforceable="error"``, also for keywords it would check after decoding."""
        super().validate()
        deferred = self.checked_after()
        if deferred and self.unenforceable == "error":
            where = ", ".join(str(d) for d in deferred)
            raise ConstraintError(
                f"json_schema: not enforceable while decoding: {where} (with "
                f"unenforceable='validate' they are checked on the finished value)")

    def compile_for(self, tokenizer: Any, limits: ConstraintLimits) -> Matcher:
        """A fresh matcher for one request; with keywords checked after decoding, it refuses
        to end on a value that fails them (its error names the keyword and the path).
        Raises ``ConstraintError`` as :meth:`validate` does."""
        from ._llg import compile_spec

        self.validate()
        return compile_spec(self, tokenizer, limits,
                            check=self.check_output if self.checked_after() else None)

    def matches_text(self, text: str) -> bool:
        """True when ``text`` (any JSON layout, surrounding whitespace allowed) is a JSON
        value valid under the whole schema, checked by ``jsonschema`` with formats."""
        return self.problem(text) is None

    def check_output(self, text: str) -> str | None:
        if not self.checked_after():
            return None
        return self.problem(text)

    def problem(self, text: str) -> str | None:
        """Why ``text`` is not a JSON value valid under the schema (the keyword, the value's
        path and the schema's), or None when it is. Raises ``ConstraintError`` for a schema
        that is itself invalid or has a format no one can check."""
        split_schema(self.schema_json)  # a format no one checks is an error, never ignored
        return text_problem(self.schema_json, text)
