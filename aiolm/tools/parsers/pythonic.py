"""The ``pythonic`` tool-call format (Llama 3.2 / 4): ``[f(a=1, b="x"), g()]``, the whole
output; argument values are JSON or Python literals, never evaluated code."""

from __future__ import annotations

import ast
import json
import keyword
from collections.abc import Mapping, Sequence
from typing import Any

import regex

from ..spec import Tool, ToolCall, new_call_id
from .base import ToolParser, ToolStreamer, _lit, _schema_text, _tool_lines

__all__ = ["PythonicParser"]


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
