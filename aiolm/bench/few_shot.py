"""Few-shot multiple choice (MMLU-like): a 5-shot prefix per subject, 1-token answers.

Many subjects are interleaved in the input order, so a first-come-first-served scheduler
alternates between prefixes while a cache-aware one groups each subject's questions.
The engine variants get a KV budget of a few subjects' prefixes, which is what makes the
order matter (a cache that holds every prefix forgives any order).
"""

from __future__ import annotations

import random
from typing import Any

import attrs

from ..primitives import gen
from ..program import program
from .synth import Size, check_size, sentence, title, words
from .workload import Workload

__all__ = ["SHAPES", "Shape", "WORKLOAD", "answer_question", "make_inputs"]

LETTERS = ("A", "B", "C", "D")


@attrs.frozen(kw_only=True)
class Shape:
    subjects: int
    questions_per_subject: int
    shots: int = 5
    question_words: int
    choice_words: int
    #: KV budget of the engine variants, in prefixes: a few subjects fit at once.
    cached_prefixes: int = 4

    @property
    def prefix_words(self) -> int:
        """About how many words (≈ tokens) one subject's few-shot prefix has."""
        return 12 + self.shots * (self.question_words + 4 * (self.choice_words + 1) + 3)


SHAPES: dict[Size, Shape] = {
    "tiny": Shape(subjects=2, questions_per_subject=2, question_words=8, choice_words=2),
    "small": Shape(subjects=4, questions_per_subject=4, question_words=24, choice_words=4,
                   cached_prefixes=2),
    "full": Shape(subjects=20, questions_per_subject=25, question_words=220, choice_words=15),
}


@program
async def answer_question(s, examples: str, question: str) -> None:
    """One MMLU-style question after its subject's few-shot examples; the answer is a letter."""
    s += examples + question
    s += gen("answer", max_tokens=1)


def _question(rng: random.Random, shape: Shape, answer: str | None) -> str:
    lines = [sentence(rng, shape.question_words)]
    lines += [f"{letter}. {words(rng, shape.choice_words)}" for letter in LETTERS]
    lines.append("Answer:" + (f" {answer}\n\n" if answer else ""))
    return "\n".join(lines)


def make_inputs(size: Size, seed: int, *, subjects: int | None = None) -> list[dict[str, Any]]:
    """Questions of every subject, interleaved (question 0 of each subject, then 1 …).
    ``subjects`` overrides the shape's number of subjects (``aiolm bench --subjects``)."""
    shape = SHAPES[check_size(size)]
    if subjects is not None:
        if isinstance(subjects, bool) or not isinstance(subjects, int) or subjects < 1:
            raise ValueError(f"subjects: must be a positive integer (got {subjects!r})")
        shape = attrs.evolve(shape, subjects=subjects)
    rng = random.Random(seed)
    prefixes = []
    for _ in range(shape.subjects):
        subject = title(rng)
        head = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        shots = [_question(rng, shape, rng.choice(LETTERS)) for _ in range(shape.shots)]
        prefixes.append(head + "".join(shots))
    return [
        {"examples": prefixes[k], "question": _question(rng, shape, None)}
        for _ in range(shape.questions_per_subject)
        for k in range(shape.subjects)
    ]


def _engine_kwargs(size: Size) -> dict[str, Any]:
    shape = SHAPES[check_size(size)]
    # Words are about 1.2 tokens each in a BPE vocabulary; leave room for the questions.
    return {"max_total_tokens": int(shape.cached_prefixes * shape.prefix_words * 1.4) + 512}


WORKLOAD = Workload(
    name="few-shot",
    summary="MMLU-like: 5-shot prefix per subject, subjects interleaved, 1-token answers",
    program=answer_question,
    make_inputs=make_inputs,
    shape=SHAPES.__getitem__,
    ablations=("radix", "schedule", "shared-prefix"),
    max_concurrency=1024,
    engine_kwargs=_engine_kwargs,
)
