"""JSON decoding: one ``gen(json_schema=...)`` per request, schemas with long literal keys.

Keys, punctuation and enum tails are forced by the schema, so jump-forward decoding appends
them in one pass each instead of one decode step per token; short free-text values keep
most of the tokens forced. The ablation turns jump-forward off.
"""

from __future__ import annotations

import json
import random
from typing import Any

import attrs

from ..primitives import gen
from ..program import program
from .synth import Size, check_size, sentence, words
from .workload import Workload

__all__ = ["SHAPES", "Shape", "WORKLOAD", "extract_record", "make_inputs", "make_schema"]


@attrs.frozen(kw_only=True)
class Shape:
    programs: int
    schemas: int = 4
    fields: int
    key_words: tuple[int, int] = (3, 6)
    value_chars: int = 12
    document_words: int
    max_tokens: int = 512


SHAPES: dict[Size, Shape] = {
    "tiny": Shape(programs=2, schemas=1, fields=2, key_words=(2, 3), value_chars=4, document_words=10),
    "small": Shape(programs=4, fields=5, document_words=40),
    "full": Shape(programs=256, fields=10, document_words=150),
}


def make_schema(rng: random.Random, shape: Shape) -> dict[str, Any]:
    """An object schema of ``shape.fields`` required fields with long snake_case keys.

    Fields cycle through short strings, booleans and enums of long literal values.
    """
    properties: dict[str, Any] = {}
    while len(properties) < shape.fields:
        key = "_".join(words(rng, rng.randint(*shape.key_words)).split())
        if key in properties:
            continue
        kind = len(properties) % 3
        if kind == 0:
            properties[key] = {"type": "string", "maxLength": shape.value_chars}
        elif kind == 1:
            properties[key] = {"type": "boolean"}
        else:
            properties[key] = {"enum": ["_".join(words(rng, 4).split()) + f"_{i}" for i in range(3)]}
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


@program
async def extract_record(s, document: str, schema: dict[str, Any], record_tokens: int) -> None:
    """Fill in a JSON record about ``document``, telling the model the schema too."""
    s += "Read the document and fill in a JSON record with this schema: " + json.dumps(schema)
    s += "\n\n" + document + "\n\nRecord: "
    s += gen("record", json_schema=schema, max_tokens=record_tokens)


def make_inputs(size: Size, seed: int) -> list[dict[str, Any]]:
    shape = SHAPES[check_size(size)]
    rng = random.Random(seed)
    schemas = [make_schema(rng, shape) for _ in range(shape.schemas)]
    return [
        {
            "document": sentence(rng, shape.document_words),
            "schema": schemas[i % len(schemas)],
            "record_tokens": shape.max_tokens,
        }
        for i in range(shape.programs)
    ]


WORKLOAD = Workload(
    name="json-decode",
    summary="gen(json_schema=...) with long literal keys; jump-forward on/off",
    program=extract_record,
    make_inputs=make_inputs,
    shape=SHAPES.__getitem__,
    ablations=("jump-forward", "overlap", "mix-decode", "extend-graphs"),
)
