"""A JSON schema split into what the grammar enforces while decoding and what is checked on
the finished value, and the ``jsonschema`` check itself.

The grammar engine (llguidance) compiles most of JSON Schema to a grammar, but some keywords
constrain a value as a whole and have no token-by-token form: ``not``, ``if``/``then``/
``else``, ``dependencies`` / ``dependentRequired`` / ``dependentSchemas``, ``uniqueItems``,
``contains``, ``propertyNames``, ``unevaluatedProperties`` / ``unevaluatedItems``,
``min/maxProperties`` on an object with optional properties, ``oneOf``'s exclusivity and the
``format`` names llguidance does not know. :func:`split_schema` removes them (the rest is the
*enforced* schema: every value valid under the whole schema is valid under it) and lists
where each was (:class:`Deferred`); the finished value is then checked against the **whole**
schema with ``jsonschema`` (:func:`schema_problem`), so the grammar's part and the checked
part can never disagree about what is valid.

Formats: those llguidance knows (:data:`GRAMMAR_FORMATS`) are enforced while decoding; the
others that ``jsonschema`` checks (with its ``format-nongpl`` extras: ``uri-reference``,
``iri``, ``json-pointer``, ``uri-template``, ``color``, ``idn-email``, ``regex``, ...) and the
OpenAPI number formats (``int32``, ``int64``, ``float``, ...) are checked after. A format no
one can check raises :class:`~aiolm.ConstraintError` naming it: it is never silently ignored.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
from typing import Any

import attrs

from ..errors import ConstraintError

__all__ = ["GRAMMAR_FORMATS", "Deferred", "SchemaSplit", "parse_json_value", "schema_problem",
           "split_schema", "text_problem"]

#: String formats llguidance enforces while decoding.
GRAMMAR_FORMATS = frozenset({"date-time", "time", "date", "duration", "email", "hostname",
                             "ipv4", "ipv6", "uuid", "uri"})

#: Keywords that assert something of a value as a whole (no grammar counterpart); removing
#: one from a schema can only let more values through.
_WHOLE_VALUE = ("not", "dependencies", "dependentRequired", "dependentSchemas", "contains",
                "minContains", "maxContains", "propertyNames", "unevaluatedProperties",
                "unevaluatedItems")

# Keywords whose value is one subschema, a list of them, or a name -> subschema map.
_ONE = ("additionalProperties", "additionalItems", "items")
_MANY = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_NAMED = ("properties", "patternProperties", "$defs", "definitions")

_INT_RANGES = {"int8": 8, "int16": 16, "int32": 32, "int64": 64}
_UINT_RANGES = {"uint8": 8, "uint16": 16, "uint32": 32, "uint64": 64}


@attrs.frozen
class Deferred:
    """A keyword of the schema checked on the finished value instead of while decoding.

    ``path`` is the JSON pointer of the subschema that holds it (``""``: the root).
    """

    keyword: str
    path: str

    def __str__(self) -> str:
        return f"{self.keyword} at {self.path or '/'}"


@attrs.frozen
class SchemaSplit:
    """What :func:`split_schema` found: the enforced schema (compact JSON text), the
    keywords left to the check after decoding, and where ``oneOf`` appears (llguidance
    enforces a ``oneOf`` itself when it can prove its branches disjoint)."""

    enforced_json: str
    deferred: tuple[Deferred, ...]
    one_of_paths: tuple[str, ...]


def _pointer(path: str, *parts: str | int) -> str:
    for part in parts:
        path += "/" + str(part).replace("~", "~0").replace("/", "~1")
    return path


class _Splitter:
    def __init__(self, *, property_counts: bool) -> None:
        self.property_counts = property_counts
        self.deferred: list[Deferred] = []
        self.one_of: list[str] = []
        self.unknown_formats: list[Deferred] = []

    def walk(self, node: Any, path: str) -> Any:
        if not isinstance(node, dict):
            return node  # a boolean schema (or a malformed one: llguidance names it)
        if node.get("not") in ({}, True):
            return False  # ``not`` anything: no value (llguidance knows false schemas)
        out: dict[str, Any] = {}
        optional = _has_optional_properties(node)
        for key, value in node.items():
            if key in _WHOLE_VALUE:
                self.deferred.append(Deferred(key, path))
            elif key == "if":
                if "then" in node or "else" in node:
                    self.deferred.append(Deferred("if", path))
            elif key in ("then", "else"):
                continue  # asserts nothing alone; with "if" it is recorded as "if"
            elif key == "uniqueItems":
                if value is not False:
                    self.deferred.append(Deferred(key, path))
            elif key in ("minProperties", "maxProperties") and optional and self.property_counts:
                if not (key == "minProperties" and value == 0):
                    self.deferred.append(Deferred(key, path))
            elif key == "format" and isinstance(value, str) and value not in GRAMMAR_FORMATS:
                (self.deferred if value in _format_checker().checkers
                 else self.unknown_formats).append(Deferred(f"format {value!r}", path))
            elif key in _NAMED and isinstance(value, dict):
                out[key] = {name: self.walk(sub, _pointer(path, key, name))
                            for name, sub in value.items()}
            elif key in _MANY and isinstance(value, list):
                if key == "oneOf":
                    self.one_of.append(path)
                out[key] = [self.walk(sub, _pointer(path, key, i)) for i, sub in enumerate(value)]
            elif key in _ONE:
                out[key] = self.walk(value, _pointer(path, key))
            else:
                out[key] = value
        return out


def _has_optional_properties(node: dict[str, Any]) -> bool:
    props = node.get("properties")
    required = node.get("required")
    if not isinstance(props, dict) or not props:
        return False
    return not isinstance(required, list) or not set(props) <= set(required)


@functools.lru_cache(maxsize=1024)
def split_schema(schema_json: str, *, property_counts: bool = False) -> SchemaSplit:
    """Split the schema ``schema_json`` (see the module docstring); ``property_counts``
    also leaves ``min/maxProperties`` of objects with optional properties to the check
    (llguidance enforces some of them: the caller tries without first). Raises
    :class:`~aiolm.ConstraintError` naming a ``format`` that no one can check."""
    splitter = _Splitter(property_counts=property_counts)
    enforced = splitter.walk(json.loads(schema_json), "")
    if enforced is False:
        raise ConstraintError("json_schema: unsatisfiable: no JSON value is valid under the "
                              "schema (it is false, or 'not' of anything)")
    if splitter.unknown_formats:
        where = ", ".join(str(d) for d in splitter.unknown_formats)
        raise ConstraintError(
            f"json_schema: unknown format ({where}): neither the grammar engine nor "
            f"jsonschema checks it; remove it or describe the strings with 'pattern'")
    return SchemaSplit(
        enforced_json=json.dumps(enforced, separators=(",", ":"), ensure_ascii=False),
        deferred=tuple(splitter.deferred), one_of_paths=tuple(splitter.one_of))


# ------------------------------------------------------------------------ the check


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json_value(text: str) -> Any:
    """The JSON value of ``text`` (surrounding whitespace allowed). Raises ``ValueError``
    for text that is not one JSON value (``NaN`` and ``Infinity`` are not JSON)."""
    return json.loads(text, parse_constant=_reject_constant)


@functools.cache
def _format_checker() -> Any:
    """``jsonschema``'s format checker with the OpenAPI formats added."""
    import jsonschema

    checker = jsonschema.FormatChecker()
    for name, bits in _INT_RANGES.items():
        low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        checker.checks(name)(functools.partial(_int_in, low=low, high=high))
    for name, bits in _UINT_RANGES.items():
        checker.checks(name)(functools.partial(_int_in, low=0, high=(1 << bits) - 1))
    for name in ("float", "double"):
        checker.checks(name)(_finite)
    checker.checks("byte")(_base64)
    return checker


