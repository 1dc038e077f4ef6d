"""``JSONSchema``: the output is a JSON value valid under a schema."""

from __future__ import annotations

import json
from typing import Any

import attrs

from ..errors import ConstraintError
from .base import Constraint, Matcher

__all__ = ["JSONSchema"]


def _to_schema_json(schema: Any) -> str:
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):  # pydantic v2 model
        schema = schema.model_json_schema()
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


@attrs.frozen
class JSONSchema(Constraint):
    """The output is JSON valid under ``schema`` (dict, JSON string or pydantic model class).

    The spec keeps the schema as compact JSON text (``schema_json``) so it is hashable; key
    order is kept, since properties are generated in the order the schema lists them.
    Generated JSON is on one line with ``", "`` and ``": "`` separators unless the schema's
    ``"x-guidance"`` options say otherwise (see ``docs/constraints.md``).
    """

    schema_json: str = attrs.field(converter=_to_schema_json)

    @property
    def schema(self) -> dict[str, Any]:
        return json.loads(self.schema_json)

    def compile(self, tokenizer: Any) -> Matcher:
        from ._llg import compile_spec

        return compile_spec(self, tokenizer)

    def matches_text(self, text: str) -> bool:
        from ._llg import text_matches

        return text_matches(self, text)

    def validate(self) -> None:
        from ._llg import validate_spec

        validate_spec(self)
