"""Multi-turn chat: 4 turns of long questions (256–512 tokens) and short answers.

Each turn resends the whole conversation, so every turn after the first can reuse the
previous turns from the prefix cache. Runs are streamed to measure the time to the first
token of each answer (TTFT), separately for the first turn and for the later ones.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import anyio
import attrs

from ..primitives import assistant, gen, system, user
from ..program import program
from .synth import Size, check_size, sentence
from .workload import RunOptions, Workload, fixed_length

if TYPE_CHECKING:
    from ..backends.base import Backend

__all__ = ["SHAPES", "Shape", "WORKLOAD", "chat", "make_inputs", "run_streamed"]


@attrs.frozen(kw_only=True)
class Shape:
    programs: int
    turns: int = 4
    question_words: tuple[int, int]
    answer_tokens: tuple[int, int]


SHAPES: dict[Size, Shape] = {
    "tiny": Shape(programs=2, turns=2, question_words=(8, 16), answer_tokens=(2, 3)),
    "small": Shape(programs=4, question_words=(48, 96), answer_tokens=(4, 8)),
    "full": Shape(programs=128, question_words=(256, 512), answer_tokens=(4, 8)),
}


@program
async def chat(s, questions: list[str], answer_tokens: list[int]) -> None:
    """A conversation: each question gets an answer of the given length."""
    s += system("You are a helpful assistant. Answer briefly.")
    for i, (question, n) in enumerate(zip(questions, answer_tokens, strict=True)):
        s += user(question)
        s += assistant(gen(f"answer{i}", **fixed_length(n)))


def make_inputs(size: Size, seed: int) -> list[dict[str, Any]]:
    shape = SHAPES[check_size(size)]
    rng = random.Random(seed)
    return [
        {
            "questions": [sentence(rng, rng.randint(*shape.question_words)) for _ in range(shape.turns)],
            "answer_tokens": [rng.randint(*shape.answer_tokens) for _ in range(shape.turns)],
        }
        for _ in range(shape.programs)
    ]


async def run_streamed(
    backend: Backend, inputs: Sequence[dict[str, Any]], options: RunOptions
) -> dict[str, float]:
    """Stream every conversation (at most ``max_concurrency`` at once) and time each turn.

    A turn's TTFT runs from the last streamed piece of the previous answer (or the start,
    for the first turn) to the first piece of its own answer.
    """
    first_turn: list[float] = []
    later_turns: list[float] = []
    errors: list[BaseException] = []
    limit = anyio.Semaphore(options.max_concurrency)

    async def one(kwargs: dict[str, Any]) -> None:
        async with limit:
            first_seen: dict[str, float] = {}
            last_seen: dict[str, float] = {}
            start = time.perf_counter()
            try:
                async with chat.stream(backend=backend, **kwargs) as events:
                    async for event in events:
                        now = time.perf_counter()
                        if not event.text:
                            continue
                        first_seen.setdefault(event.name, now)
                        last_seen[event.name] = now
            except Exception as exc:  # a failed program is counted, not fatal to the run
                errors.append(exc)
                return
            previous_end = start
            for i in range(len(kwargs["questions"])):
                name = f"answer{i}"
                if name not in first_seen:
                    break
                (first_turn if i == 0 else later_turns).append(first_seen[name] - previous_end)
                previous_end = last_seen[name]

    from .openai_bridge import served_if

    async with served_if(backend, options) as backend, anyio.create_task_group() as tg:
        for kwargs in inputs:
            tg.start_soon(one, kwargs)
    if errors:
        raise errors[0]
    return {
        "ttft_first_turn_ms": _mean_ms(first_turn),
        "ttft_later_turns_ms": _mean_ms(later_turns),
    }


def _mean_ms(values: list[float]) -> float:
    return 1000.0 * sum(values) / len(values) if values else math.nan


WORKLOAD = Workload(
    name="multi-turn",
    summary="4-turn chat, 256-512-token questions, short answers; TTFT by streaming",
    program=chat,
    make_inputs=make_inputs,
    shape=SHAPES.__getitem__,
    ablations=("radix",),
    runner=run_streamed,
)