def _int_in(value: Any, *, low: int, high: int) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return True  # a format asserts nothing of other types
    return float(value).is_integer() and low <= value <= high


def _finite(value: Any) -> bool:
    return isinstance(value, bool) or not isinstance(value, float) or math.isfinite(value)


def _base64(value: Any) -> bool:
    if not isinstance(value, str):
        return True
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


@functools.lru_cache(maxsize=1024)
def _validator(schema_json: str) -> Any:
    """A ``jsonschema`` validator of the schema's own draft (2020-12 when it names none),
    with format checks. Raises :class:`~aiolm.ConstraintError` for a malformed schema."""
    import jsonschema

    schema = json.loads(schema_json)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/" + "/".join(str(p) for p in exc.absolute_path)
        raise ConstraintError(f"json_schema: invalid schema at {where}: {exc.message}") from None
    return cls(schema, format_checker=_format_checker())


def schema_problem(schema_json: str, value: Any) -> str | None:
    """Why ``value`` is not valid under the schema (naming the keyword, the value's path and
    the schema's), or None when it is valid."""
    import jsonschema
    import referencing.exceptions

    try:
        error = jsonschema.exceptions.best_match(_validator(schema_json).iter_errors(value))
    except referencing.exceptions.Unresolvable as exc:
        raise ConstraintError(f"json_schema: a $ref cannot be resolved: {exc}") from None
    if error is None:
        return None
    at = _pointer("", *error.absolute_path) or "/"
    rule = _pointer("", *error.absolute_schema_path) or "/"
    message = error.message if len(error.message) <= 200 else error.message[:200] + "..."
    return f"{error.validator!r} fails at {at} (schema {rule}): {message}"


def text_problem(schema_json: str, text: str) -> str | None:
    """Why ``text`` is not a JSON value valid under the schema, or None when it is."""
    try:
        value = parse_json_value(text)
    except ValueError as exc:
        return f"not a JSON value: {exc}"
    return schema_problem(schema_json, value)
