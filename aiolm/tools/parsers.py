"""Tool-call parsers: how each model family writes tool calls, read whole or as it streams,
described to a model in a system prompt, and forced by a grammar.

Formats (``TOOL_PARSERS``):

- ``hermes`` (Hermes 2 Pro, Qwen2.5, Qwen3): ``<tool_call>\\n{"name": "f", "arguments":
  {...}}\\n</tool_call>``, one block per call; text outside the blocks is content.
- ``llama3_json`` (Llama 3.1 / 3.2 JSON tool calling): an optional ``<|python_tag|>``,
  then ``{"name": "f", "parameters": {...}}`` (or ``"arguments"``), several separated by
  ``;`` or newlines; the output is calls only (an output that does not open with ``{``
  is content).
- ``mistral``: ``[TOOL_CALLS] [{"name": "f", "arguments": {...}, "id": "..."}, ...]``
  after any content; a call's own ``id`` is kept.
- ``pythonic`` (Llama 3.2 / 4 pythonic tool calling): ``[f(a=1, b="x"), g()]``, the whole
  output; argument values are JSON or Python literals (never evaluated code).

One reader for both: :meth:`ToolParser.parse` runs the format's streamer over the whole
text, so an output streamed in any pieces gives the content and calls of the whole.
A call that is malformed (not JSON, arguments not an object, not a literal) is content.

:meth:`ToolParser.grammar` forces calls laid out as :meth:`ToolParser.format_calls` writes
them (pythonic values are written as JSON: ``true``, ``null``). Markers are grammar text;
when the tokenizer has a special token of the same text (Mistral's ``[TOOL_CALLS]``), the
forced tokens are that special token, which a detokenizer that skips special tokens drops:
such outputs must be decoded with special tokens kept.

NOTE: a streamer sends a call's name and argument fragments as they come, before the call
is complete; a call that then proves malformed has already sent them, and its text comes
back as content too. Only :meth:`ToolParser.parse` (and the ``calls`` a streamer commits)
are free of such calls.
"""

from __future__ import annotations

import abc
import ast
import json
import keyword
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import attrs
import regex

from .spec import Tool, ToolCall, ToolCallDelta, new_call_id

__all__ = [
    "TOOL_PARSERS",
    "ParsedOutput",
    "StreamPiece",
    "ToolParser",
    "ToolStreamer",
    "detect_tool_parser",
    "get_tool_parser",
]


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


class _JsonToolParser(ToolParser):
    """A format whose calls are JSON objects ``{"name": ..., KEY: {...}}`` (KEY is
    ``_arguments_key``), each wrapped in ``_wrap``'s texts."""

    _arguments_key: ClassVar[str] = "arguments"
    _wrap: ClassVar[tuple[str, str]] = ("", "")

    def _frame(self, name: str) -> tuple[str, str]:
        """The text of a call of ``name`` before and after its arguments."""
        head = f'{self._wrap[0]}{{"name": {json.dumps(name)}, "{self._arguments_key}": '
        return head, "}" + self._wrap[1]

    def _call_rules(self, i: int, tool: Tool) -> list[str]:
        head, tail = self._frame(tool.name)
        return [f"call_{i}: {_lit(head)} args_{i} {_lit(tail)}",
                f"args_{i}: %json {_schema_text(tool.parameters)}"]

    def _format_call(self, call: ToolCall) -> str:
        head, tail = self._frame(call.name)
        return head + json.dumps(dict(call.arguments), ensure_ascii=False) + tail


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


# -- JSON call objects ------------------------------------------------------------------------

_JSON_OUTSIDE_STRINGS = frozenset(' \t\n\r,:0123456789-+.eEtruefalsn')
_OPENER = {"}": "{", "]": "["}


