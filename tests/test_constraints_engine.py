"""Constrained decoding through the engine: a tiny random model with a small real tokenizer
(fast), and the embedded SmolLM2 (slow)."""

from __future__ import annotations

import json
import string
from typing import Any

import anyio
import anyio.from_thread
import jsonschema
import pydantic
import pytest
import regex
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mini_model import load_tiny

import aiolm
from aiolm import gen, program
from aiolm.backends import ScriptedBackend
from aiolm.backends.engine import Engine, LoadedModel
from aiolm.constraints import (
    Constraint,
    ConstraintLimits,
    JSONSchema,
    Matcher,
    Regex,
    pack_allowed_tokens,
)

PROMPT = [5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return load_tiny()


@pytest.fixture(scope="module")
def portal_engine():
    """One engine over its own tiny model for synchronous (hypothesis) tests, on a portal."""
    with anyio.from_thread.start_blocking_portal() as portal:
        eng = Engine(load_tiny(), max_total_tokens=8192)
        portal.call(eng.start)
        try:
            yield portal, eng
        finally:
            portal.call(eng.aclose)


# ------------------------------------------------------------------ tiny random model

_CHARS = st.sampled_from(list("abxyz09-_ .@{}()|*+?\\$\"é"))
_ATOMS = st.one_of(
    st.text(_CHARS, min_size=1, max_size=3).map(regex.escape),
    st.sampled_from([r"[a-c]", r"[0-9]", r"\d", r"[A-Z_]", r"[^a-z\n]", "."]),
)


def _piece(atom: str, kind: int, lo: int, extra: int) -> str:
    return [atom, f"(?:{atom}){{{lo},{lo + extra}}}", f"(?:{atom})?"][kind]


_PIECES = st.one_of(
    st.builds(_piece, _ATOMS, st.integers(0, 2), st.integers(0, 2), st.integers(0, 2)),
    st.lists(_ATOMS, min_size=2, max_size=3).map(lambda xs: "(" + "|".join(xs) + ")"),
)
_PATTERNS = st.lists(_PIECES, min_size=1, max_size=4).map("".join)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=_PATTERNS)
def test_random_sampling_fully_matches_random_regexes(portal_engine, pattern):
    portal, eng = portal_engine
    for seed in range(3):
        done = portal.call(lambda s=seed: eng.generate(
            input_ids=PROMPT, constraint=Regex(pattern), max_tokens=400, temperature=1.0,
            seed=s))
        assert done.finish_reason == "stop", (pattern, done.text)
        assert regex.fullmatch(pattern, done.text), (pattern, done.text)


_LONG_KEYS = {
    "type": "object",
    "properties": {
        "the_first_rather_long_property_name": {"type": "integer", "minimum": 0, "maximum": 99},
        "another_quite_long_key_for_the_colour": {"enum": ["red", "green", "blue"]},
        "a_third_key_that_is_also_long": {"type": "boolean"},
    },
    "required": ["the_first_rather_long_property_name", "another_quite_long_key_for_the_colour",
                 "a_third_key_that_is_also_long"],
    "additionalProperties": False,
}


async def _decode(tiny: LoadedModel, *, jump_forward: bool, **sampling: Any):
    async with Engine(tiny, max_total_tokens=4096, jump_forward=jump_forward) as eng:
        before = eng.statistics().forward_passes
        done = await eng.generate(input_ids=PROMPT, constraint=JSONSchema(_LONG_KEYS),
                                  max_tokens=200, **sampling)
        return done, eng.statistics().forward_passes - before


@pytest.mark.anyio
async def test_jump_forward_gives_identical_text_in_fewer_passes(tiny):
    on, passes_on = await _decode(tiny, jump_forward=True, temperature=0.0)
    off, passes_off = await _decode(tiny, jump_forward=False, temperature=0.0)
    assert on.text == off.text and on.token_ids == off.token_ids
    assert on.finish_reason == off.finish_reason == "stop"
    jsonschema.validate(json.loads(on.text), _LONG_KEYS)
    assert passes_on < passes_off


