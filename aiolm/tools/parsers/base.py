"""The bases of every tool-call format: :class:`ToolParser` (read whole, describe, write,
force by grammar) and :class:`ToolStreamer` (read as it streams), their results, and the
helpers the formats' grammars and tool descriptions share."""

from __future__ import annotations

import abc
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from ..spec import Tool, ToolCall, ToolCallDelta, new_call_id

if TYPE_CHECKING:
    from ._json_calls import _CallReader

__all__ = ["ParsedOutput", "StreamPiece", "ToolParser", "ToolStreamer"]


@attrs.frozen
class ParsedOutput:
    """A whole output split into its content (the text that is not calls) and its calls."""

    content: str
    calls: tuple[ToolCall, ...]


@attrs.frozen
class StreamPiece:
    """What one streamed delta produced: content text and tool-call deltas."""

    content: str = ""
    calls: tuple[ToolCallDelta, ...] = ()


class ToolParser(abc.ABC):
    """One model family's tool-call format. Instances hold no state; use :meth:`streamer`
    for a streamed output."""

    name: ClassVar[str]
    #: The format's marker is a special token in its models' tokenizers: the output must be
    #: decoded with special tokens kept, or the marker vanishes before the parser sees it.
    keeps_special_tokens: ClassVar[bool] = False
    # How a grammar writes several calls: the text before, between and after them.
    _list_format: ClassVar[tuple[str, str, str]]

    def parse(self, text: str) -> ParsedOutput:
        """Split a whole output into content and calls; malformed calls stay in the content.
        Never raises for any text."""
        streamer = self.streamer()
        first, last = streamer.feed(text), streamer.finish()
        return ParsedOutput(content=first.content + last.content, calls=streamer.calls)

    @abc.abstractmethod
    def streamer(self) -> ToolStreamer:
        """A fresh reader for one streamed output."""

    def grammar(self, tools: Sequence[Tool], *, choice: str, parallel: bool) -> str:
        """A grammar (for :class:`aiolm.constraints.Grammar`) whose sentences are one call,
        or with ``parallel`` one or more calls, in this format and nothing else.

        ``choice`` is ``"required"`` (any of ``tools``) or a tool's name (that tool only).
        Each call's arguments follow its tool's JSON schema (llguidance's ``%json``), laid
        out as the engine lays out JSON (``", "`` and ``": "``) unless the schema's
        ``"x-guidance"`` says otherwise. Raises ``ValueError`` for another ``choice`` or a
        name not among ``tools``.
        """
        chosen = _chosen_tools(tools, choice)
        before, between, after = self._list_format
        start = [_lit(before)] if before else []
        start.append(f"call ({_lit(between)} call)*" if parallel else "call")
        start += [_lit(after)] if after else []
        lines = [
            "start: " + " ".join(start),
            "call: " + " | ".join(f"call_{i}" for i in range(len(chosen))),
        ]
        for i, tool in enumerate(chosen):
            lines.extend(self._call_rules(i, tool))
        return "\n".join(lines) + "\n"

    @abc.abstractmethod
    def describe_tools(self, tools: Sequence[Tool]) -> str:
        """A system-prompt text listing ``tools`` and how to call them in this format (for a
        model whose chat template does not render tools)."""

    def format_calls(self, calls: Sequence[ToolCall]) -> str:
        """``calls`` written in this format, laid out as :meth:`grammar` lays them out (for
        an assistant turn's calls in a prompt that no template renders); "" for none.
        :meth:`parse` of the text gives back their names and arguments."""
        if not calls:
            return ""
        before, between, after = self._list_format
        return before + between.join(self._format_call(c) for c in calls) + after

    # -- grammar pieces -----------------------------------------------------------------------

    @abc.abstractmethod
    def _call_rules(self, i: int, tool: Tool) -> list[str]:
        """The rules of ``call_{i}``: a call of ``tool``."""

    @abc.abstractmethod
    def _format_call(self, call: ToolCall) -> str:
        """One call's text, as ``_call_rules`` lays it out."""


