"""Built-in constraints: validation errors, regex translation, text checks, and the llguidance
matcher driven by random walks (uniform choices among the tokens its mask allows)."""

from __future__ import annotations

import json
import random

import attrs
import jsonschema
import numpy as np
import pydantic
import pytest
import regex
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mini_model import build_mini_tokenizer

from aiolm import ConstraintError
from aiolm.constraints import (
    Choices,
    ConstraintGrammar,
    ConstraintLimits,
    Grammar,
    GrammarConstraint,
    JSONSchema,
    Matcher,
    Regex,
)
from aiolm.constraints._llg import text_matches, validate_spec
from aiolm.engine.grammar_backend import GrammarBackend

# ----------------------------------------------------------------------------- helpers


def allowed_tokens(row: torch.Tensor, vocab: int) -> np.ndarray:
    bits = np.unpackbits(row.numpy().view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(bits)


def random_walk(matcher, tokenizer, rng: random.Random, *, max_steps: int = 600) -> list[int]:
    """Uniformly sample allowed tokens until the matcher ends; apply jump-forward."""
    vocab = len(tokenizer)
    eos = tokenizer.eos_token_id
    row = torch.empty((vocab + 31) // 32, dtype=torch.int32)
    tokens: list[int] = []
    for _ in range(max_steps):
        if matcher.is_finished():
            return tokens
        matcher.fill_next_token_mask(row)
        allowed = allowed_tokens(row, vocab)
        assert len(allowed) > 0, "the mask allows nothing"
        token = int(allowed[rng.randrange(len(allowed))])
        if token == eos:
            assert matcher.accepts_eos()
            return tokens
        assert matcher.advance(token)
        tokens.append(token)
        take_jump_forward(matcher, tokens)
    raise AssertionError(f"no end after {max_steps} steps: {tokenizer.decode(tokens)!r}")


def take_jump_forward(matcher, tokens: list[int]) -> None:
    """Apply the matcher's jump-forward to ``tokens`` (its output so far), in place."""
    rollback, forced = matcher.jump_forward()
    if rollback:
        del tokens[-rollback:]
    for t in forced:
        assert matcher.advance(t)
        tokens.append(t)


def text_of(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def mini_tok():
    return build_mini_tokenizer()


@pytest.fixture(scope="module")
def smol_tok():
    import smollm2

    return smollm2.tokenizer().hf  # loaded once per session, shared with other test files


# ------------------------------------------------------------------ validation errors


@pytest.mark.parametrize(("pattern", "named"), [
    ("(?<=a)b", "lookbehind"),
    ("a(?!b)", "negative lookahead"),
    (r"(a)\1", "backreference"),
    (r"(?P<x>a)(?P=x)", "backreference"),
    (r"\bword", "word boundary"),
    ("(?>ab)c", "atomic group"),
    ("a++", "possessive"),
    ("a^b", "anchor"),
    ("(a)?(?(1)b|c)", "conditional"),
])
def test_regex_unsupported_construct_is_named(pattern, named):
    with pytest.raises(ConstraintError, match=named):
        Regex(pattern).validate()


def test_regex_that_does_not_compile_fails_at_construction():
    with pytest.raises(ConstraintError, match="does not compile"):
        Regex("[a-")


def test_regex_rust_syntax_error_is_reported():
    with pytest.raises(ConstraintError, match="flag"):
        Regex("(?a)x").validate()  # Python's ASCII flag has no automaton counterpart here


@pytest.mark.parametrize(("schema", "named"), [
    ({"type": "bogus"}, "bogus"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),
    ({"type": "integer", "minimum": 5, "maximum": 2}, "minimum"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength"),
    ({"type": "string", "format": "no-such-format"}, "no-such-format"),
    ({"type": "string", "pattern": "(?<=a)b"}, "look-around"),
    ({"type": "object", "x-guidance": {"bogus_option": 1}}, "bogus_option"),
])
def test_json_schema_problem_is_named(schema, named):
    with pytest.raises(ConstraintError, match=named):
        JSONSchema(schema).validate()


@pytest.mark.parametrize(("schema", "named"), [
    ({"if": {"type": "string"}, "then": {"maxLength": 2}}, "if at /"),
    ({"type": "object", "properties": {"t": {"type": "array", "uniqueItems": True}}},
     "uniqueItems at /properties/t"),
])
def test_unenforceable_keywords_are_named_in_error_mode_and_checked_after_otherwise(
        mini_tok, schema, named):
    strict = JSONSchema(schema, unenforceable="error")
    for call in (strict.validate, lambda: strict.compile(mini_tok)):
        with pytest.raises(ConstraintError, match=named):
            call()
    JSONSchema(schema).validate()
    assert named in [str(d) for d in JSONSchema(schema).checked_after()]


def test_json_schema_malformed_input_is_rejected():
    with pytest.raises(ConstraintError, match="not valid JSON"):
        JSONSchema("{not json")
    with pytest.raises(ConstraintError, match="expected a dict"):
        JSONSchema([1, 2])


def test_grammar_problem_is_named():
    with pytest.raises(ConstraintError, match="unknown name"):
        Grammar("start: item\n").validate()


def test_compile_raises_before_any_token(mini_tok):
    with pytest.raises(ConstraintError, match="lookbehind"):
        Regex("(?<=a)b").compile(mini_tok)


def test_validation_is_cached_and_repeatable():
    good = JSONSchema({"type": "integer"})
    validate_spec(good)
    validate_spec(good)
    bad = JSONSchema({"type": "bogus"})
    for _ in range(2):  # a failure is raised every time, not cached as success
        with pytest.raises(ConstraintError):
            validate_spec(bad)


# ------------------------------------------------------------------ regex translation


@pytest.mark.parametrize(("python", "text"), [
    ("a{,3}", "aa"),
    (r'\{"k": \d+\}', '{"k": 42}'),
    ('{"k": 1}', '{"k": 1}'),              # unescaped braces are literal in Python
    (r"\d+\Z", "123"),
    ("(?#a comment)ab", "ab"),
    (r"\N{LATIN SMALL LETTER E WITH ACUTE}t\N{LATIN SMALL LETTER E WITH ACUTE}", "été"),
    ("[[]+", "[["),
    ("[]a]+", "]a"),
    ("[a&&b]+", "a&b"),
    (r"\p{L}+", "héllo"),
    ("^(yes|no)$", "no"),
])
def test_python_regex_keeps_its_meaning(python, text):
    assert regex.fullmatch(python, text)
    assert Regex(python).matches_text(text)
    # The translated pattern accepts the same text through llguidance (byte-level check),
    # and rejects a near miss.
    assert text_matches(Regex(python), text)
    assert not text_matches(Regex(python), text + "\x00")


# ------------------------------------------------------------------ text checks


def test_json_text_check_accepts_any_layout():
    spec = JSONSchema({"type": "object", "properties": {"a": {"type": "integer"}},
                       "required": ["a"], "additionalProperties": False})
    assert spec.matches_text('{"a": 1}')
    assert spec.matches_text('  {\n  "a" : 1\n}\n')
    assert not spec.matches_text('{"a": "x"}')
    assert not spec.matches_text('{"a": 1, "b": 2}')
    assert not spec.matches_text('{"a": 1')


def test_grammar_and_choices_text_checks():
    parens = Grammar('start: "(" start ")" | "x"')
    assert parens.matches_text("((x))")
    assert not parens.matches_text("((x)")
    choices = Choices(["yes", "no"])
    assert choices.matches_text("no") and not choices.matches_text("n")


def test_json_schema_keeps_property_order():
    class Person(pydantic.BaseModel):
        name: str
        age: int
        job: str

    assert list(JSONSchema(Person).schema["properties"]) == ["name", "age", "job"]


# ------------------------------------------------------- matcher behaviour (mini tokenizer)


def test_regex_walks_match_on_mini_tokenizer(mini_tok):
    spec = Regex(r"(ab|cd){1,3}-[0-9]{2,4}( the)?")
    for seed in range(5):
        text = text_of(mini_tok, random_walk(spec.compile(mini_tok), mini_tok, random.Random(seed)))
        assert regex.fullmatch(spec.pattern, text), text


def test_boundary_is_retokenized_canonically(mini_tok):
    matcher = Regex("(a|b)bout the").compile(mini_tok)
    (a,) = mini_tok.encode("a")
    assert matcher.advance(a)
    rollback, tokens = matcher.jump_forward()
    assert rollback == 1
    assert tokens == mini_tok.encode("about the")[: len(tokens)]
    assert text_of(mini_tok, tokens).startswith("about")
    for t in tokens:
        assert matcher.advance(t)
    assert text_of(mini_tok, tokens + random_walk(matcher, mini_tok, random.Random(0))) == "about the"


def test_mask_admits_only_the_planned_forced_token(mini_tok):
    matcher = Regex("hello world [0-9]").compile(mini_tok)
    forced = matcher.forced_tokens()
    assert len(forced) >= 2
    row = torch.empty((len(mini_tok) + 31) // 32, dtype=torch.int32)
    matcher.fill_next_token_mask(row)
    assert allowed_tokens(row, len(mini_tok)).tolist() == [forced[0]]


def test_finished_matcher_allows_only_eos(mini_tok):
    matcher = Choices(["the quick"]).compile(mini_tok)
    for t in mini_tok.encode("the quick"):
        assert matcher.advance(t)
    assert matcher.is_finished() and matcher.accepts_eos()
    row = torch.empty((len(mini_tok) + 31) // 32, dtype=torch.int32)
    matcher.fill_next_token_mask(row)
    assert allowed_tokens(row, len(mini_tok)).tolist() == [mini_tok.eos_token_id]
    assert matcher.advance(mini_tok.eos_token_id)


def test_advance_refuses_a_disallowed_token_and_changes_nothing(mini_tok):
    matcher = Regex("[0-9]{3}").compile(mini_tok)
    (letter,) = mini_tok.encode("a")
    assert not matcher.advance(letter)
    assert not matcher.advance(mini_tok.eos_token_id)  # not accepting yet
    (digit,) = mini_tok.encode("7")
    assert matcher.advance(digit)


def test_fork_is_independent(mini_tok):
    spec = Regex("(ab|cd)(ef|gh)")
    matcher = spec.compile(mini_tok)
    for t in mini_tok.encode("ab"):
        assert matcher.advance(t)
    twin = matcher.fork()
    left = mini_tok.encode("ef")
    right = mini_tok.encode("gh")
    assert all(matcher.advance(t) for t in left)
    assert all(twin.advance(t) for t in right)
    assert matcher.is_finished() and twin.is_finished()
    assert not twin.fork().advance(left[0])


def test_rollback_restores_the_earlier_mask(mini_tok):
    matcher = Regex("[a-c]{2}[0-9]{3}").compile(mini_tok)
    words = (len(mini_tok) + 31) // 32
    before, after = torch.empty(words, dtype=torch.int32), torch.empty(words, dtype=torch.int32)
    assert matcher.advance(mini_tok.encode("a")[0])
    matcher.fill_next_token_mask(before)
    for t in mini_tok.encode("b12"):
        assert matcher.advance(t)
    matcher.rollback(len(mini_tok.encode("b12")))
    matcher.fill_next_token_mask(after)
    assert torch.equal(before, after)
    with pytest.raises(ValueError, match="exceeds"):
        matcher.rollback(5)
    with pytest.raises(ValueError, match="non-negative"):
        matcher.rollback(-1)


def test_wider_and_narrower_mask_rows(mini_tok):
    matcher = Regex("[0-9]").compile(mini_tok)
    words = (len(mini_tok) + 31) // 32
    wide = torch.full((words + 3,), -1, dtype=torch.int32)
    matcher.fill_next_token_mask(wide)
    assert wide[words:].eq(0).all()
    narrow = torch.full((2,), 0, dtype=torch.int32)
    matcher.fill_next_token_mask(narrow)
    full = torch.empty(words, dtype=torch.int32)
    matcher.fill_next_token_mask(full)
    assert torch.equal(narrow, full[:2])
    as_numpy = np.zeros(words, dtype=np.int32)
    matcher.fill_next_token_mask(as_numpy)
    assert np.array_equal(as_numpy, full.numpy())


def test_each_request_compiles_its_own_matcher(mini_tok):
    spec = JSONSchema({"type": "object", "properties": {"age": {"type": "integer"}}})
    first, second = spec.compile(mini_tok), spec.compile(mini_tok)
    words = first.mask_words
    assert first.llguidance_mask(words) is not second.llguidance_mask(words)  # own state
    assert first.forced_tokens() == second.forced_tokens()


# ------------------------------------------------------------------ SmolLM2 tokenizer

_CHARS = st.sampled_from(list("abcxyz019-_. @{}[]()|*+?\\^$\"'é"))


def _regexes() -> st.SearchStrategy[str]:
    literal = st.text(_CHARS, min_size=1, max_size=4).map(regex.escape)
    klass = st.sampled_from([r"[a-c]", r"[0-9]", r"\d", r"[A-Z_]", r"[^a-z\n]", r"[xyz.]", "."])
    leaf = literal | klass

    def extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        def rep(p: str, lo: int, extra: int) -> str:
            return f"(?:{p}){{{lo},{lo + extra}}}"

        return st.one_of(
            st.lists(inner, min_size=2, max_size=3).map("".join),
            st.lists(inner, min_size=2, max_size=3).map(lambda xs: "(" + "|".join(xs) + ")"),
            st.builds(rep, inner, st.integers(0, 2), st.integers(0, 2)),
            inner.map(lambda p: f"(?:{p})?"),
        )

    return st.recursive(leaf, extend, max_leaves=6)


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=_regexes())
def test_random_regex_walks_fully_match(smol_tok, pattern):
    spec = Regex(pattern)
    for seed in range(3):
        tokens = random_walk(spec.compile(smol_tok), smol_tok, random.Random(seed))
        text = text_of(smol_tok, tokens)
        assert regex.fullmatch(pattern, text), (pattern, text)


_NAME = {"type": "string", "maxLength": 8}
_SCHEMAS = {
    "nested objects": {
        "type": "object",
        "properties": {
            "person": {"type": "object", "properties": {
                "name": _NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                "required": ["name", "age"], "additionalProperties": False},
            "tags": {"type": "object", "properties": {"x": {"type": "boolean"}},
                     "additionalProperties": False}},
        "required": ["person"], "additionalProperties": False},
    "arrays": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5},
               "minItems": 2, "maxItems": 4},
    "nested arrays": {"type": "array", "minItems": 1, "maxItems": 2,
                      "items": {"type": "array", "items": _NAME, "maxItems": 2}},
    "enum and const": {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue", 7, None]},
        "kind": {"const": "fixed-value"}},
        "required": ["color", "kind"], "additionalProperties": False},
    "anyOf": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, _NAME,
                        {"type": "null"}]},
    "oneOf": {"oneOf": [
        {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"],
         "additionalProperties": False},
        {"type": "object", "properties": {"b": {"type": "null"}}, "required": ["b"],
         "additionalProperties": False}]},
    "patterns and formats": {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
        "day": {"type": "string", "format": "date"},
        "email": {"type": "string", "format": "email", "maxLength": 24}},
        "required": ["code", "day", "email"], "additionalProperties": False},
    "number bounds": {"type": "object", "properties": {
        "i": {"type": "integer", "minimum": -20, "maximum": 20},
        "x": {"type": "number", "minimum": -1.5, "maximum": 2.5},
        "big": {"type": "integer", "exclusiveMinimum": 1000}},
        "required": ["i", "x", "big"], "additionalProperties": False},
    "required and optional": {"type": "object", "properties": {
        "req": {"type": "integer", "minimum": 0, "maximum": 5},
        "opt": {"type": "boolean"}, "opt2": _NAME},
        "required": ["req"], "additionalProperties": False},
    "refs and defs": {
        "$defs": {"point": {"type": "object", "properties": {
            "x": {"type": "integer", "minimum": 0, "maximum": 9},
            "y": {"type": "integer", "minimum": 0, "maximum": 9}},
            "required": ["x", "y"], "additionalProperties": False}},
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}},
        "required": ["a", "b"], "additionalProperties": False},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(_SCHEMAS))
