"""Decode at batch 1: one request, 128 prompt tokens, 256 generated tokens.

Its figure is output tokens/s, and on a device with a measured memory bandwidth the
fraction of the bandwidth roofline (every decode step reads all the weights once).
"""

from __future__ import annotations

import random
from typing import Any

import attrs

from ..primitives import gen
from ..program import program
from .synth import Size, check_size, words
from .workload import Workload, fixed_length

__all__ = ["SHAPES", "Shape", "WORKLOAD", "complete", "make_inputs"]


@attrs.frozen(kw_only=True)
class Shape:
    prompt_words: int
    output_tokens: int


SHAPES: dict[Size, Shape] = {
    "tiny": Shape(prompt_words=16, output_tokens=8),
    "small": Shape(prompt_words=128, output_tokens=64),
    "full": Shape(prompt_words=128, output_tokens=256),
}


@program
async def complete(s, prompt: str, output_tokens: int) -> None:
    """Continue ``prompt`` for exactly ``output_tokens`` tokens."""
    s += prompt + gen("completion", **fixed_length(output_tokens))


def make_inputs(size: Size, seed: int) -> list[dict[str, Any]]:
    shape = SHAPES[check_size(size)]
    rng = random.Random(seed)
    return [{"prompt": words(rng, shape.prompt_words), "output_tokens": shape.output_tokens}]


WORKLOAD = Workload(
    name="decode-bs1",
    summary="1 request, 128 prompt tokens, 256 out",
    program=complete,
    make_inputs=make_inputs,
    shape=SHAPES.__getitem__,
    headline="output_tok_per_s",
    ablations=("overlap",),
    max_concurrency=1,
)