@pytest.mark.anyio
async def test_too_few_tokens_end_on_length_never_on_an_invalid_value(tiny):
    spec = JSONSchema(_LONG_KEYS)
    async with Engine(tiny, max_total_tokens=4096) as eng:
        done = await eng.generate(input_ids=PROMPT, constraint=spec, max_tokens=6)
    assert done.finish_reason == "length"
    assert done.usage.completion_tokens <= 6
    assert not spec.matches_text(done.text)


@pytest.mark.anyio
async def test_batched_constrained_and_free_requests(tiny):
    pattern = r"[0-9]{3}-(ab|cd)"
    async with Engine(tiny, max_total_tokens=4096) as eng:
        results: dict[int, Any] = {}

        async def one(i: int) -> None:
            constraint = Regex(pattern) if i % 2 == 0 else None
            results[i] = await eng.generate(input_ids=PROMPT + [i], constraint=constraint,
                                            max_tokens=30, temperature=1.0, seed=i,
                                            ignore_eos=constraint is None)

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(one, i)
    for i, done in results.items():
        if i % 2 == 0:
            assert done.finish_reason == "stop" and regex.fullmatch(pattern, done.text)
        else:
            assert done.finish_reason == "length" and len(done.token_ids) == 30


# ------------------------------------------------------------------ SmolLM2 (slow)


