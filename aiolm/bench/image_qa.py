"""Image QA (LLaVA-bench-like): several questions about each image, for LLaVA / Qwen2.5-VL.

Each image is a seeded synthetic picture (a gradient and a few coloured shapes, drawn with
PIL; nothing is downloaded). Two workloads share the images and questions:

- ``image-qa``: one program per question, ``user(image(picture) + question)`` then the
  answer. Questions about the same image are interleaved with the other images', so the
  image's hundreds of tokens are a prefix shared across programs: the radix cache (keyed
  by the image's content) computes them once, where ``radix-off`` recomputes them (and
  runs the vision tower again) for every question.
- ``image-qa-fork``: one program per image, a caption first, then ``fork(n)``: one branch
  per question over the same image and caption.

Answers have fixed lengths (:func:`~aiolm.bench.workload.fixed_length`). Besides the usual
figures, each record has the vision tower's calls and time (:mod:`aiolm.bench.vision_timer`).
"""

from __future__ import annotations

import io
import random
from typing import Any

import attrs

from ..primitives import assistant, gen, image, user
from ..program import program
from .synth import Size, check_size, sentence
from .vision_timer import vision_runner
from .workload import Workload, fixed_length

__all__ = ["FORK_WORKLOAD", "SHAPES", "WORKLOAD", "Shape", "answer_all", "answer_question",
           "make_fork_inputs", "make_inputs", "synthetic_image"]


@attrs.frozen(kw_only=True)
class Shape:
    images: int
    questions_per_image: int
    #: Width and height of each picture, in pixels (LLaVA-1.5 resizes to its tower's 336;
    #: Qwen2.5-VL takes it at about this resolution: 28 x 28 pixels per token).
    image_size: tuple[int, int] = attrs.field(converter=tuple)
    question_words: int
    answer_tokens: int
    caption_tokens: int


SHAPES: dict[Size, Shape] = {
    "tiny": Shape(images=2, questions_per_image=3, image_size=(64, 48), question_words=6,
                  answer_tokens=4, caption_tokens=4),
    "small": Shape(images=4, questions_per_image=4, image_size=(336, 252), question_words=12,
                   answer_tokens=16, caption_tokens=16),
    # LLaVA-bench (in the wild): 24 images, a few questions each.
    "full": Shape(images=24, questions_per_image=5, image_size=(672, 504), question_words=20,
                  answer_tokens=64, caption_tokens=64),
}

_COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 210, 50), "purple": (140, 60, 170), "orange": (240, 140, 30),
           "white": (245, 245, 245), "black": (20, 20, 20)}
_KINDS = ("square", "circle", "triangle")
_PLACES = ("top left", "top right", "bottom left", "bottom right", "middle")


def synthetic_image(rng: random.Random, size: tuple[int, int]) -> tuple[bytes, list[tuple[str, str, str]]]:
    """A PNG picture of ``size``: a two-colour gradient and three to six shapes. Returns
    its bytes and the shapes drawn, as ``(colour, kind, place)``."""
    import numpy as np
    from PIL import Image, ImageDraw

    width, height = size
    a, b = (np.array(rng.choice(list(_COLORS.values())), dtype=np.float32) for _ in range(2))
    ramp = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    pixels = np.broadcast_to(a + (b - a) * ramp, (height, width, 3)).astype(np.uint8)
    picture = Image.fromarray(pixels)
    draw = ImageDraw.Draw(picture)
    shapes = []
    for _ in range(rng.randint(3, 6)):
        colour, kind = rng.choice(list(_COLORS)), rng.choice(_KINDS)
        r = rng.randint(max(2, min(size) // 12), max(3, min(size) // 5))
        x, y = rng.randint(r, width - r), rng.randint(r, height - r)
        box = (x - r, y - r, x + r, y + r)
        if kind == "square":
            draw.rectangle(box, fill=_COLORS[colour])
        elif kind == "circle":
            draw.ellipse(box, fill=_COLORS[colour])
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=_COLORS[colour])
        column = "left" if x < width / 3 else "right" if x > 2 * width / 3 else ""
        row = "top" if y < height / 3 else "bottom" if y > 2 * height / 3 else ""
        shapes.append((colour, kind, f"{row} {column}".strip() if row and column else "middle"))
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue(), shapes


def _question(rng: random.Random, shapes: list[tuple[str, str, str]], n_words: int) -> str:
    colour, kind, place = rng.choice(shapes)
    asks = (f"What colour is the {kind} in the {place} of the picture?",
            f"How many {kind}s are there, and where is the {colour} one?",
            f"What is in the {rng.choice(_PLACES)} of the picture?",
            "Describe the picture in detail.")
    return f"{rng.choice(asks)} {sentence(rng, n_words)}"


def _pictures(size: Size, seed: int) -> tuple[Shape, list[tuple[bytes, list[str]]]]:
    """Each image with its questions."""
    shape = SHAPES[check_size(size)]
    rng = random.Random(seed)
    out = []
    for _ in range(shape.images):
        picture, shapes = synthetic_image(rng, shape.image_size)
        out.append((picture, [_question(rng, shapes, shape.question_words)
                              for _ in range(shape.questions_per_image)]))
    return shape, out


def make_inputs(size: Size, seed: int) -> list[dict[str, Any]]:
    """One program per question, the images interleaved (question 0 of each image, then 1 …)."""
    shape, pictures = _pictures(size, seed)
    return [{"picture": picture, "question": questions[k], "answer_tokens": shape.answer_tokens}
            for k in range(shape.questions_per_image) for picture, questions in pictures]


def make_fork_inputs(size: Size, seed: int) -> list[dict[str, Any]]:
    """One program per image, with all its questions."""
    shape, pictures = _pictures(size, seed)
    return [{"picture": picture, "questions": questions, "caption_tokens": shape.caption_tokens,
             "answer_tokens": shape.answer_tokens} for picture, questions in pictures]


@program
async def answer_question(s, picture: bytes, question: str, answer_tokens: int) -> None:
    """One question about one picture."""
    s += user(image(picture) + question)
    s += assistant(gen("answer", **fixed_length(answer_tokens)))


@program
async def answer_all(s, picture: bytes, questions: list[str], caption_tokens: int,
                     answer_tokens: int) -> None:
    """A caption of the picture, then every question in a fork branch of its own."""
    s += user(image(picture) + "Describe the picture.")
    s += assistant(gen("caption", **fixed_length(caption_tokens)))
    async with s.fork(len(questions)) as forks:
        forks += lambda i: user(questions[i]) + assistant(gen("answer", **fixed_length(answer_tokens)))


WORKLOAD = Workload(
    name="image-qa",
    summary="LLaVA-bench-like: several questions per synthetic image, one program each",
    program=answer_question,
    make_inputs=make_inputs,
    shape=SHAPES.__getitem__,
    ablations=("radix", "shared-prefix"),
    runner=vision_runner(answer_question),
    # Every question in flight at once, as a server taking them all would see them (the
    # engine decodes up to 512 together on CUDA). Under run_batch's 64 the full shape's 120
    # ran in two waves, the second waiting for the first one's answers (nvidia-h200,
    # benchmarks/gpu_profile.py --image-qa). The transformers peer runs one call at a time.
    max_concurrency=256,
)

FORK_WORKLOAD = Workload(
    name="image-qa-fork",
    summary="LLaVA-bench-like: a caption per synthetic image, then fork(n) over its questions",
    program=answer_all,
    make_inputs=make_fork_inputs,
    shape=SHAPES.__getitem__,
    ablations=("radix", "shared-prefix"),
    runner=vision_runner(answer_all),
)
