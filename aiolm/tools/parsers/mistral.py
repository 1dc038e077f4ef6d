"""The ``mistral`` tool-call format: ``[TOOL_CALLS]`` and a JSON list of calls after any
content; a call's own ``id`` is kept."""

from __future__ import annotations

from collections.abc import Sequence

from ..spec import Tool
from ._json_calls import _CallReader, _JsonToolParser, _ListStreamer
from .base import ToolStreamer, _tool_lines

__all__ = ["MistralParser"]


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