def test_random_json_walks_validate(smol_tok, name):
    schema = _SCHEMAS[name]
    spec = JSONSchema(schema)
    checker = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    for seed in range(4):
        text = text_of(smol_tok, random_walk(spec.compile(smol_tok), smol_tok, random.Random(seed)))
        checker.validate(json.loads(text))
        assert "\n" not in text  # the default layout is one line
        assert spec.matches_text(text)


@pytest.mark.slow
def test_pydantic_model_walks_validate(smol_tok):
    class Person(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")

        name: str = pydantic.Field(max_length=10)
        age: int = pydantic.Field(ge=0, le=130)
        job: str = pydantic.Field(max_length=10)

    spec = JSONSchema(Person)
    for seed in range(3):
        text = text_of(smol_tok, random_walk(spec.compile(smol_tok), smol_tok, random.Random(seed)))
        person = Person.model_validate_json(text)
        assert text.startswith('{"name": "') and 0 <= person.age <= 130


@pytest.mark.slow
def test_forced_tokens_cover_long_literal_keys(smol_tok):
    key = "the_customer_shipping_address_line"
    spec = JSONSchema({"type": "object", "properties": {key: {"type": "integer"}},
                       "required": [key], "additionalProperties": False})
    forced = spec.compile(smol_tok).forced_tokens()
    literal = '{"' + key + '":'
    assert len(forced) >= 8
    assert text_of(smol_tok, forced) == literal
    assert forced == smol_tok.encode(literal)  # canonical tokens of the forced text


@pytest.mark.slow
def test_jump_forward_tokens_are_canonical(smol_tok):
    spec = JSONSchema(_SCHEMAS["refs and defs"])
    matcher = spec.compile(smol_tok)
    rng = random.Random(3)
    vocab = len(smol_tok)
    row = torch.empty((vocab + 31) // 32, dtype=torch.int32)
    jumps = 0
    while not matcher.is_finished():
        matcher.fill_next_token_mask(row)
        allowed = allowed_tokens(row, vocab)
        assert matcher.advance(int(allowed[rng.randrange(len(allowed))]))
        _, forced = matcher.jump_forward()
        if len(forced) >= 2:
            jumps += 1
            assert smol_tok.encode(text_of(smol_tok, forced)) == forced
        for t in forced:
            assert matcher.advance(t)
    assert jumps >= 2


@pytest.mark.slow
def test_fork_and_rollback_on_smollm2(smol_tok):
    spec = Regex(r"(red|green|blue) (apple|banana)s?")
    matcher = spec.compile(smol_tok)
    for t in smol_tok.encode("green"):
        assert matcher.advance(t)
    twin = matcher.fork()
    apple, banana = smol_tok.encode(" apple"), smol_tok.encode(" banana")
    assert all(matcher.advance(t) for t in apple)
    assert all(twin.advance(t) for t in banana)
    assert matcher.accepts_eos() and twin.accepts_eos()
    matcher.rollback(len(apple))
    assert all(matcher.advance(t) for t in banana)
    assert matcher.accepts_eos()


# ------------------------------------------------------- limits, fresh matchers, text checks

WORD_COUNT = {"type": "object", "required": ["a"], "properties": {"a": {
    "type": "string", "pattern": "^(?:\\S+\\s+){0,99}\\S+$", "maxLength": 1000}}}


@pytest.mark.slow
def test_a_matcher_that_hits_a_limit_leaves_later_requests_unharmed(smol_tok):
    # Under llguidance's own per-token lexer fuel, this schema's first mask inside the string
    # fails; the grammar compiled for it used to be a shared template whose copies shared
    # the lexer, so every later request with the schema failed at its first token.
    spec = JSONSchema(WORD_COUNT)
    tight = ConstraintLimits(step_lexer_fuel=200_000)  # llguidance's own default
    masks = GrammarBackend(len(smol_tok))
    (quote_comma,) = smol_tok.encode(' ",')  # opens the string with a comma
    for _ in range(2):  # the second request on the same limits starts as well as the first
        matcher = spec.compile_for(smol_tok, tight)
        while matcher.only_token() is not None:  # the forced '{"a":'
            masks.fill_bitmask([(0, matcher)], 1)
            assert matcher.advance(matcher.only_token())
        masks.fill_bitmask([(0, matcher)], 1)
        assert matcher.advance(quote_comma)
        with pytest.raises(ConstraintError, match="too many expressions constructed"):
            masks.fill_bitmask([(0, matcher)], 1)
        assert "too many expressions constructed" in matcher.error()
    # The default limits are set for such schemas: a whole value, valid.
    rng = random.Random(0)
    for _ in range(2):
        tokens = _walk_closing_early(spec.compile(smol_tok), smol_tok, rng)
        value = json.loads(text_of(smol_tok, tokens))
        jsonschema.validate(value, WORD_COUNT)
        assert len(value["a"]) > 20


def _walk_closing_early(matcher, tokenizer, rng: random.Random) -> list[int]:
    """A random walk that writes 30 tokens into the string, then takes the closing quote as
    soon as it is allowed (a uniform walk would write up to maxLength characters)."""
    vocab = len(tokenizer)
    row = torch.empty((vocab + 31) // 32, dtype=torch.int32)
    (close,) = tokenizer.encode('"')
    quoted = {t for t in range(vocab) if '"' in tokenizer.decode([t])}
    tokens: list[int] = []
    while not matcher.is_finished():
        matcher.fill_next_token_mask(row)
        allowed = allowed_tokens(row, vocab)
        assert len(allowed) > 0, matcher.error()
        if len(tokens) > 30 and close in allowed:
            pick = close
        else:
            inside = [int(t) for t in allowed if int(t) not in quoted] or allowed.tolist()
            pick = inside[rng.randrange(len(inside))]
        if pick == tokenizer.eos_token_id:
            break
        assert matcher.advance(pick), matcher.error()
        tokens.append(pick)
        take_jump_forward(matcher, tokens)
    return tokens


def test_constraint_limits_are_checked():
    assert ConstraintLimits().step_lexer_fuel > 200_000  # above llguidance's own default
    with pytest.raises(ValueError, match="step_lexer_fuel must be a positive int"):
        ConstraintLimits(step_lexer_fuel=0)
    with pytest.raises(TypeError, match="precompute_large_lexemes"):
        ConstraintLimits(precompute_large_lexemes="yes")


_WORDS_50 = {"type": "string", "pattern": "^(?:\\S+\\s+){0,49}\\S+$", "maxLength": 500}


def test_matches_text_uses_jsonschema_whatever_the_grammar_limits():
    spec = JSONSchema(_WORDS_50)
    assert spec.matches_text('"The lab is near a bus stop and a train station."')
    words = ["w"] * 50
    assert spec.matches_text(json.dumps(" ".join(words)))
    assert not spec.matches_text(json.dumps(" ".join(words + ["w"])))  # 51 words
    long_word = "x" * 500
    assert spec.matches_text(json.dumps(long_word))  # exactly maxLength
    assert not spec.matches_text(json.dumps(long_word + "x"))
    assert not spec.matches_text('"trailing space "')
    big = JSONSchema({**_WORDS_50, "maxLength": 100_000})
    assert big.matches_text(json.dumps(" ".join(["word"] * 50)))
    # formats are checked, NaN is not JSON, layout is free
    email = JSONSchema({"type": "object", "properties": {"e": {"type": "string",
                                                               "format": "email"}}})
    assert email.matches_text(' {\n "e" : "a@b.io"}\n')
    assert not email.matches_text('{"e": "not an address"}')
    assert not JSONSchema({"type": "number"}).matches_text("NaN")


def test_regex_matches_text_is_the_full_regex():
    words = Regex(r"(?:\S+\s+){0,49}\S+")
    assert words.matches_text(" ".join(["w"] * 50))
    assert not words.matches_text(" ".join(["w"] * 51))
    lookahead = Regex("(?=a)a+b")  # decoding cannot express it; checking text can
    assert lookahead.matches_text("aab") and not lookahead.matches_text("b")
    with pytest.raises(ConstraintError, match="lookahead"):
        lookahead.validate()


def test_oneof_is_generated_as_anyof_and_its_exclusivity_checked():
    overlap = JSONSchema({"oneOf": [{"type": "integer", "maximum": 6},
                                    {"type": "integer", "minimum": 4}]})
    assert [str(d) for d in overlap.checked_after()] == ["oneOf at /"]
    assert overlap.check_output("5") is not None and "oneOf" in overlap.check_output("5")
    assert overlap.check_output("9") is None
    disjoint = JSONSchema({"oneOf": [{"type": "integer"}, {"type": "string"}]})
    assert disjoint.checked_after() == ()  # llguidance proves it exclusive: enforced


def test_unknown_format_is_never_silently_ignored():
    spec = JSONSchema({"type": "object", "properties": {"p": {"type": "string",
                                                              "format": "phone"}}})
    for call in (spec.validate, lambda: spec.matches_text('{"p": "1"}')):
        with pytest.raises(ConstraintError, match="unknown format .*'phone' at /properties/p"):
            call()
    known = JSONSchema({"type": "string", "format": "color"})
    assert [str(d) for d in known.checked_after()] == ["format 'color' at /"]
    assert known.matches_text('"red"') and not known.matches_text('"reddish"')


def test_false_schema_and_not_anything_are_unsatisfiable():
    for schema in (False, {"not": {}}):
        with pytest.raises(ConstraintError, match="unsatisfiable"):
            JSONSchema(schema).validate()


def test_finished_value_that_fails_the_check_is_refused_with_the_reason(mini_tok):
    spec = JSONSchema({"type": "array", "items": {"enum": [1, 2]}, "maxItems": 2,
                       "uniqueItems": True})
    matcher = spec.compile(mini_tok)
    tokens = mini_tok.encode("[1, 1")
    for t in tokens:
        assert matcher.advance(t)
    (close,) = mini_tok.encode("]")
    assert not matcher.advance(close)  # completes [1, 1]: not unique
    assert "'uniqueItems' fails at /" in matcher.error()
    matcher.rollback(1)  # back to "[1, "
    for t in mini_tok.encode("2]"):
        assert matcher.advance(t)
    assert matcher.is_finished() and matcher.accepts_eos()


def test_grammar_dispatch_is_by_method_for_your_own_grammar_constraint():
    from aiolm.backends._openai_wire import constraint_fields

    @attrs.frozen
    class Digits(GrammarConstraint):
        width: int

        def as_grammar(self) -> ConstraintGrammar:
            return ConstraintGrammar(kind="regex", source=f"[0-9]{{{self.width}}}")

    spec = Digits(3)
    spec.validate()
    assert spec.matches_text("123") and not spec.matches_text("12")
    assert constraint_fields(spec, chat=False) == ({}, {"regex": "[0-9]{3}"})
    with pytest.raises(Exception, match="chat API cannot constrain"):
        constraint_fields(spec, chat=True)


def test_matcher_fork_and_rollback_have_defaults():
    class Bare(Matcher):
        def fill_next_token_mask(self, bitmask_row):
            bitmask_row.fill(-1)

        def advance(self, token_id):
            return True

        def forced_tokens(self):
            return []

        def is_finished(self):
            return False

    bare = Bare()
    bare.rollback(0)
    with pytest.raises(NotImplementedError, match="rollback"):
        bare.rollback(1)
    with pytest.raises(NotImplementedError, match="fork"):
        bare.fork()
    assert bare.error() == "" and bare.only_token() is None and bare.llguidance_mask(4) is None


def _walk_checking_kept_masks(spec, tokenizer, rng: random.Random) -> int:
    """Walk ``spec`` randomly; at every full mask, the mask the matcher gives (kept per
    automaton state across requests) must equal the one its own llguidance matcher computes.
    Returns how many masks came from the kept ones."""
    matcher = spec.compile(tokenizer)
    vocab = len(tokenizer)
    words = (vocab + 31) // 32
    row = torch.empty(words, dtype=torch.int32)
    hits = 0
    for _ in range(200):
        if matcher.is_finished():
            break
        matcher.fill_next_token_mask(row)
        if matcher.only_token() is None:
            hits += matcher._masks is not None and matcher._masks.mask(matcher._states[-1]) is not None
            assert row.numpy().tobytes() == bytes(matcher._ll.compute_bitmask())[: words * 4]
        allowed = allowed_tokens(row, vocab)
        token = int(allowed[rng.randrange(len(allowed))])
        if token == tokenizer.eos_token_id:
            break
        assert matcher.advance(token)
        _, forced = matcher.jump_forward()
        for t in forced:
            assert matcher.advance(t)
    return hits


@pytest.mark.slow
def test_regex_masks_are_kept_per_state_and_equal_llguidances(smol_tok):
    spec = Regex(r"[A-Z][a-z]{1,11} (19|20)[0-9]{2}, mail [a-z0-9._]{1,16}@[a-z]{2,10}\.(com|org)")
    hits = sum(_walk_checking_kept_masks(spec, smol_tok, random.Random(seed))
               for seed in range(6))
    assert hits > 20  # later outputs copy the masks of states earlier ones computed


@pytest.mark.slow
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=_regexes())
def test_kept_masks_equal_llguidances_on_random_regexes(mini_tok, pattern):
    for seed in range(3):
        _walk_checking_kept_masks(Regex(pattern), mini_tok, random.Random(seed))
