"""JSON call objects (``{"name": ..., "arguments": {...}}``), shared by the hermes,
llama3_json and mistral formats: the parser base that writes and forces them, and the
readers that find and read them as they stream."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import regex

from ..spec import Tool, ToolCall, new_call_id
from .base import ToolParser, ToolStreamer, _lit, _schema_text


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


# -- calls in a list (llama3_json, mistral) -------------------------------------------------


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
