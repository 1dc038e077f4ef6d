"""An LLM judge: an essay judged on 6 dimensions in parallel, the verdicts joined, a score.

The six branches share the essay (prefilled once before they start); the final turn
extends the essay's conversation with every verdict.
"""

from __future__ import annotations

import random
from typing import Any

import attrs

from ..primitives import assistant, gen, system, user
from ..program import program
from .synth import Size, check_size, sentence
from .workload import Workload, fixed_length

__all__ = ["DIMENSIONS", "SHAPES", "Shape", "WORKLOAD", "judge", "make_inputs"]

DIMENSIONS = (
    "clarity", "accuracy", "relevance", "depth of analysis", "structure", "originality",
)


@attrs.frozen(kw_only=True)
class Shape:
    programs: int
    essay_sentences: int
    sentence_words: int = 16
    verdict_tokens: int
    score_tokens: int = 2


SHAPES: dict[Size, Shape] = {
    "tiny": Shape(programs=2, essay_sentences=2, sentence_words=6, verdict_tokens=3),
    "small": Shape(programs=3, essay_sentences=10, verdict_tokens=8),
    "full": Shape(programs=64, essay_sentences=40, verdict_tokens=64),
}


@program
async def judge(s, essay: str, dims: list[str], verdict_tokens: int, score_tokens: int) -> None:
    """Judge ``essay`` on each of ``dims`` in parallel, then score it from 1 to 10."""
    s += system("You are an expert essay grader.")
    s += user("Please read this essay.\n\n" + essay)
    s += assistant("I have read the essay carefully.")
    async with s.fork(len(dims)) as forks:
        for f, dim in zip(forks, dims, strict=True):
            f += user(f"Judge the essay's {dim}. Be brief.")
            f += assistant(gen("verdict", **fixed_length(verdict_tokens)))
    forks.join()
    verdicts = await s.get("verdict")
    summary = "\n".join(f"{dim}: {v.strip()}" for dim, v in zip(dims, verdicts, strict=True))
    s += user("The verdicts were:\n" + summary + "\nOn a scale of 1 to 10, what is the score?")
    s += assistant("The score is " + gen("score", **fixed_length(score_tokens)))


def make_inputs(size: Size, seed: int) -> list[dict[str, Any]]:
    shape = SHAPES[check_size(size)]
    rng = random.Random(seed)
    return [
        {
            "essay": " ".join(sentence(rng, shape.sentence_words) for _ in range(shape.essay_sentences)),
            "dims": list(DIMENSIONS),
            "verdict_tokens": shape.verdict_tokens,
            "score_tokens": shape.score_tokens,
        }
        for _ in range(shape.programs)
    ]


WORKLOAD = Workload(
    name="judge",
    summary="LLM judge: fork(6) dimension judges -> join -> score",
    program=judge,
    make_inputs=make_inputs,
    shape=SHAPES.__getitem__,
    ablations=("radix",),
    vs_optimal=True,
)