class DigitsAndCommas(Constraint):
    """A constraint written from scratch (no llguidance): only digits and commas."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DigitsAndCommas)

    def __hash__(self) -> int:
        return hash(DigitsAndCommas)

    def compile(self, tokenizer: Any) -> Matcher:
        vocab = tokenizer.vocab_size
        allowed = torch.zeros(vocab, dtype=torch.bool)
        for token in range(vocab):
            text = tokenizer.decode([token])
            allowed[token] = bool(text) and all(c in "0123456789," for c in text)
        return _DigitsMatcher(allowed, tokenizer.eos_token_ids)

    def matches_text(self, text: str) -> bool:
        return bool(text) and all(c in "0123456789," for c in text)


class _DigitsMatcher(Matcher):
    def __init__(self, allowed: torch.Tensor, eos: tuple[int, ...]) -> None:
        self.allowed = allowed
        self.eos = eos
        self.count = 0

    def fill_next_token_mask(self, bitmask_row: Any) -> None:
        ok = self.allowed.clone()
        if self.count:
            ok[list(self.eos)] = True
        pack_allowed_tokens(ok, bitmask_row)

    def advance(self, token_id: int) -> bool:
        if token_id in self.eos:
            return self.count > 0
        if not self.allowed[token_id]:
            return False
        self.count += 1
        return True

    def forced_tokens(self) -> list[int]:
        return []

    def is_finished(self) -> bool:
        return False

    def fork(self) -> Matcher:
        twin = _DigitsMatcher(self.allowed, self.eos)
        twin.count = self.count
        return twin

    def rollback(self, n: int) -> None:
        self.count -= n


@pytest.fixture(scope="module")
def smol() -> LoadedModel:
    import smollm2

    module, config = smollm2.model()
    return LoadedModel(model=module, model_config=config, tokenizer=smollm2.tokenizer(),
                       device=torch.device("cpu"), source=smollm2.gguf_path(),
                       load_format="auto")


class Person(pydantic.BaseModel):
    name: str
    age: int
    job: str


@pytest.mark.slow
@pytest.mark.anyio
async def test_smollm2_writes_valid_person_int_and_digits(smol):
    @program
    async def survey(s):
        s += aiolm.user("Invent a person. Reply with JSON with their name, age and job.")
        s += aiolm.assistant(gen("person", json_schema=Person, max_tokens=120))
        s += aiolm.user("How many legs does a spider have?")
        s += aiolm.assistant(gen("legs", dtype=int, max_tokens=24))
        s += aiolm.user("List a few numbers separated by commas.")
        s += aiolm.assistant(gen("numbers", constraint=DigitsAndCommas(), max_tokens=12))

    async with Engine(smol, max_total_tokens=4096) as eng:
        state = await survey.run(backend=eng, temperature=0.0)
    person = Person.model_validate_json(state["person"])
    assert person.name and person.job
    assert state.meta("person").finish_reason == "stop"
    assert isinstance(state["legs"], int)
    numbers = state["numbers"]
    assert numbers and set(numbers) <= set(string.digits + ",")


# ------------------------------------------- errors that name why, checks after decoding


_WORD_COUNT = {"type": "object", "required": ["a"], "properties": {"a": {
    "type": "string", "pattern": "^(?:\\S+\\s+){0,99}\\S+$", "maxLength": 1000}}}


@pytest.mark.anyio
async def test_a_grammar_engine_failure_ends_the_request_with_its_message():
    from tiny_chat import tiny_chat_model

    model = tiny_chat_model()
    (quote_comma,) = model.tokenizer.encode(' ",')  # the token that exhausts the fuel
    spec = JSONSchema(_WORD_COUNT)
    tight = ConstraintLimits(step_lexer_fuel=200_000)  # llguidance's own default
    async with Engine(model, max_total_tokens=2048, constraint_limits=tight) as eng:
        for _ in range(2):  # no request with the schema is poisoned by an earlier one
            with pytest.raises(aiolm.ConstraintError,
                               match="lexer error: too many expressions constructed"):
                await eng.generate(input_ids=PROMPT, constraint=spec, max_tokens=40,
                                   logit_bias={quote_comma: 100.0})
    async with Engine(tiny_chat_model(), max_total_tokens=2048) as eng:  # default limits
        done = await eng.generate(input_ids=PROMPT, constraint=spec, max_tokens=12,
                                  logit_bias={quote_comma: 100.0})
        assert done.finish_reason == "length" and done.text.startswith('{"a": ",')


@pytest.mark.anyio
async def test_the_engine_never_ends_on_a_value_that_fails_the_check(tiny):
    never = JSONSchema({"type": "string", "maxLength": 3, "not": {"type": "string"}})
    async with Engine(tiny, max_total_tokens=4096) as eng:
        with pytest.raises(aiolm.ConstraintError, match="'not' fails at /"):
            await eng.generate(input_ids=PROMPT, constraint=never, max_tokens=20,
                               temperature=1.0, seed=0)


@pytest.mark.anyio
async def test_programs_regenerate_a_value_that_fails_and_count_the_attempts(tiny):
    unique = JSONSchema({"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 3,
                         "maxItems": 3, "uniqueItems": True}, attempts=20)

    @program
    async def pick(s):
        s += "Three: " + gen("v", constraint=unique, max_tokens=20)

    events: list[Any] = []
    async with Engine(tiny, max_total_tokens=8192) as eng:
        counts = []
        for seed in range(4):
            state = await pick.run(backend=eng, temperature=1.0, seed=seed)
            assert sorted(json.loads(state["v"])) == [1, 2, 3]
            counts.append(state.meta("v").attempts)
        async with pick.stream(backend=eng, temperature=1.0, seed=0) as stream:
            async for event in stream:
                events.append(event)
    assert max(counts) > 1  # 6 of the 27 arrays are unique: most seeds regenerate
    streamed = "".join(e.text for e in events if e.name == "v")
    assert sorted(json.loads(streamed)) == [1, 2, 3]  # only the attempt that passed


@pytest.mark.anyio
async def test_greedy_regeneration_stops_when_the_output_repeats(tiny):
    never = JSONSchema({"type": "string", "maxLength": 3, "not": {"type": "string"}},
                       attempts=5)

    @program
    async def one(s):
        s += "Q: " + gen("v", constraint=never, max_tokens=20)

    async with Engine(tiny, max_total_tokens=4096) as eng:
        with pytest.raises(aiolm.ConstraintError,
                           match=r"after 2 attempt\(s\).*'not' fails at /.*the same output"):
            await one.run(backend=eng, temperature=0.0)


@pytest.mark.anyio
async def test_scripted_answers_are_regenerated_too():
    replies = iter(["[1, 1]", "[1, 2]"])
    backend = ScriptedBackend(lambda prompt: next(replies))
    unique = JSONSchema({"type": "array", "items": {"type": "integer"}, "uniqueItems": True})

    @program
    async def pick(s):
        s += gen("v", constraint=unique)

    state = await pick.run(backend=backend)
    assert state["v"] == "[1, 2]" and state.meta("v").attempts == 2