class _JsonScanner:
    """Finds where a JSON object or array ends, fed its text piece by piece.

    Tracks brackets and strings only (no full validation), and stops at a character that
    cannot appear outside a JSON string (``bad``), so that a format's closing tag after a
    broken object is found.
    """

    def __init__(self) -> None:
        self._stack: list[str] = []
        self._in_string = False
        self._escape = False
        self.done = False
        self.bad = False

    def feed(self, text: str) -> int:
        """Consume ``text`` up to the value's end (``done``) or a bad character (``bad``,
        not consumed); return how much was consumed."""
        i, n = 0, len(text)
        while i < n:
            c = text[i]
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif c == "\\":
                    self._escape = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._stack.append(c)
            elif c in "}]":
                if not self._stack or self._stack[-1] != _OPENER[c]:
                    self.bad = True
                    return i
                self._stack.pop()
                if not self._stack:
                    self.done = True
                    return i + 1
            elif c not in _JSON_OUTSIDE_STRINGS:
                self.bad = True
                return i
            i += 1
        return n


# The start of a call object written name first: then the name and arguments stream.
_HEAD = regex.compile(
    r'\{\s*"name"\s*:\s*("(?:[^"\\\x00-\x1f]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*\{'
)


class _CallReader:
    """Reads one call object ``{"name": ..., "arguments": {...}}`` as it streams.

    Written name first, the name is sent once complete and the arguments' text as it
    grows; written otherwise, the call is sent whole when the object ends. ``call`` is set
    when the object is complete and well formed, ``failed`` when it cannot be.
    """

    def __init__(self, owner: ToolStreamer, *, keep_ids: bool = False) -> None:
        self._owner = owner
        self._keep_ids = keep_ids
        self._scan = _JsonScanner()
        self._args_scan: _JsonScanner | None = None
        self._text = ""
        self._head = True  # still reading up to the arguments' opening brace
        self._args_seen = 0  # offset in _text of arguments text not yet sent
        self._name: str | None = None
        self._id: str | None = None
        self.index: int | None = None  # set once the name was sent
        self.call: ToolCall | None = None
        self.failed = False

    def feed(self, text: str) -> int:
        """Consume ``text`` up to the object's end; return how much was consumed."""
        n = self._scan.feed(text)
        self._text += text[:n]
        if self._scan.bad:
            self.failed = True
            return n
        if self._head:
            self._read_head()
        if self._args_scan is not None and not self._args_scan.done:
            self._read_arguments()
        if self._scan.done:
            self._complete()
        return n

    def _read_head(self) -> None:
        m = _HEAD.match(self._text, partial=True)
        if m is not None and m.partial:
            return
        self._head = False
        if m is None:
            return  # another key order: the call is sent whole
        try:
            name = json.loads(m.group(1))
        except ValueError:
            return
        if not name:
            return
        self._name = name
        self.index, self._id = self._owner._open_call(name)
        self._args_seen = m.end() - 1
        self._args_scan = _JsonScanner()

    def _read_arguments(self) -> None:
        assert self._args_scan is not None and self.index is not None
        new = self._text[self._args_seen:]
        k = self._args_scan.feed(new)
        if self._args_scan.done:
            new = new[:k]
        self._args_seen += len(new)
        if new:
            self._owner._send_arguments(self.index, new)

    def _complete(self) -> None:
        try:
            obj = json.loads(self._text)
        except ValueError:
            self.failed = True
            return
        call = _call_from_object(obj, keep_id=self._keep_ids, streamed_id=self._id)
        if call is None or (self._name is not None and call.name != self._name):
            self.failed = True
            return
        self.call = call


def _call_from_object(obj: Any, *, keep_id: bool, streamed_id: str | None) -> ToolCall | None:
    """The call a parsed JSON object stands for, or None when it is not one."""
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    arguments = obj["arguments"] if "arguments" in obj else obj.get("parameters")
    if not isinstance(name, str) or not name or not isinstance(arguments, dict):
        return None
    call_id = obj.get("id")
    if not (keep_id and isinstance(call_id, str) and call_id):
        call_id = streamed_id or new_call_id()
    return ToolCall(id=call_id, name=name, arguments=arguments)


# -- hermes -------------------------------------------------------------------------------


