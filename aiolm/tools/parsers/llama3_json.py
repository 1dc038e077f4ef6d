"""The ``llama3_json`` tool-call format (Llama 3.1 / 3.2 JSON tool calling): an optional
``<|python_tag|>``, then JSON calls separated by ``;`` or newlines; the whole output."""

from __future__ import annotations

from collections.abc import Sequence

from ..spec import Tool
from ._json_calls import _CallReader, _JsonToolParser, _ListStreamer
from .base import ToolStreamer, _tool_lines

__all__ = ["Llama3JsonParser"]


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
