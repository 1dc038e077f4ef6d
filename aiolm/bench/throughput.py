"""Offline throughput: many independent requests submitted at once.

Prompts of U[256, 1024] tokens and outputs of U[64, 256] tokens (the paper's shape at
``--size full``: 1000 requests). Random words share no prefixes beyond a token or two, so
this measures batching, not caching. The figures are output and total tokens/s, and on a
device with a measured matmul rate, the fraction of the compute roofline.
"""

from __future__ import annotations

import random
from typing import Any

import attrs

from .decode_bs1 import complete
from .synth import Size, check_size, words
from .workload import Workload

__all__ = ["SHAPES", "Shape", "WORKLOAD", "make_inputs"]


@attrs.frozen(kw_only=True)
class Shape:
    requests: int
    prompt_words: tuple[int, int]
    output_tokens: tuple[int, int]


SHAPES: dict[Size, Shape] = {
    "tiny": Shape(requests=4, prompt_words=(8, 24), output_tokens=(2, 6)),
    "small": Shape(requests=10, prompt_words=(64, 256), output_tokens=(8, 24)),
    "full": Shape(requests=1000, prompt_words=(256, 1024), output_tokens=(64, 256)),
}


def make_inputs(size: Size, seed: int) -> list[dict[str, Any]]:
    shape = SHAPES[check_size(size)]
    rng = random.Random(seed)
    return [
        {
            "prompt": words(rng, rng.randint(*shape.prompt_words)),
            "output_tokens": rng.randint(*shape.output_tokens),
        }
        for _ in range(shape.requests)
    ]


WORKLOAD = Workload(
    name="throughput",
    summary="1000 requests, prompt U[256,1024], out U[64,256], all at once",
    program=complete,
    make_inputs=make_inputs,
    shape=SHAPES.__getitem__,
    headline="output_tok_per_s",
    ablations=("overlap", "mix-decode"),
    max_concurrency=4096,
)