class _HermesStreamer(ToolStreamer):
    OPEN = "<tool_call>"
    CLOSE = "</tool_call>"

    def __init__(self) -> None:
        super().__init__()
        self._state = "content"
        self._reader: _CallReader | None = None

    def _step(self, final: bool) -> None:
        while True:
            state = self._state
            if state == "content":
                if not self._content_until(self.OPEN, final):
                    return
                self._state = "open"
            elif state == "open":
                if not self._skip_space():
                    if final:
                        self._fail()
                    return
                if self._buf[0] == "{":
                    self._reader = _CallReader(self)
                    self._state = "object"
                else:
                    self._state = "bad"
            elif state == "object":
                assert self._reader is not None
                done = self._read_object(self._reader, final)
                if done is None:
                    return
                self._state = "close" if done else "bad"
            elif state == "close":
                assert self._reader is not None and self._reader.call is not None
                self._skip_space()
                closed = self._expect(self.CLOSE, final)
                if closed is None:
                    return
                if closed:
                    self._commit(self._reader.call, self._reader.index)
                    self._raw = ""
                    self._after_call = True
                    self._state = "content"
                else:
                    self._state = "bad"
            else:  # bad: the block up to its closing tag (or the end) is content
                i = self._buf.find(self.CLOSE)
                if i < 0 and not final:
                    keep = _partial_tail(self._buf, self.CLOSE)
                    self._raw += self._buf[: len(self._buf) - keep]
                    self._buf = self._buf[len(self._buf) - keep:]
                    return
                end = len(self._buf) if i < 0 else i + len(self.CLOSE)
                self._text(self._raw + self._buf[:end])
                self._raw, self._buf = "", self._buf[end:]
                self._state = "content"
                if i < 0:
                    return


class HermesParser(_JsonToolParser):
    """``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` blocks (Hermes,
    Qwen2.5, Qwen3); text outside them is content."""

    name = "hermes"

    def streamer(self) -> ToolStreamer:
        return _HermesStreamer()

    def describe_tools(self, tools: Sequence[Tool]) -> str:
        return (
            "# Tools\n\nYou can call the functions below to help with the request. Their "
            "signatures are JSON schemas inside <tools></tools>:\n<tools>\n"
            f"{_tool_lines(tools)}\n</tools>\n\n"
            "To call a function, write a JSON object with its name and arguments inside "
            "<tool_call></tool_call> tags, one block per call:\n"
            '<tool_call>\n{"name": <function-name>, "arguments": <arguments-json-object>}\n'
            "</tool_call>"
        )

    _list_format = ("", "\n", "")
    _wrap = ("<tool_call>\n", "\n</tool_call>")


# -- llama3_json ------------------------------------------------------------------------------


class _ListStreamer(ToolStreamer):
    """A streamer of a format whose calls are JSON objects in a list (llama3_json, mistral):
    a malformed object turns the rest of the output into content."""

    _state: str
    _reader: _CallReader | None

    def _object_in_list(self, final: bool, *, then: str) -> bool:
        """The ``"object"`` state: read the call being streamed; once complete, commit it and
        go to state ``then``, or, malformed, to ``"text"``. False when it needs more text."""
        assert self._reader is not None
        done = self._read_object(self._reader, final)
        if done is None:
            return False
        if not done:
            self._fail()
            self._state = "text"
            return True
        assert self._reader.call is not None
        self._commit(self._reader.call, self._reader.index)
        self._raw = ""
        self._state = then
        return True


class _Llama3Streamer(_ListStreamer):
    TAG = "<|python_tag|>"

    def __init__(self) -> None:
        super().__init__()
        self._state = "start"
        self._tagged = False
        self._reader: _CallReader | None = None

    def _step(self, final: bool) -> None:
        while True:
            state = self._state
            if state == "start":  # optional whitespace and tag, then the first object
                if not self._skip_space():
                    if final:
                        self._fail()
                    return
                if not self._tagged:
                    tagged = self._expect(self.TAG, final)
                    if tagged is None:
                        return
                    if tagged:
                        self._tagged = True
                        continue
                if self._buf[0] != "{":
                    self._fail()
                    self._state = "text"
                    continue
                self._reader = _CallReader(self)
                self._state = "object"
            elif state == "object":
                if not self._object_in_list(final, then="between"):
                    return
            elif state == "between":  # separators, then another object or the end
                rest = self._buf.lstrip(" \t\r\n;")
                self._raw += self._buf[: len(self._buf) - len(rest)]
                self._buf = rest
                if not rest:
                    return  # at the end, trailing separators are dropped
                if rest[0] == "{":
                    self._reader = _CallReader(self)
                    self._state = "object"
                else:
                    self._fail()
                    self._state = "text"
            else:  # text: everything else is content
                self._text(self._buf)
                self._buf = ""
                return


