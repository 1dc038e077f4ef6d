"""Tree of thought: a chat that branches into 3 ideas, each into 3 more, three levels deep.

Every branch extends its parent's conversation, so the requests form a tree of shared
prefixes: the workload on which the achieved cache hit rate is compared with the offline
DFS-optimal one.
"""

from __future__ import annotations

import random
from typing import Any

import anyio
import attrs

from ..primitives import assistant, gen, system, user
from ..program import program
from .synth import Size, check_size, sentence
from .workload import Workload, fixed_length

__all__ = ["SHAPES", "Shape", "WORKLOAD", "make_inputs", "tree_of_thought"]


@attrs.frozen(kw_only=True)
class Shape:
    programs: int
    levels: int = 3
    width: int = 3
    question_words: int
    thought_tokens: int
    answer_tokens: int


SHAPES: dict[Size, Shape] = {
    "tiny": Shape(programs=2, levels=2, width=2, question_words=10, thought_tokens=3, answer_tokens=2),
    "small": Shape(programs=2, question_words=40, thought_tokens=6, answer_tokens=6),
    "full": Shape(programs=32, question_words=150, thought_tokens=48, answer_tokens=32),
}


async def _explore(s, depth: int, levels: int, width: int, thought_tokens: int) -> None:
    """Branch ``s`` into ``width`` ideas and explore each one, down to ``levels``."""
    async with s.fork(width) as branches:
        async with anyio.create_task_group() as tg:
            for i, branch in enumerate(branches):
                branch += user(f"Propose idea {i + 1} for step {depth + 1}, then think it through.")
                branch += assistant(gen("thought", **fixed_length(thought_tokens)))
                if depth + 1 < levels:
                    tg.start_soon(_explore, branch, depth + 1, levels, width, thought_tokens)


@program
async def tree_of_thought(
    s, question: str, levels: int, width: int, thought_tokens: int, answer_tokens: int
) -> None:
    """Explore a tree of ideas about ``question``, then answer it."""
    s += system("You solve hard problems by exploring several ideas step by step.")
    s += user(question)
    await _explore(s, 0, levels, width, thought_tokens)
    s += user("Which idea works best? Answer in one sentence.")
    s += assistant(gen("answer", **fixed_length(answer_tokens)))


def make_inputs(size: Size, seed: int) -> list[dict[str, Any]]:
    shape = SHAPES[check_size(size)]
    rng = random.Random(seed)
    return [
        {
            "question": sentence(rng, shape.question_words),
            "levels": shape.levels,
            "width": shape.width,
            "thought_tokens": shape.thought_tokens,
            "answer_tokens": shape.answer_tokens,
        }
        for _ in range(shape.programs)
    ]


WORKLOAD = Workload(
    name="tree-of-thought",
    summary="3 levels of fork(3) over a chat, then an answer",
    program=tree_of_thought,
    make_inputs=make_inputs,
    shape=SHAPES.__getitem__,
    ablations=("radix",),
    vs_optimal=True,
)
