"""A corpus of JSON schemas with valid and invalid example documents, for the constraint tests.

Built by :func:`corpus` from about 40 *bases* — one keyword class each: what the grammar
engine enforces (types, bounds, patterns, the formats llguidance knows, ``$ref``, ``anyOf``,
disjoint ``oneOf``, ...) and what it cannot (``not``, overlapping ``oneOf``, ``dependencies``
/ ``dependentRequired`` / ``dependentSchemas``, ``uniqueItems``, ``if``/``then``/``else``,
``min/maxProperties`` with optional keys, ``contains``, ``propertyNames``,
``unevaluatedProperties``, formats only ``jsonschema`` checks, OpenAPI number formats, an
unknown format) — each put in six *wrappers* (bare, a required property, an optional one
beside another, an array item, two levels of nesting, ``anyOf`` with null), so every class
also appears nested. Each entry's examples are the base's, wrapped the same way.

Strings, arrays and objects are bounded (``maxLength``, ``maxItems``, closed objects), so a
tiny random model finishes a value in a few dozen tokens. Entries with ``generate=False``
(long strings) are for validation only.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import attrs

__all__ = ["Entry", "corpus"]

_S = {"type": "string", "maxLength": 8}


@attrs.frozen(kw_only=True)
class Entry:
    """One schema with documents valid and invalid under it (checked by the tests)."""

    name: str
    schema: dict[str, Any]
    valid: tuple[Any, ...]
    invalid: tuple[Any, ...]
    #: The keyword class (``enforced``, ``not``, ``oneOf``, ``format:color``, ...).
    keyword: str
    #: Whether ``JSONSchema(schema).validate()`` should raise (a format no one checks).
    rejected: bool = False
    generate: bool = True


def _obj(props: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict:
    return {"type": "object", "properties": props,
            "required": list(props) if required is None else required,
            "additionalProperties": False, **extra}


# (name, keyword class, schema, valid, invalid[, options])
_BASES: list[tuple[Any, ...]] = [
    # -- enforced while decoding --------------------------------------------------------
    ("string", "enforced", _S, ["", "abc", "héllo"], ["abcdefghi", 3]),
    ("string-bounds", "enforced", {"type": "string", "minLength": 2, "maxLength": 4},
     ["ab", "abcd"], ["a", "abcde"]),
    ("word-count", "enforced",
     {"type": "string", "pattern": "^(?:\\S+\\s+){0,4}\\S+$", "maxLength": 40},
     ["one", "a b c d e"], ["a b c d e f", "", " a"]),
    ("code-pattern", "enforced", {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{1,3}$"},
     ["AB-1", "ZZ-999"], ["ab-1", "AB-1000"]),
    ("integer", "enforced", {"type": "integer", "minimum": -5, "maximum": 40},
     [-5, 0, 40], [41, -6, 1.5]),
    ("number", "enforced", {"type": "number", "exclusiveMinimum": 0, "maximum": 2.5},
     [0.5, 2.5], [0, 3]),
    ("multiple-of", "enforced", {"type": "integer", "multipleOf": 5, "minimum": 0,
                                 "maximum": 100}, [0, 25], [7, 105]),
    ("enum", "enforced", {"enum": ["red", "green", 7, None]}, ["red", 7, None], ["blue", 8]),
    ("const", "enforced", {"const": "fixed"}, ["fixed"], ["other"]),
    ("boolean", "enforced", {"type": "boolean"}, [True, False], [0, "true"]),
    ("type-list", "enforced", {"type": ["integer", "null"], "maximum": 9}, [3, None],
     ["3", 10]),
    ("array", "enforced", {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                      "maximum": 9},
                           "minItems": 1, "maxItems": 3}, [[1], [1, 2, 3]], [[], [1, 2, 3, 4]]),
    ("prefix-items", "enforced", {"type": "array", "prefixItems": [{"type": "boolean"}, _S],
                                  "items": False, "minItems": 2},
     [[True, "x"]], [["x", True], [True]]),
    ("any-of", "enforced", {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, _S]},
     [3, "x"], [10, None]),
    ("all-of", "enforced", {"allOf": [_obj({"a": {"type": "integer", "minimum": 0,
                                                   "maximum": 9}}, []),
                                      {"required": ["a"]}]},
     [{"a": 1}], [{}, {"a": 10}]),
    ("one-of-disjoint", "enforced", {"oneOf": [{"type": "integer", "minimum": 0,
                                                "maximum": 9}, _S]},
     [3, "x"], [10, None]),
    ("ref", "enforced", {"$defs": {"p": _obj({"x": {"type": "integer", "minimum": 0,
                                                    "maximum": 9}})},
                         "$ref": "#/$defs/p"}, [{"x": 1}], [{"x": 10}, {}]),
    ("pattern-properties", "enforced",
     {"type": "object", "patternProperties": {"^n_[a-z]{1,3}$": {"type": "integer",
                                                                 "minimum": 0, "maximum": 9}},
      "additionalProperties": False, "maxProperties": 2},
     [{}, {"n_a": 1}], [{"n_a": 10}, {"x": 1}]),
    ("format-date", "enforced", {"type": "string", "format": "date"}, ["2024-02-29"],
     ["2024-13-01", "x"]),
    ("format-email", "enforced", {"type": "string", "format": "email", "maxLength": 16},
     ["a@b.io"], ["not-an-email"]),
    ("format-uuid", "enforced", {"type": "string", "format": "uuid"},
     ["123e4567-e89b-12d3-a456-426614174000"], ["123e4567"]),
    ("format-ipv4", "enforced", {"type": "string", "format": "ipv4"}, ["10.0.0.1"],
     ["10.0.0.300"]),
    ("format-date-time", "enforced", {"type": "string", "format": "date-time"},
     ["2024-01-02T03:04:05Z"], ["2024-01-02 03:04"]),
    # -- checked on the finished value -------------------------------------------------
    ("not", "not", {"type": "string", "maxLength": 4, "not": {"enum": ["", "a", "b"]}},
     ["ab", "xyz"], ["a", ""]),
    ("not-type", "not", {"type": ["integer", "string"], "maximum": 9, "maxLength": 3,
                         "not": {"type": "string"}}, [3], ["x"]),
    ("one-of-overlap", "oneOf", {"oneOf": [{"type": "integer", "minimum": 0, "maximum": 6},
                                           {"type": "integer", "minimum": 4, "maximum": 9}]},
     [1, 9], [5, 10]),
    ("one-of-objects", "oneOf", {"oneOf": [_obj({"a": {"type": "boolean"}}, []),
                                           _obj({"b": {"type": "boolean"}}, [])]},
     [{"a": True}, {"b": False}], [{}, {"c": 1}]),
    ("unique-items", "uniqueItems", {"type": "array", "items": {"enum": [1, 2, 3]},
                                     "maxItems": 3, "uniqueItems": True},
     [[], [1, 2]], [[1, 1], [3, 2, 3]]),
    ("dependent-required", "dependentRequired",
     {**_obj({"a": {"type": "boolean"}, "b": {"type": "boolean"}}, []),
      "dependentRequired": {"a": ["b"]}}, [{}, {"a": True, "b": False}, {"b": True}],
     [{"a": True}]),
    ("dependencies", "dependencies",
     {"$schema": "http://json-schema.org/draft-07/schema#",
      **_obj({"a": {"type": "boolean"}, "b": {"type": "boolean"}}, []),
      "dependencies": {"b": ["a"]}}, [{}, {"a": True, "b": True}], [{"b": False}]),
    ("dependent-schemas", "dependentSchemas",
     {**_obj({"a": {"type": "integer", "minimum": 0, "maximum": 9},
              "b": {"type": "integer", "minimum": 0, "maximum": 9}}, []),
      "dependentSchemas": {"a": {"properties": {"b": {"maximum": 4}}}}},
     [{"a": 1, "b": 3}, {"b": 8}], [{"a": 1, "b": 8}]),
    ("if-then-else", "if",
     {**_obj({"kind": {"enum": ["n", "s"]}, "v": {"type": ["integer", "string"],
                                                   "maximum": 9, "maxLength": 3}}),
      "if": {"properties": {"kind": {"const": "n"}}},
      "then": {"properties": {"v": {"type": "integer"}}},
      "else": {"properties": {"v": {"type": "string"}}}},
     [{"kind": "n", "v": 3}, {"kind": "s", "v": "x"}], [{"kind": "n", "v": "x"}]),
    ("min-properties", "minProperties",
     {**_obj({"a": {"type": "boolean"}, "b": {"type": "boolean"}, "c": {"type": "boolean"}},
             []), "minProperties": 2},
     [{"a": True, "c": True}, {"a": True, "b": True, "c": False}], [{}, {"b": True}]),
    ("max-properties", "maxProperties",
     {**_obj({"a": {"type": "boolean"}, "b": {"type": "boolean"}, "c": {"type": "boolean"}},
             []), "maxProperties": 2},
     [{}, {"a": True, "b": True}], [{"a": True, "b": True, "c": True}]),
    ("one-property", "enforced",
     {**_obj({"a": {"type": "boolean"}, "b": {"type": "boolean"}}, []), "minProperties": 1,
      "maxProperties": 1}, [{"a": True}, {"b": False}], [{}, {"a": True, "b": True}]),
    ("contains", "contains", {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                         "maximum": 3},
                              "maxItems": 4, "contains": {"const": 0}},
     [[0], [1, 0]], [[], [1, 2]]),
    ("min-contains", "contains", {"type": "array", "items": {"enum": [0, 1]}, "maxItems": 4,
                                  "contains": {"const": 1}, "minContains": 2},
     [[1, 1], [1, 0, 1]], [[1], [0, 0]]),
    ("property-names", "propertyNames",
     {"type": "object", "additionalProperties": {"type": "boolean"}, "maxProperties": 2,
      "propertyNames": {"pattern": "^[a-c]+$", "maxLength": 3}},
     [{}, {"ab": True}], [{"x": True}, {"abcd": False}]),
    ("unevaluated-properties", "unevaluatedProperties",
     {"type": "object", "allOf": [{"properties": {"a": {"type": "boolean"}}}],
      "properties": {"b": {"type": "boolean"}}, "maxProperties": 2,
      "unevaluatedProperties": False}, [{}, {"a": True, "b": True}], [{"c": True}]),
    ("format-uri-reference", "format:uri-reference",
     {"type": "string", "format": "uri-reference", "maxLength": 10},
     ["a/b", "#x"], ["a b"]),
    ("format-json-pointer", "format:json-pointer",
     {"type": "string", "format": "json-pointer", "maxLength": 8}, ["", "/a/b"], ["a"]),
    ("format-color", "format:color", {"type": "string", "format": "color", "maxLength": 8},
     ["red", "#aabbcc"], ["reddish"]),
    ("format-regex", "format:regex", {"type": "string", "format": "regex", "maxLength": 6},
     ["a+", "[0-9]"], ["(", "[a-"]),
    ("format-int32", "format:int32", {"type": "integer", "format": "int32"},
     [0, -2147483648], [2147483648]),
    ("format-uint8", "format:uint8", {"type": "integer", "format": "uint8"}, [0, 255],
     [256, -1]),
    # -- rejected with an error naming it ------------------------------------------------
    ("format-unknown", "format:unknown", {"type": "string", "format": "phone-number"},
     [], [], {"rejected": True}),
    # -- validation only (long strings) ---------------------------------------------------
    ("word-count-long", "enforced",
     {"type": "string", "pattern": "^(?:\\S+\\s+){0,99}\\S+$", "maxLength": 1000},
     ["The lab is near a bus stop and a train station.", " ".join(["w"] * 100)],
     [" ".join(["w"] * 101), "x" * 1001], {"generate": False}),
]


def _wrappers() -> Iterator[tuple[str, Callable[[dict], dict], Callable[[Any], list[Any]],
                                  Callable[[Any], list[Any]]]]:
    """(name, wrap schema, wrap a valid document, wrap an invalid document)."""
    yield "bare", lambda s: s, lambda d: [d], lambda d: [d]
    yield ("property", lambda s: _obj({"v": s}),
           lambda d: [{"v": d}], lambda d: [{"v": d}])
    yield ("optional", lambda s: _obj({"v": s, "w": {"type": "boolean"}}, ["w"]),
           lambda d: [{"v": d, "w": True}, {"w": False}], lambda d: [{"v": d, "w": True}])
    yield ("item", lambda s: {"type": "array", "items": s, "maxItems": 2},
           lambda d: [[d], []], lambda d: [[d]])
    yield ("nested", lambda s: _obj({"o": _obj({"i": s})}),
           lambda d: [{"o": {"i": d}}], lambda d: [{"o": {"i": d}}])
    yield ("or-null", lambda s: {"anyOf": [s, {"type": "null"}]},
           lambda d: [d, None], lambda d: [] if d is None else [d])


def corpus() -> list[Entry]:
    """Every base in every wrapper (about 280 entries), in a fixed order."""
    entries = []
    for name, keyword, schema, valid, invalid, *options in _BASES:
        opts = options[0] if options else {}
        schema = dict(schema)
        # $refs point from the root and $schema names the root's draft: keep them there.
        root = {key: schema.pop(key) for key in ("$schema", "$defs") if key in schema}
        for wname, wrap, wrap_valid, wrap_invalid in _wrappers():
            wrapped_invalid = tuple(d for bad in invalid for d in wrap_invalid(bad))
            wrapped = {**root, **json.loads(json.dumps(wrap(schema)))}
            entries.append(Entry(
                name=f"{name}/{wname}", schema=wrapped,
                valid=tuple(d for good in valid for d in wrap_valid(good)),
                invalid=wrapped_invalid, keyword=keyword, **opts))
    return entries