class Llama3JsonParser(_JsonToolParser):
    """Llama 3.1 / 3.2 JSON calls: ``<|python_tag|>{"name": ..., "parameters": {...}}``,
    several separated by ``;`` or newlines; the whole output is calls."""

    name = "llama3_json"

    def streamer(self) -> ToolStreamer:
        return _Llama3Streamer()

    def describe_tools(self, tools: Sequence[Tool]) -> str:
        return (
            "You have access to the functions below (JSON schemas of their parameters):\n\n"
            f"{_tool_lines(tools)}\n\n"
            "To call a function, answer with only a JSON object of the form "
            '{"name": <function name>, "parameters": <object of argument names and values>}. '
            "For several calls, separate the objects with \"; \". Do not use variables."
        )

    _list_format = ("", "; ", "")
    _arguments_key = "parameters"


# -- mistral ------------------------------------------------------------------------------


class _MistralStreamer(_ListStreamer):
    MARK = "[TOOL_CALLS]"

    def __init__(self) -> None:
        super().__init__()
        self._state = "content"
        self._reader: _CallReader | None = None

    def _step(self, final: bool) -> None:
        while True:
            state = self._state
            if state == "content":
                if not self._content_until(self.MARK, final):
                    return
                self._state = "open"
            elif state in ("open", "element", "next"):
                if not self._skip_space():
                    if final:
                        self._fail()
                    return
                c = self._buf[0]
                if (state, c) in (("open", "["), ("next", ",")):
                    self._raw += c
                    self._buf = self._buf[1:]
                    self._state = "element"
                elif state == "element" and c == "{":
                    self._reader = _CallReader(self, keep_ids=True)
                    self._state = "object"
                elif state == "next" and c == "]":
                    self._raw, self._buf = "", self._buf[1:]
                    self._after_call = True
                    self._state = "content"
                else:
                    self._fail()
                    self._state = "text"
            elif state == "object":
                if not self._object_in_list(final, then="next"):
                    return
            else:  # text: after a malformed array, everything is content
                self._text(self._buf)
                self._buf = ""
                return


class MistralParser(_JsonToolParser):
    """Mistral calls: ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`` after any
    content (each call's ``"id"`` is kept when it has one)."""

    name = "mistral"
    keeps_special_tokens = True   # [TOOL_CALLS] is a control token of Mistral's tokenizers

    def streamer(self) -> ToolStreamer:
        return _MistralStreamer()

    def describe_tools(self, tools: Sequence[Tool]) -> str:
        return (
            "You can call these functions (JSON schemas of their parameters):\n"
            f"{_tool_lines(tools)}\n\n"
            "To call functions, write [TOOL_CALLS] followed by a JSON list of calls, each "
            'an object with the function\'s "name" and its "arguments" object: '
            '[TOOL_CALLS] [{"name": <function name>, "arguments": <arguments object>}]'
        )

    _list_format = ("[TOOL_CALLS] [", ", ", "]")


# -- pythonic ---------------------------------------------------------------------------------


class _PyScanner:
    """Tracks Python brackets and quoted strings one character at a time."""

    def __init__(self, depth: int = 0) -> None:
        self.depth = depth
        self._quote = ""
        self._escape = False

    def step(self, c: str) -> bool:
        """Take ``c``; True when it is outside any string (brackets counted)."""
        if self._quote:
            if self._escape:
                self._escape = False
            elif c == "\\":
                self._escape = True
            elif c == self._quote:
                self._quote = ""
            return False
        if c in "'\"":
            self._quote = c
            return False
        if c in "([{":
            self.depth += 1
        elif c in ")]}":
            self.depth -= 1
        return True


