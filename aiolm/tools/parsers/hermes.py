"""The ``hermes`` tool-call format (Hermes 2 Pro, Qwen2.5, Qwen3): ``<tool_call>`` blocks
holding one JSON call each; text outside the blocks is content."""

from __future__ import annotations

from collections.abc import Sequence

from ..spec import Tool
from ._json_calls import _CallReader, _JsonToolParser
from .base import ToolStreamer, _partial_tail, _tool_lines

__all__ = ["HermesParser"]


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
