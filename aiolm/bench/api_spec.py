"""API speculative execution: multi-field extraction through an OpenAI-compatible API.

The program writes ``name:``, ``job:``, ``age:``, ``city:``, ``hobby:`` and a ``gen`` after
each. With speculation on, the OpenAI backend asks the first call for more tokens and fills
the later fields from that text, saving calls and resent prompt tokens. The API is aiolm's
own server (``aiolm.server.create_app``) over the benchmarked backend, reached in process by
the real ``openai`` client; calls and prompt tokens are counted at the server.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs

from ..primitives import gen
from ..program import program
from .synth import Size, check_size, title, words
from .workload import RunOptions, Workload

if TYPE_CHECKING:
    from ..backends.base import Backend

__all__ = ["FIELDS", "SHAPES", "SPEC_TOKENS", "Shape", "WORKLOAD", "extract_fields", "make_inputs"]

FIELDS = ("name", "job", "age", "city", "hobby")
#: Tokens the first call of a run of gens asks for when speculation is on.
SPEC_TOKENS = 64

_JOBS = ("teacher", "doctor", "lawyer", "farmer", "painter", "engineer", "writer", "nurse")
_HOBBIES = ("chess", "music", "tennis", "cooking", "reading", "hiking", "painting", "swimming")


@attrs.frozen(kw_only=True)
class Shape:
    programs: int
    filler_words: int
    field_tokens: int = 16


SHAPES: dict[Size, Shape] = {
    "tiny": Shape(programs=2, filler_words=6),
    "small": Shape(programs=4, filler_words=20),
    "full": Shape(programs=64, filler_words=120),
}


def _person(rng: random.Random, filler_words: int) -> tuple[str, dict[str, str]]:
    facts = {
        "name": title(rng),
        "job": rng.choice(_JOBS),
        "age": str(rng.randint(20, 80)),
        "city": title(rng) + " Town",
        "hobby": rng.choice(_HOBBIES),
    }
    text = (
        f"{facts['name']} is a {facts['age']} year old {facts['job']} who lives in "
        f"{facts['city']} and loves {facts['hobby']}. {words(rng, filler_words)}."
    )
    return text, facts


@program
async def extract_fields(s, example: str, text: str, field_tokens: int) -> None:
    """Extract each of :data:`FIELDS` about the person in ``text``, one ``gen`` per field."""
    s += "Extract the details of the person described in the text.\n\n" + example
    s += "Text: " + text + "\n"
    for field in FIELDS:
        s += f"{field}: " + gen(field, stop="\n", max_tokens=field_tokens) + "\n"


def make_inputs(size: Size, seed: int) -> list[dict[str, Any]]:
    shape = SHAPES[check_size(size)]
    rng = random.Random(seed)
    example_text, facts = _person(rng, shape.filler_words)
    example = f"Text: {example_text}\n" + "".join(f"{f}: {facts[f]}\n" for f in FIELDS) + "\n"
    return [
        {"example": example, "text": _person(rng, shape.filler_words)[0], "field_tokens": shape.field_tokens}
        for _ in range(shape.programs)
    ]


async def run_through_api(
    backend: Backend, inputs: Sequence[dict[str, Any]], options: RunOptions
) -> dict[str, float]:
    """Serve ``backend`` with aiolm's server and run the programs on ``aiolm.OpenAI`` over it."""
    from .openai_bridge import served_if

    async with served_if(backend, attrs.evolve(options, via_openai=True)) as api:
        states = await extract_fields.run_batch(
            list(inputs), backend=api, max_concurrency=options.max_concurrency
        )
    failed = [st.error for st in states if st.error is not None]
    if failed:
        raise failed[0]
    return {}


WORKLOAD = Workload(
    name="api-spec",
    summary="multi-field extraction on an OpenAI-compatible server; speculation on/off",
    program=extract_fields,
    make_inputs=make_inputs,
    shape=SHAPES.__getitem__,
    headline="requests",
    ablations=("spec",),
    runner=run_through_api,
    # The peer is about the engine; this workload is about the OpenAI client.
    peer=False,
    spec_tokens=SPEC_TOKENS,
    via_openai=True,
)