_PY_CALL = regex.compile(r"\s*([A-Za-z_][\w.\-]*)\s*\((.*)\)\s*", regex.DOTALL)
_PY_KWARG = regex.compile(r"\s*([A-Za-z_]\w*)\s*=(.*)", regex.DOTALL)


def _python_call(text: str) -> ToolCall | None:
    """The call ``name(key=literal, ...)`` that ``text`` is, or None."""
    m = _PY_CALL.fullmatch(text)
    if m is None:
        return None
    parts = _split_arguments(m.group(2))
    if parts and not parts[-1].strip():
        parts.pop()  # a trailing comma
    arguments: dict[str, Any] = {}
    for part in parts:
        kw = _PY_KWARG.fullmatch(part)
        if kw is None or kw.group(1) in arguments:
            return None
        try:
            arguments[kw.group(1)] = _literal(kw.group(2).strip())
        except ValueError:
            return None
    try:  # JSON values only (tuples become lists; sets, bytes, NaN are refused)
        arguments = json.loads(json.dumps(arguments, allow_nan=False))
    except (TypeError, ValueError):
        return None
    return ToolCall(id=new_call_id(), name=m.group(1), arguments=arguments)


def _split_arguments(text: str) -> list[str]:
    """``text`` split at its top-level commas."""
    scan, parts, start = _PyScanner(), [], 0
    for i, c in enumerate(text):
        if scan.step(c) and c == "," and scan.depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if text.strip() or parts:
        parts.append(text[start:])
    return parts


def _literal(source: str) -> Any:
    """A value written as JSON (``true``, ``"a\\/b"``) or as a Python literal; never code.
    Raises ValueError otherwise."""
    try:
        return json.loads(source)
    except ValueError:
        pass
    try:
        return ast.literal_eval(source)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise ValueError(f"not a literal: {source[:80]!r}") from None


class _PythonicStreamer(ToolStreamer):
    def __init__(self) -> None:
        super().__init__()
        self._state = "start"
        self._scan = _PyScanner(depth=1)  # inside the list's "["
        self._element = ""  # the current element's text so far
        self._after_comma = False

    def _step(self, final: bool) -> None:
        while True:
            state = self._state
            if state == "start":
                if not self._skip_space():
                    if final:
                        self._fail()
                    return
                if self._buf[0] == "[":
                    self._raw += "["
                    self._buf = self._buf[1:]
                    self._state = "list"
                else:
                    self._fail()
                    self._state = "text"
            elif state == "list":
                end = self._element_end()
                if end is None:
                    self._element += self._buf
                    self._raw += self._buf
                    self._buf = ""
                    if final:
                        self._fail()
                    return
                c, element = self._buf[end], self._element + self._buf[:end]
                self._raw += self._buf[:end + 1]
                self._buf, self._element = self._buf[end + 1:], ""
                if not (c == "]" and self._after_comma and not element.strip()):
                    call = _python_call(element) if c in ",]" else None
                    if call is None:
                        self._fail()
                        self._state = "text"
                        continue
                    self._commit(call, None)
                    self._raw = ""
                self._after_comma = c == ","
                if c != ",":  # the list is closed: what follows is content
                    self._after_call = True
                    self._state = "text"
            else:  # text: after the list, or after a malformed one
                self._text(self._buf)
                self._buf = ""
                return

    def _element_end(self) -> int | None:
        """Where in ``_buf`` the current element ends (at a top-level "," or the list's
        closing bracket), or None."""
        scan = self._scan
        for i, c in enumerate(self._buf):
            if scan.step(c) and (c == "," and scan.depth == 1 or scan.depth == 0):
                return i
        return None


