"""parse_partial_json: the value of every prefix of a JSON document, and the texts that can
be the beginning of none."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiolm.tools.partial_json import parse_partial_json

DOCUMENTS = [
    '{"name": "Ada Lovelace", "age": 36, "languages": ["en", "fr"], "alive": false}',
    '[1, -2.5e-3, 0, true, false, null, "x", [], {}, [[]], {"a": {"b": [1, {"c": null}]}}]',
    '{"escapes": "tab\\t quote\\" slash\\/ back\\\\ nl\\n uni\\u00e9 pair\\ud83d\\ude00 end"}',
    '{\n  "nested": {\n    "list": [\n      1,\n      2\n    ],\n    "empty": ""\n  }\n}',
    '{"a": 1, "a": 2, "b": [true, null, 1e10, 0.5, -0]}',
    '"just a string"',
    '[]',
    '{}',
    '  {"spaced" :  [ 1 , 2 ]  }  ',
    '{"unicode": "日本語 ✓", "emoji": "🙂"}',
]


def consistent(partial: Any, final: Any, *, top: bool = True) -> bool:
    """Whether ``partial`` is what a prefix of ``final``'s text may say: strings cut short,
    containers missing their later entries, every earlier entry whole."""
    if top and partial is None:
        return True   # nothing determined yet
    if isinstance(final, str):
        return isinstance(partial, str) and final.startswith(partial)
    if isinstance(final, list):
        if not isinstance(partial, list) or len(partial) > len(final):
            return False
        whole = all(p == f for p, f in zip(partial[:-1], final, strict=False))
        return whole and all(consistent(p, f, top=False) for p, f in zip(partial, final, strict=False))
    if isinstance(final, dict):
        if not isinstance(partial, dict) or list(partial) != list(final)[:len(partial)]:
            return False
        keys = list(partial)
        whole = all(partial[k] == final[k] for k in keys[:-1])
        return whole and all(consistent(partial[k], final[k], top=False) for k in keys)
    return type(partial) is type(final) and partial == final


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    return dict(pairs)


@pytest.mark.parametrize("doc", DOCUMENTS)
def test_every_prefix_of_a_document_gives_a_consistent_value(doc):
    final = json.loads(doc)
    previous: Any = None
    for end in range(len(doc) + 1):
        value = parse_partial_json(doc[:end])
        if '"a": 1, "a": 2' not in doc:   # duplicate keys: the later value replaces
            assert consistent(value, final), (doc[:end], value)
            assert previous is None or consistent(previous, value), (doc[:end], previous, value)
        previous = value
    assert parse_partial_json(doc) == final


@pytest.mark.parametrize("doc", DOCUMENTS)
def test_every_prefix_equals_json_loads_of_its_completion(doc):
    # A prefix closed by hand where that is easy (ends after a whole value) parses the same.
    for end in range(1, len(doc) + 1):
        prefix = doc[:end]
        try:
            whole = json.loads(prefix)
        except ValueError:
            continue
        if isinstance(whole, int | float) and not isinstance(whole, bool) and end == len(prefix.rstrip()):
            assert parse_partial_json(prefix) is None        # the number may go on
            assert parse_partial_json(prefix + " ") == whole
        else:
            assert parse_partial_json(prefix) == whole


@pytest.mark.parametrize(("text", "value"), [
    ("", None),
    ("   \n", None),
    ("{", {}),
    ('{"', {}),
    ('{"name', {}),
    ('{"name"', {}),
    ('{"name":', {}),
    ('{"name": ', {}),
    ('{"name": "', {"name": ""}),
    ('{"name": "Al', {"name": "Al"}),
    ('{"name": "Al\\', {"name": "Al"}),
    ('{"name": "Al\\u00', {"name": "Al"}),
    ('{"name": "Al\\u00e9', {"name": "Alé"}),
    ('{"name": "\\ud83d', {"name": ""}),
    ('{"name": "\\ud83d\\ude00', {"name": "😀"}),
    ('{"name": "\\\\ud83d', {"name": "\\ud83d"}),
    ('{"name": "Al"', {"name": "Al"}),
    ('{"name": "Al",', {"name": "Al"}),
    ('{"name": "Al", "age": 3', {"name": "Al"}),
    ('{"name": "Al", "age": 36}', {"name": "Al", "age": 36}),
    ('{"ok": tr', {}),
    ('{"ok": true', {"ok": True}),
    ('{"ok": nul', {}),
    ('{"ok": null', {"ok": None}),
    ('{"x": -', {}),
    ('{"x": 1.', {}),
    ('{"x": 1e', {}),
    ('{"x": 1e+', {}),
    ('{"x": 1e+5', {}),
    ('{"x": 1e+5 ', {"x": 1e5}),
    ('{"list": [', {"list": []}),
    ('{"list": [1, 2', {"list": [1]}),
    ('{"list": [1, 2,', {"list": [1, 2]}),
    ('{"list": [{"a": "b', {"list": [{"a": "b"}]}),
    ('[[[[', [[[[]]]]),
    ('"open', "open"),
    ("12", None),
    ("12 ", 12),
    ("-0.5 ", -0.5),
    ("tru", None),
    ("true", True),
    ("false ", False),
])
def test_known_prefixes(text, value):
    result = parse_partial_json(text)
    assert result == value and type(result) is type(value)


@pytest.mark.parametrize("text", [
    "x", "{1", "{'a': 1}", '{"a" 1', '{"a": 1 "b"', "[1,]", '{"a": 1,}', "[1 2]", "[,", "{,",
    '"\x01', '"\\x', '"\\u12g', "NaN", "Infinity", "-Infinity", "+1", "01", ".5", "1.e5", "-a",
    "{} x", "[] []", '"a" "b"', "trux", "nulll", "]", "}", ":", '{"a": }', "[1]]",
])
def test_texts_that_cannot_begin_a_json_document_raise(text):
    with pytest.raises(ValueError, match="text: not the beginning of a JSON document"):
        parse_partial_json(text)


def test_an_error_stays_an_error_as_the_text_goes_on():
    for bad in ("[1,]", '{"a": x', "01"):
        for more in ("", "]", ", 2]", '"}', " "):
            with pytest.raises(ValueError):
                parse_partial_json(bad + more)


def test_deep_nesting_does_not_hit_the_recursion_limit():
    depth = 50_000
    assert _depth(parse_partial_json("[" * depth)) == depth
    text = '{"a": ' * depth + "1" + "}" * depth
    value = parse_partial_json(text)
    for _ in range(depth - 1):
        value = value["a"]
    assert value == {"a": 1}


def _depth(value: Any) -> int:
    n = 0
    while isinstance(value, list):
        n += 1
        value = value[0] if value else None
    return n


def test_text_must_be_a_string():
    with pytest.raises(TypeError, match="text: expected a str"):
        parse_partial_json(b"{}")  # type: ignore[arg-type]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4)
    | st.lists(st.tuples(st.text(max_size=6), inner), max_size=4).map(unique_keys),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(JSON_VALUES, st.sampled_from([None, 2]), st.booleans())
def test_every_prefix_of_any_document_is_consistent(value, indent, ascii_only):
    doc = json.dumps(value, indent=indent, ensure_ascii=ascii_only)
    final = json.loads(doc)
    for end in range(len(doc) + 1):
        assert consistent(parse_partial_json(doc[:end]), final), doc[:end]
    assert parse_partial_json(doc + "\n") == final
