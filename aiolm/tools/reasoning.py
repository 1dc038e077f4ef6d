"""Reasoning parsers: split a thinking model's output into its reasoning and its content.

Two families (``REASONING_PARSERS``):

- ``qwen3``: the output opens its thinking itself (``<think>...</think>``, leading
  whitespace allowed before it); an output without ``<think>`` is all content.
- ``deepseek_r1``: the generation prompt already opened ``<think>`` (DeepSeek-R1 distills,
  QwQ, Qwen3 thinking-only models), so the output starts inside the reasoning; without
  ``</think>`` it is all reasoning. A ``<think>`` opening the output anyway is dropped.

Whitespace right after ``</think>`` is dropped from the content. :meth:`ReasoningParser.parse`
runs the streamer over the whole text, so streamed and whole outputs split alike.
"""

from __future__ import annotations

import attrs
import regex

from .parsers.base import _partial_tail

__all__ = [
    "REASONING_PARSERS",
    "ReasoningParser",
    "ReasoningStreamer",
    "detect_reasoning_parser",
    "get_reasoning_parser",
    "template_has_thinking_switch",
]


@attrs.frozen(kw_only=True)
class ReasoningParser:
    """A thinking format: reasoning between ``start`` and ``end``. ``starts_inside``: the
    prompt opened the reasoning, so the output begins inside it."""

    name: str
    start: str = "<think>"
    end: str = "</think>"
    starts_inside: bool

    def parse(self, text: str) -> tuple[str, str]:
        """``(reasoning, content)`` of a whole output; never raises for any text."""
        streamer = self.streamer()
        r1, c1 = streamer.feed(text)
        r2, c2 = streamer.finish()
        return r1 + r2, c1 + c2

    def streamer(self) -> ReasoningStreamer:
        """A fresh reader for one streamed output."""
        return ReasoningStreamer(self)


class ReasoningStreamer:
    """Splits one streamed output: each :meth:`feed` returns ``(reasoning, content)``
    deltas, holding back text that may be part of a marker until it is decided.

    Mutates only itself; one output per streamer.
    """

    def __init__(self, parser: ReasoningParser) -> None:
        self._start, self._end = parser.start, parser.end
        self._inside = parser.starts_inside
        self._state = "start"  # start -> reasoning -> after_end -> content
        self._buf = ""

    def feed(self, delta: str) -> tuple[str, str]:
        """Take the next piece of output; return the reasoning and content it decided."""
        if not isinstance(delta, str):
            raise TypeError(f"delta: expected str, got {type(delta).__name__}")
        self._buf += delta
        return self._step(final=False)

    def finish(self) -> tuple[str, str]:
        """End of output: return the held-back text (a partial marker is text)."""
        out = self._step(final=True)
        self._buf = ""
        return out

    def _step(self, final: bool) -> tuple[str, str]:
        reasoning: list[str] = []
        content: list[str] = []
        while self._buf:
            if self._state == "start":
                body = self._buf.lstrip()
                if body.startswith(self._start):
                    self._buf = body[len(self._start):]
                    self._state = "reasoning"
                elif not final and self._start.startswith(body):
                    break  # whitespace or a partial marker so far
                else:
                    self._state = "reasoning" if self._inside else "content"
            elif self._state == "reasoning":
                i = self._buf.find(self._end)
                if i < 0:
                    keep = 0 if final else _partial_tail(self._buf, self._end)
                    reasoning.append(self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep:]
                    break
                reasoning.append(self._buf[:i])
                self._buf = self._buf[i + len(self._end):]
                self._state = "after_end"
            elif self._state == "after_end":
                self._buf = self._buf.lstrip()
                if self._buf:
                    self._state = "content"
            else:
                content.append(self._buf)
                self._buf = ""
        return "".join(reasoning), "".join(content)


REASONING_PARSERS: dict[str, ReasoningParser] = {
    "qwen3": ReasoningParser(name="qwen3", starts_inside=False),
    "deepseek_r1": ReasoningParser(name="deepseek_r1", starts_inside=True),
}


def get_reasoning_parser(name: str) -> ReasoningParser:
    """The parser registered as ``name``; ``ValueError`` naming the known ones otherwise."""
    parser = REASONING_PARSERS.get(name) if isinstance(name, str) else None
    if parser is None:
        known = ", ".join(sorted(REASONING_PARSERS))
        raise ValueError(f"reasoning_parser: unknown reasoning format {name!r} (known: {known})")
    return parser


# The generation-prompt block of a template: from ``if add_generation_prompt`` to its endif.
_GENERATION_BLOCK = regex.compile(r"if\s+add_generation_prompt\b(.*?)endif", regex.DOTALL)
# A <think> that opens (not an empty <think></think> block that switches thinking off).
_OPENING_THINK = regex.compile(r"<think>(?!(?:\s|\\n)*</think>)")


def detect_reasoning_parser(template_source: str | None) -> str | None:
    """The reasoning format a Jinja chat template's text implies, or None.

    ``<think>`` anywhere means ``qwen3``, unless the generation prompt itself opens
    ``<think>`` (DeepSeek-R1 distills, QwQ), which means ``deepseek_r1``.
    """
    if not template_source or "<think>" not in template_source:
        return None
    for block in _GENERATION_BLOCK.finditer(template_source):
        if _OPENING_THINK.search(block.group(1)):
            return "deepseek_r1"
    return "qwen3"


def template_has_thinking_switch(template_source: str | None) -> bool:
    """Whether a chat template reads ``enable_thinking`` (Qwen3's switch)."""
    return bool(template_source) and regex.search(r"\benable_thinking\b",
                                                  template_source or "") is not None