class PythonicParser(ToolParser):
    """Pythonic calls (Llama 3.2 / 4): ``[f(a=1, b="x"), g()]``, the whole output; values
    are JSON or Python literals. Each call is sent whole when it ends."""

    name = "pythonic"

    def streamer(self) -> ToolStreamer:
        return _PythonicStreamer()

    def describe_tools(self, tools: Sequence[Tool]) -> str:
        return (
            "You can call the functions below (JSON schemas of their parameters):\n"
            f"{_tool_lines(tools)}\n\n"
            "To call functions, answer with only a Python list of calls with keyword "
            "arguments whose values are literals: [func_name1(param1=value1, param2=value2), "
            "func_name2(param=value)]"
        )

    _list_format = ("[", ", ", "]")

    def _call_rules(self, i: int, tool: Tool) -> list[str]:
        schema = tool.parameters
        properties = schema.get("properties") or {}
        required = [p for p in schema.get("required") or () if p in properties]
        optional = [p for p in properties if p not in required]
        defs = {key: schema[key] for key in ("$defs", "definitions") if key in schema}
        items = required + optional
        for key in items:
            if not key.isidentifier() or keyword.iskeyword(key):
                raise ValueError(f"pythonic: tool {tool.name!r} has argument {key!r}, which "
                                 "is not a Python identifier")
        rules = []
        for k, key in enumerate(items):
            value = properties[key] if isinstance(properties[key], Mapping) else {}
            rules.append(f"arg_{i}_{k}: {_lit(key + '=')} %json {_schema_text({**value, **defs})}")
        if required:
            body = ' ", " '.join(f"arg_{i}_{k}" for k in range(len(required)))
            body += "".join(f' (", " arg_{i}_{k})?' for k in range(len(required), len(items)))
        elif items:  # only optional arguments: any of them, in order, comma-separated
            for k in range(len(items)):
                rest = "".join(f' (", " arg_{i}_{j})?' for j in range(k + 1, len(items)))
                alternative = f" | first_{i}_{k + 1}" if k + 1 < len(items) else ""
                rules.append(f"first_{i}_{k}: arg_{i}_{k}{rest}{alternative}")
            body = f"first_{i}_0?"
        else:
            body = ""
        return [f"call_{i}: {_lit(tool.name + '(')} {body} {_lit(')')}", *rules]

    def _format_call(self, call: ToolCall) -> str:
        arguments = ", ".join(f"{key}={json.dumps(value, ensure_ascii=False)}"
                              for key, value in call.arguments.items())
        return f"{call.name}({arguments})"


# -- registry and detection -------------------------------------------------------------------

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesParser,
    "llama3_json": Llama3JsonParser,
    "mistral": MistralParser,
    "pythonic": PythonicParser,
}


def get_tool_parser(name: str) -> ToolParser:
    """The parser registered as ``name``; ``ValueError`` naming the known ones otherwise."""
    cls = TOOL_PARSERS.get(name) if isinstance(name, str) else None
    if cls is None:
        known = ", ".join(sorted(TOOL_PARSERS))
        raise ValueError(f"tool_parser: unknown tool-call format {name!r} (known: {known})")
    return cls()


# What a chat template writes when it teaches its model a format, most specific first.
_TEMPLATE_MARKS = (
    ("hermes", ("<tool_call>",)),
    ("mistral", ("[TOOL_CALLS]",)),
    ("pythonic", ("[func_name1(", "<|python_start|>")),
    ("llama3_json", ("<|python_tag|>", "ipython")),
)


def detect_tool_parser(template_source: str | None) -> str | None:
    """The tool-call format a Jinja chat template's text teaches, or None if unknown."""
    if not template_source:
        return None
    for name, marks in _TEMPLATE_MARKS:
        if any(mark in template_source for mark in marks):
            return name
    return None


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
    from ..constraints._llg import JSON_DEFAULTS

    spec = dict(schema)
    spec.setdefault("x-guidance", dict(JSON_DEFAULTS))
    return json.dumps(spec, ensure_ascii=False)


def _tool_lines(tools: Sequence[Tool]) -> str:
    return "\n".join(json.dumps(t.to_openai(), ensure_ascii=False) for t in tools)
