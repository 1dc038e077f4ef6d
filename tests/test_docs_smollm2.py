"""Examples of the docs that a new user copies first, run on the embedded default model
(SmolLM2-135M) rather than the scripted backend: they must come to a sensible result."""

from __future__ import annotations

import pydantic
import pytest

import aiolm
from aiolm import assistant, gen, program, user
from aiolm.constraints import JSONSchema

pytestmark = pytest.mark.anyio


class Person(pydantic.BaseModel):   # docs/constraints.md
    name: str = pydantic.Field(max_length=40)
    age: int = pydantic.Field(ge=0, le=150)
    job: str


class Open(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")
    name: str


class Team(pydantic.BaseModel):
    lead: Person
    members: list[Person]
    scores: dict[str, int]


def test_a_pydantic_model_takes_no_keys_beyond_its_fields():
    closed = JSONSchema(Person)
    assert closed.schema["additionalProperties"] is False
    assert closed.matches_text('{"name": "Ada", "age": 36, "job": "engineer"}')
    assert not closed.matches_text('{"name": "Ada", "age": 36, "job": "engineer", "city": "X"}')


def test_nested_models_are_closed_and_dict_fields_stay_open():
    schema = JSONSchema(Team).schema
    assert schema["additionalProperties"] is False
    assert schema["$defs"]["Person"]["additionalProperties"] is False
    assert schema["properties"]["scores"]["additionalProperties"] == {"type": "integer"}


def test_a_model_that_allows_extra_keys_keeps_them():
    spec = JSONSchema(Open)
    assert spec.schema["additionalProperties"] is True
    assert spec.matches_text('{"name": "Ada", "city": "London"}')


@pytest.mark.slow
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_pydantic_example_of_the_constraints_page_validates_on_smollm2():
    from smollm2 import gguf_path

    gguf_path()  # skips without the embedded model's package

    @program
    async def invent(s):
        s += user("Invent a person. Reply in JSON.")
        s += assistant(gen("person", json_schema=Person, max_tokens=200))

    async with aiolm.Engine() as engine:
        state = await invent.run(backend=engine)
    person = Person.model_validate_json(state["person"])
    assert person.name and person.job
    assert state.meta("person").finish_reason == "stop"


@pytest.mark.slow
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_engine_examples_of_the_first_pages_come_to_sensible_answers_on_smollm2():
    """docs/getting-started.md's few-shot ``capital`` on the engine, and
    docs/constraints.md's ``card`` (regex, int, choices) and grammar examples."""
    import regex
    from smollm2 import gguf_path

    from aiolm import program

    gguf_path()  # skips without the embedded model's package

    @program
    async def capital(s, country: str):
        s += "Q: What is the capital of Japan?\nA: Tokyo\n"
        s += f"Q: What is the capital of {country}?\nA:" + gen("answer", max_tokens=16, stop="\n")

    @program
    async def card(s, city: str):
        s += user(f"Tell me about {city}.")
        s += assistant(
            "Country: " + gen("country", regex=r"[A-Z][a-z]+( [A-Z][a-z]+)*") + "\n"
            + "Population: " + gen("population", dtype=int) + "\n"
            + "Coastal: " + gen("coastal", choices=["yes", "no"])
        )

    arith = r"""
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /[0-9]{1,6}/
"""

    @program
    async def compute(s):
        s += "Compute: " + gen("expr", grammar=arith, max_tokens=40)

    async with aiolm.Engine() as engine:
        first = await capital.run(country="France", backend=engine)
        about = await card.run("Paris", backend=engine)
        math = await compute.run(backend=engine)
    assert first["answer"].strip() == "Paris"
    assert regex.fullmatch(r"[A-Z][a-z]+( [A-Z][a-z]+)*", about["country"])
    assert isinstance(about["population"], int)
    assert about["coastal"] in ("yes", "no")
    assert regex.fullmatch(r"[0-9()+\-*/]+", math["expr"]), math["expr"]
