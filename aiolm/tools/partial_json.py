"""The value of an incomplete JSON document: what a streamed JSON answer holds so far.

:func:`parse_partial_json` reads a prefix of a JSON text (a model's answer as it streams)
and returns the value it already determines::

    parse_partial_json('{"name": "Al')            # {'name': 'Al'}
    parse_partial_json('{"name": "Ada", "age": 3')  # {'name': 'Ada'} (3 may go on: 36)

The rules: an open string is closed as it stands (a half-written escape left out); a key
whose value has not started, or whose value is an unfinished number, ``true``, ``false`` or
``null``, is left out; open arrays and objects are closed. A number at the very end of the
text is unfinished (another digit may follow), so ``"12"`` alone is ``None`` and ``"12 "``
is ``12``. Nothing at all yet (empty or blank text) is ``None``.

The parser is iterative (no recursion limit on nesting) and strict where JSON is: control
characters in strings, ``NaN``, trailing commas and single quotes are errors. The standard
library's ``json`` module decodes each finished string and number, so values agree with
``json.loads``.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["parse_partial_json"]

_WS = re.compile(r"[ \t\n\r]*")
# A string's body: characters, and escapes that are complete.
_STR_BODY = re.compile(r'(?:[^"\\\x00-\x1f]+|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*')
# What may end the text inside a string: the start of an escape.
_STR_TAIL = re.compile(r"\\(?:u[0-9a-fA-F]{0,3})?\Z")
# A high surrogate escape at the end of the text: its low half may follow.
_HIGH_SURROGATE_END = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}\Z")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
_NUMBER_PREFIX = re.compile(
    r"-?(?:(?:0|[1-9][0-9]*)(?:\.(?:[0-9]+(?:[eE][-+]?[0-9]*)?)?|[eE][-+]?[0-9]*)?)?\Z")
_LITERALS = {"t": ("true", True), "f": ("false", False), "n": ("null", None)}

_MISSING = object()

# What a container expects next.
_KEY_OR_CLOSE, _KEY, _COLON, _VALUE, _COMMA_OR_CLOSE = range(5)


class _Frame:
    """An open array or object and what it expects next."""

    __slots__ = ("container", "key", "state")

    def __init__(self, container: list[Any] | dict[str, Any]) -> None:
        self.container = container
        self.key: str | None = None
        # An array's first element may be "]" (as an object's first key may be "}").
        self.state = _KEY_OR_CLOSE

    def put(self, value: Any) -> None:
        if isinstance(self.container, list):
            self.container.append(value)
        else:
            self.container[self.key] = value  # type: ignore[index]
        self.state = _COMMA_OR_CLOSE


def parse_partial_json(text: str) -> Any:
    """The value the JSON prefix ``text`` determines so far (see the module docstring).

    Returns ``None`` when no value has started (or only an unfinished number or literal
    has). Raises ``TypeError`` for a ``text`` that is not a ``str`` and ``ValueError`` (with
    the position) when ``text`` cannot be the beginning of a JSON document.
    """
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    n = len(text)
    stack: list[_Frame] = []
    root: Any = _MISSING
    pos = _WS.match(text, 0).end()  # type: ignore[union-attr]
    while pos < n:
        frame = stack[-1] if stack else None
        if frame is None and root is not _MISSING:
            raise _error(text, pos, "extra data after the document")
        c = text[pos]
        if frame is not None and frame.state != _VALUE:
            is_list = isinstance(frame.container, list)
            closer = "]" if is_list else "}"
            if frame.state == _COMMA_OR_CLOSE:
                if c == ",":
                    frame.state = _VALUE if is_list else _KEY
                elif c == closer:
                    stack.pop()
                else:
                    raise _error(text, pos, f"expected ',' or {closer!r}")
                pos = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
                continue
            if frame.state == _KEY_OR_CLOSE and c == closer:
                stack.pop()
                pos = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
                continue
            if frame.state == _COLON:
                if c != ":":
                    raise _error(text, pos, "expected ':'")
                frame.state = _VALUE
                pos = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
                continue
            if is_list:  # the first element
                frame.state = _VALUE
                continue
            if c != '"':
                raise _error(text, pos, "expected a key (a string)")
            key, pos, done = _string(text, pos)
            if not done:
                break  # a key without a value is left out
            frame.key, frame.state = key, _COLON
            pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
            continue
        # A value starts here.
        if c in "[{":
            container: list[Any] | dict[str, Any] = [] if c == "[" else {}
            if frame is None:
                root = container
            else:
                frame.put(container)
            stack.append(_Frame(container))
            pos = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
            continue
        value, pos, done = _scalar(text, pos)
        if value is not _MISSING:
            if frame is None:
                root = value
            else:
                frame.put(value)
        if not done:
            break
        pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
    return None if root is _MISSING else root


def _error(text: str, pos: int, what: str) -> ValueError:
    return ValueError(f"text: not the beginning of a JSON document at character {pos} "
                      f"({what}): {text[pos:pos + 20]!r}")


def _scalar(text: str, pos: int) -> tuple[Any, int, bool]:
    """A string, number or literal at ``pos``: (value or _MISSING, end, finished)."""
    c = text[pos]
    if c == '"':
        return _string(text, pos)
    if c == "-" or "0" <= c <= "9":
        if _NUMBER_PREFIX.match(text, pos) is not None:
            return _MISSING, len(text), False   # the number may go on
        m = _NUMBER.match(text, pos)
        if m is None:
            raise _error(text, pos, "not a number")
        return json.loads(m.group()), m.end(), True
    literal = _LITERALS.get(c)
    if literal is None:
        raise _error(text, pos, "expected a value")
    word, value = literal
    rest = text[pos:pos + len(word)]
    if rest == word:
        return value, pos + len(word), True
    if word.startswith(rest) and pos + len(rest) == len(text):
        return _MISSING, len(text), False
    raise _error(text, pos, f"expected {word!r}")


def _string(text: str, pos: int) -> tuple[str, int, bool]:
    """The string whose opening quote is at ``pos``: (value so far, end, finished)."""
    end = _STR_BODY.match(text, pos + 1).end()  # type: ignore[union-attr]
    if end < len(text):
        if text[end] == '"':
            return json.loads(text[pos:end + 1]), end + 1, True
        if _STR_TAIL.match(text, end) is None:
            raise _error(text, end, "not allowed in a string")
    body = text[pos + 1:end]
    # An escaped high surrogate at the end may yet get its low half: leave it out.
    surrogate = _HIGH_SURROGATE_END.search(body)
    if surrogate is not None and _escaping(body, surrogate.start()):
        body = body[:surrogate.start()]
    return json.loads('"' + body + '"'), len(text), False


def _escaping(body: str, at: int) -> bool:
    """Whether the backslash at ``at`` starts an escape (it is not itself escaped)."""
    run = len(body[:at]) - len(body[:at].rstrip("\\"))
    return run % 2 == 0
