"""JSON schemas past the grammar engine's coverage, on the corpus of tests/schema_corpus:
the examples agree with jsonschema, every schema is accepted or refused with a reason, and
every value a program generates on the engine validates or ends in a ConstraintError that
names why (never an invalid value), with regenerations counted."""

from __future__ import annotations

import collections
import json
from typing import Any

import jsonschema
import pytest
from mini_model import load_tiny
from schema_corpus import Entry, corpus

from aiolm import ConstraintError, gen, program
from aiolm.backends.engine import Engine
from aiolm.constraints import JSONSchema
from aiolm.constraints._schema_split import _format_checker

CORPUS = corpus()


def _validator(schema: dict[str, Any]) -> Any:
    """jsonschema's own validator of the schema's draft, with aiolm's format checks (the
    ``format-nongpl`` checkers and the OpenAPI number formats)."""
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, format_checker=_format_checker())


def test_the_corpus_covers_every_keyword_class_nested():
    classes = collections.Counter(e.keyword for e in CORPUS)
    assert len(CORPUS) >= 200
    for keyword in ("not", "oneOf", "dependencies", "dependentRequired", "dependentSchemas",
                    "uniqueItems", "if", "minProperties", "maxProperties", "contains",
                    "propertyNames", "unevaluatedProperties", "format:color",
                    "format:int32", "format:unknown", "enforced"):
        assert classes[keyword] >= 6, keyword  # each in every wrapper, nested ones included


@pytest.mark.parametrize("entry", CORPUS, ids=lambda e: e.name)
def test_examples_agree_with_jsonschema_and_matches_text(entry: Entry):
    checker = _validator(entry.schema)
    spec = JSONSchema(entry.schema)
    for doc in entry.valid:
        assert checker.is_valid(doc), doc
        assert spec.matches_text(json.dumps(doc)), doc
    for doc in entry.invalid:
        assert not checker.is_valid(doc), doc
        assert not spec.matches_text(json.dumps(doc)), doc
    if entry.rejected:
        with pytest.raises(ConstraintError, match="unknown format"):
            spec.matches_text("null")


@pytest.mark.parametrize("entry", CORPUS, ids=lambda e: e.name)
def test_every_schema_is_accepted_or_refused_with_its_reason(entry: Entry):
    spec = JSONSchema(entry.schema)
    if entry.rejected:
        with pytest.raises(ConstraintError, match="format 'phone-number' at /"):
            spec.validate()
        return
    spec.validate()
    deferred = [str(d) for d in spec.checked_after()]
    if entry.keyword == "enforced":
        assert deferred == []
        JSONSchema(entry.schema, unenforceable="error").validate()
        return
    keyword = entry.keyword.replace("format:", "format '").split(":")[0]
    assert any(d.startswith(keyword) for d in deferred), deferred
    with pytest.raises(ConstraintError, match=f"not enforceable while decoding: .*{keyword}"):
        JSONSchema(entry.schema, unenforceable="error").validate()


SEEDS = (0, 1)


@program
async def _fill(s, schema):
    s += "Value: " + gen("v", constraint=schema, max_tokens=64)


@pytest.mark.anyio
async def test_generated_values_validate_or_fail_naming_why():
    """Every corpus schema, two seeds, on the tiny random model through programs: a value
    is returned only when jsonschema accepts it; otherwise a ConstraintError says why."""
    entries = [e for e in CORPUS if e.generate and not e.rejected]
    jobs = [(e, seed) for e in entries for seed in SEEDS]
    async with Engine(load_tiny(), max_total_tokens=32768) as eng:
        states = await _fill.run_batch(
            [{"schema": JSONSchema(e.schema, attempts=4), "seed": seed} for e, seed in jobs],
            backend=eng, temperature=1.0, max_concurrency=len(jobs))
    returned = failed = invalid = 0
    attempts: collections.Counter[int] = collections.Counter()
    reasons: collections.Counter[str] = collections.Counter()
    for (entry, _), state in zip(jobs, states, strict=True):
        if state.error is not None:
            assert isinstance(state.error, ConstraintError), state.error
            message = str(state.error)
            assert "no output satisfied" in message or "max_tokens" in message, message
            reasons["max_tokens" if "max_tokens" in message else entry.keyword] += 1
            failed += 1
            continue
        returned += 1
        attempts[state.meta("v").attempts] += 1
        if not _validator(entry.schema).is_valid(json.loads(state["v"])):
            invalid += 1
    assert invalid == 0
    assert returned >= len(jobs) // 2, (returned, failed, reasons)
    assert sum(n for k, n in attempts.items() if k > 1) > 0, attempts  # regenerated some
