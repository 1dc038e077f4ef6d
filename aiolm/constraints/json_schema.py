"""``JSONSchema``: the output is a JSON value valid under a schema."""

from __future__ import annotations

import json
from typing import Any

import attrs

from ..errors import ConstraintError
from .base import Constraint, Matcher

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


@attrs.frozen
class JSONSchema(Constraint):
    """The output is JSON valid under ``schema`` (dict, JSON string or pydantic model class).

    A pydantic model's objects are closed (no keys beyond its fields) unless the model
    says ``model_config = ConfigDict(extra="allow")``: see :func:`pydantic_schema`.

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