class ToolStreamer(abc.ABC):
    """Reads one output as it streams: each :meth:`feed` returns the content and call
    deltas that its text decided. Text that could still begin a call is held back until it
    is decided, and :meth:`finish` returns what is left.

    ``calls`` holds the calls complete so far (what :meth:`ToolParser.parse` returns).
    Mutates only itself; one output per streamer, used by one task at a time.
    """

    def __init__(self) -> None:
        self._buf = ""  # text received and not yet decided
        self._raw = ""  # text of the call region being read, content again if it fails
        self._out: list[str] = []
        self._deltas: list[ToolCallDelta] = []
        self._calls: list[ToolCall] = []
        self._next_index = 0
        self._after_call = False
        self._held = ""  # whitespace after a call: dropped if a call or the end follows
        self._finished = False

    @property
    def calls(self) -> tuple[ToolCall, ...]:
        """The complete, well-formed calls read so far, in order."""
        return tuple(self._calls)

    def feed(self, delta: str) -> StreamPiece:
        """Take the next piece of output text; return what it decided."""
        if not isinstance(delta, str):
            raise TypeError(f"delta: expected str, got {type(delta).__name__}")
        if self._finished:
            raise RuntimeError("feed: this streamer has finished")
        self._buf += delta
        self._step(final=False)
        return self._take()

    def finish(self) -> StreamPiece:
        """End of output: flush held-back text. An unfinished or malformed call's text
        comes back as content; whitespace after the last call is dropped."""
        if self._finished:
            return StreamPiece()
        self._step(final=True)
        self._finished = True
        return self._take()

    @abc.abstractmethod
    def _step(self, final: bool) -> None:
        """Consume whatever ``_buf`` decides; with ``final``, all of it."""

    # -- output ---------------------------------------------------------------------------

    def _take(self) -> StreamPiece:
        piece = StreamPiece(content="".join(self._out), calls=tuple(self._deltas))
        self._out.clear()
        self._deltas.clear()
        return piece

    def _text(self, text: str) -> None:
        """Emit content (whitespace right after a call waits to see what follows)."""
        if not text:
            return
        if self._after_call:
            if not text.strip():
                self._held += text
                return
            text, self._held, self._after_call = self._held + text, "", False
        self._out.append(text)

    def _fail(self) -> None:
        """The call region read so far is malformed: it and the rest of the buffer are
        content."""
        self._text(self._raw + self._buf)
        self._raw = self._buf = ""

    def _open_call(self, name: str) -> tuple[int, str]:
        """A streamed call's name is complete: send its first delta."""
        index, call_id = self._next_index, new_call_id()
        self._next_index += 1
        self._deltas.append(ToolCallDelta(index=index, id=call_id, name=name))
        return index, call_id

    def _send_arguments(self, index: int, fragment: str) -> None:
        self._deltas.append(ToolCallDelta(index=index, arguments=fragment))

    def _commit(self, call: ToolCall, index: int | None) -> None:
        """A call is complete and well formed (``index`` None: nothing of it was sent)."""
        if index is None:
            index = self._next_index
            self._next_index += 1
            self._deltas.append(ToolCallDelta(
                index=index, id=call.id, name=call.name,
                arguments=json.dumps(dict(call.arguments), ensure_ascii=False)))
        self._calls.append(call)

    # -- reading helpers ------------------------------------------------------------------

    def _skip_space(self) -> bool:
        """Move leading whitespace of ``_buf`` into ``_raw``; True if text is left."""
        rest = self._buf.lstrip()
        self._raw += self._buf[: len(self._buf) - len(rest)]
        self._buf = rest
        return bool(rest)

    def _expect(self, literal: str, final: bool) -> bool | None:
        """Whether ``_buf`` opens with ``literal`` (consumed into ``_raw``); None while it is
        still a prefix of it."""
        if self._buf.startswith(literal):
            self._raw += literal
            self._buf = self._buf[len(literal):]
            return True
        if not final and literal.startswith(self._buf):
            return None
        return False

    def _content_until(self, marker: str, final: bool) -> bool:
        """Emit content up to ``marker`` (consumed into a fresh ``_raw``): True if found.
        Otherwise emit all but a tail that could begin the marker."""
        i = self._buf.find(marker)
        if i >= 0:
            self._text(self._buf[:i])
            self._held = ""
            self._raw, self._buf = marker, self._buf[i + len(marker):]
            return True
        keep = 0 if final else _partial_tail(self._buf, marker)
        self._text(self._buf[: len(self._buf) - keep])
        self._buf = self._buf[len(self._buf) - keep:]
        return False

    def _read_object(self, reader: _CallReader, final: bool) -> bool | None:
        """Feed ``_buf`` to ``reader``: True once its call is complete, False if malformed,
        None while it needs more text."""
        n = reader.feed(self._buf)
        self._raw += self._buf[:n]
        self._buf = self._buf[n:]
        if reader.failed:
            return False
        if reader.call is not None:
            return True
        return False if final else None


def _partial_tail(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that begins ``marker`` (a proper prefix)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


# -- grammar helpers --------------------------------------------------------------------------


def _chosen_tools(tools: Sequence[Tool], choice: str) -> list[Tool]:
    if choice == "required":
        if not tools:
            raise ValueError("tool_choice: 'required' needs at least one tool")
        return list(tools)
    if choice in ("auto", "none"):
        raise ValueError(f"tool_choice: {choice!r} leaves the output free; only 'required' "
                         "or a tool's name has a grammar")
    chosen = [t for t in tools if t.name == choice]
    if not chosen:
        names = ", ".join(repr(t.name) for t in tools) or "none given"
        raise ValueError(f"tool_choice: no tool named {choice!r} (tools: {names})")
    return chosen[:1]


def _lit(text: str) -> str:
    """``text`` as a grammar string literal."""
    return json.dumps(text, ensure_ascii=False)


def _schema_text(schema: Mapping[str, Any]) -> str:
    """A JSON schema for ``%json``, with the engine's JSON layout unless it sets its own."""
    from ...constraints._llg import JSON_DEFAULTS

    spec = dict(schema)
    spec.setdefault("x-guidance", dict(JSON_DEFAULTS))
    return json.dumps(spec, ensure_ascii=False)


def _tool_lines(tools: Sequence[Tool]) -> str:
    return "\n".join(json.dumps(t.to_openai(), ensure_ascii=False) for t in tools)
