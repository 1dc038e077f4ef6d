"""Choosing an ending (HellaSwag-like): a 20-shot prefix shared by every question, then a
``select`` over 4 endings (the engine prefills the prompt once and scores all four)."""

from __future__ import annotations

import random
from typing import Any

import attrs

from ..primitives import select
from ..program import program
from .synth import Size, check_size, sentence
from .workload import Workload

__all__ = ["SHAPES", "Shape", "WORKLOAD", "choose_ending", "make_inputs"]


@attrs.frozen(kw_only=True)
class Shape:
    questions: int
    shots: int = 20
    context_words: int
    ending_words: int
    endings: int = 4


SHAPES: dict[Size, Shape] = {
    "tiny": Shape(questions=3, shots=2, context_words=8, ending_words=3),
    "small": Shape(questions=6, shots=8, context_words=12, ending_words=5),
    "full": Shape(questions=200, context_words=40, ending_words=15),
}


@program
async def choose_ending(s, examples: str, context: str, endings: list[str]) -> None:
    """Pick the most likely ending of ``context`` after the worked examples."""
    s += examples + context
    s += select("ending", choices=endings)


def make_inputs(size: Size, seed: int) -> list[dict[str, Any]]:
    """Questions with distinct contexts and endings after one shared few-shot prefix."""
    shape = SHAPES[check_size(size)]
    rng = random.Random(seed)
    examples = "".join(
        f"{sentence(rng, shape.context_words)} {sentence(rng, shape.ending_words)}\n\n"
        for _ in range(shape.shots)
    )
    inputs = []
    for _ in range(shape.questions):
        context = sentence(rng, shape.context_words)
        endings: list[str] = []
        while len(endings) < shape.endings:  # select's choices must be distinct
            ending = " " + sentence(rng, shape.ending_words)
            if ending not in endings:
                endings.append(ending)
        inputs.append({"examples": examples, "context": context, "endings": endings})
    return inputs


WORKLOAD = Workload(
    name="select",
    summary="HellaSwag-like: 20-shot prefix, select over 4 endings",
    program=choose_ending,
    make_inputs=make_inputs,
    shape=SHAPES.__getitem__,
    ablations=("radix", "schedule"),
    max_concurrency=256,
)
