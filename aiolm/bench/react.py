"""A ReAct agent: a long few-shot prefix, then steps of thought + action and an observation.

The program reads each step's output before it can write the observation (a tool call), as
a real agent does; the next step then extends the whole trajectory, which the prefix cache
keeps. Thoughts stop at ``"Observation"`` like the paper's agent; on random weights they
run to ``max_tokens``.
"""

from __future__ import annotations

import random
import zlib
from typing import Any

import attrs

from ..primitives import gen
from ..program import program
from .synth import Size, check_size, sentence, title, words
from .workload import Workload

__all__ = ["SHAPES", "Shape", "WORKLOAD", "agent", "lookup", "make_inputs"]


@attrs.frozen(kw_only=True)
class Shape:
    programs: int
    examples: int
    steps: int
    step_words: int
    observation_words: int
    thought_tokens: int


SHAPES: dict[Size, Shape] = {
    "tiny": Shape(programs=2, examples=1, steps=2, step_words=6, observation_words=6, thought_tokens=4),
    "small": Shape(programs=4, examples=2, steps=3, step_words=15, observation_words=15, thought_tokens=8),
    "full": Shape(programs=64, examples=4, steps=5, step_words=40, observation_words=60, thought_tokens=48),
}


def lookup(action: str, n_words: int) -> str:
    """The tool's answer to ``action``: deterministic text of ``n_words`` words."""
    return sentence(random.Random(zlib.crc32(action.encode())), n_words)


@program
async def agent(s, examples: str, question: str, steps: int, thought_tokens: int, observation_words: int) -> None:
    """Answer ``question`` in ``steps`` rounds of thought/action and tool observation."""
    s += examples + f"Question: {question}\n"
    for i in range(1, steps + 1):
        s += f"Thought {i}:" + gen(f"thought{i}", stop="Observation", max_tokens=thought_tokens)
        action = await s.get(f"thought{i}")
        s += f"\nObservation {i}: {lookup(action, observation_words)}\n"


def _trajectory(rng: random.Random, shape: Shape) -> str:
    lines = [f"Question: {sentence(rng, shape.step_words // 2)}"]
    for i in range(1, shape.steps + 1):
        lines.append(f"Thought {i}: {sentence(rng, shape.step_words)} Action {i}: Search[{title(rng)}]")
        lines.append(f"Observation {i}: {sentence(rng, shape.observation_words)}")
    lines.append(f"Thought {shape.steps + 1}: {words(rng, 6)} Action: Finish[{title(rng)}]")
    return "\n".join(lines) + "\n\n"


def make_inputs(size: Size, seed: int) -> list[dict[str, Any]]:
    shape = SHAPES[check_size(size)]
    rng = random.Random(seed)
    examples = (
        "Solve a question answering task with interleaving Thought, Action, Observation steps.\n\n"
        + "".join(_trajectory(rng, shape) for _ in range(shape.examples))
    )
    return [
        {
            "examples": examples,
            "question": sentence(rng, shape.step_words // 2),
            "steps": shape.steps,
            "thought_tokens": shape.thought_tokens,
            "observation_words": shape.observation_words,
        }
        for _ in range(shape.programs)
    ]


WORKLOAD = Workload(
    name="react",
    summary="ReAct agent: long few-shot prefix, gen(stop='Observation') + observation per step",
    program=agent,
    make_inputs=make_inputs,
    shape=SHAPES.__getitem__,
    ablations=("radix",),
)
