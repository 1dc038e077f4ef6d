"""Video QA: several questions about each short clip, for the video models (``aiolm.video``:
Qwen2.5-VL, LLaVA-NeXT-Video).

Each clip is a seeded synthetic sequence of frames (PIL images: a coloured ball crossing a
gradient, drawn with PIL; nothing is downloaded), of which ``video(frames, num_frames=)``
samples a few evenly. One program per question, ``user(video(frames) + question)`` then a
fixed-length answer; questions about the same clip are interleaved with the other clips',
so the clip's tokens are a prefix shared across programs (cached by content, where
``radix-off`` recomputes them and runs the vision tower again). Each record also has the
vision tower's calls and time (:mod:`aiolm.bench.vision_timer`).
"""

from __future__ import annotations

import random
from typing import Any

import attrs

from ..primitives import assistant, gen, user, video
from ..program import program
from .synth import Size, check_size, sentence
from .vision_timer import vision_runner
from .workload import Workload, fixed_length

__all__ = ["SHAPES", "WORKLOAD", "Shape", "answer_question", "make_inputs", "synthetic_clip"]


@attrs.frozen(kw_only=True)
class Shape:
    clips: int
    questions_per_clip: int
    #: Frames of each clip, and how many of them ``video(..., num_frames=)`` samples.
    frames: int
    sampled_frames: int
    #: Width and height of each frame, in pixels (Qwen2.5-VL's processor resizes a video's
    #: frames to 128 to 768 tokens' worth of pixels each, 28 x 28 pixels per token).
    frame_size: tuple[int, int] = attrs.field(converter=tuple)
    question_words: int
    answer_tokens: int


SHAPES: dict[Size, Shape] = {
    "tiny": Shape(clips=2, questions_per_clip=3, frames=8, sampled_frames=4, frame_size=(56, 42),
                  question_words=6, answer_tokens=4),
    "small": Shape(clips=3, questions_per_clip=4, frames=16, sampled_frames=8,
                   frame_size=(112, 84), question_words=12, answer_tokens=16),
    "full": Shape(clips=16, questions_per_clip=5, frames=64, sampled_frames=16,
                  frame_size=(448, 336), question_words=20, answer_tokens=64),
}

_COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 210, 50), "white": (245, 245, 245)}


def synthetic_clip(rng: random.Random, frames: int, size: tuple[int, int]) -> tuple[list[Any], str]:
    """``frames`` RGB PIL frames of ``size``: a ball of one colour moving in a straight line
    over a gradient. Returns the frames and the ball's colour."""
    import numpy as np
    from PIL import Image, ImageDraw

    width, height = size
    top, bottom = (np.array(rng.choice(list(_COLORS.values())), dtype=np.float32) for _ in range(2))
    ramp = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    background = np.broadcast_to(top + (bottom - top) * ramp, (height, width, 3)).astype(np.uint8)
    colour = rng.choice(list(_COLORS))
    r = max(2, min(size) // 8)
    (x0, y0), (x1, y1) = ((rng.randint(r, width - r), rng.randint(r, height - r)) for _ in range(2))
    out = []
    for i in range(frames):
        t = i / max(1, frames - 1)
        x, y = x0 + (x1 - x0) * t, y0 + (y1 - y0) * t
        frame = Image.fromarray(background.copy())
        ImageDraw.Draw(frame).ellipse((x - r, y - r, x + r, y + r), fill=_COLORS[colour])
        out.append(frame)
    return out, colour


def _question(rng: random.Random, colour: str, n_words: int) -> str:
    asks = (f"Where does the {colour} ball go?", "What moves in this video?",
            f"Does the {colour} ball speed up or slow down?", "Describe the video in detail.")
    return f"{rng.choice(asks)} {sentence(rng, n_words)}"


def make_inputs(size: Size, seed: int) -> list[dict[str, Any]]:
    """One program per question, the clips interleaved (question 0 of each clip, then 1 …).
    The questions of a clip share its list of frames."""
    shape = SHAPES[check_size(size)]
    rng = random.Random(seed)
    clips = []
    for _ in range(shape.clips):
        frames, colour = synthetic_clip(rng, shape.frames, shape.frame_size)
        clips.append((frames, [_question(rng, colour, shape.question_words)
                               for _ in range(shape.questions_per_clip)]))
    return [{"frames": frames, "question": questions[k], "num_frames": shape.sampled_frames,
             "answer_tokens": shape.answer_tokens}
            for k in range(shape.questions_per_clip) for frames, questions in clips]


@program
async def answer_question(s, frames: list[Any], question: str, num_frames: int,
                          answer_tokens: int) -> None:
    """One question about one clip, ``num_frames`` of its frames sampled."""
    s += user(video(frames, num_frames=num_frames) + question)
    s += assistant(gen("answer", **fixed_length(answer_tokens)))


WORKLOAD = Workload(
    name="video-qa",
    summary="Several questions per synthetic clip, frames sampled by aiolm.video (Qwen2.5-VL or LLaVA-NeXT-Video)",
    program=answer_question,
    make_inputs=make_inputs,
    shape=SHAPES.__getitem__,
    ablations=("radix", "shared-prefix"),
    runner=vision_runner(answer_question),
    max_concurrency=256,   # every question in flight at once (see image_qa.WORKLOAD)
)
