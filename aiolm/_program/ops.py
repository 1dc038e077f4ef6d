"""Exprs compiled into the flat list of ops a program state's stream executes in order.

An op is a ``(kind, argument)`` tuple. ``TEXT``/``OPEN``/``CLOSE``/``TOOL`` (and the
internal scope, join and call-recording ops) change the state synchronously;
``GEN``/``SELECT``/``IMAGE``/``VIDEO`` need the backend (or file I/O) and are awaited by the state's
stream task.
"""

from __future__ import annotations

from typing import Any

from ..errors import ProgramError
from ..primitives import (
    Concat,
    Expr,
    Gen,
    Image,
    Role,
    Select,
    Text,
    ToolResult,
    Video,
    as_expr,
)

__all__ = [
    "ASYNC_KINDS",
    "CALLS",
    "CLOSE",
    "GEN",
    "IMAGE",
    "JOIN",
    "OPEN",
    "SCOPE_BEGIN",
    "SCOPE_END",
    "SELECT",
    "TEXT",
    "TOOL",
    "VIDEO",
    "compile_expr",
]

TEXT, OPEN, CLOSE, GEN, SELECT, IMAGE, SCOPE_BEGIN, SCOPE_END, JOIN, TOOL, CALLS, VIDEO = range(12)
ASYNC_KINDS = frozenset((GEN, SELECT, IMAGE, VIDEO))

Op = tuple[int, Any]


def compile_expr(value: object, role: str | None) -> tuple[list[Op], list[str]]:
    """Flatten ``value`` into ops, given the turn ``role`` open when it will run.

    Returns ``(ops, names)``: ``names`` are the variables the ops will set. Turns inside an
    expr are always closed again, so the open role after the ops is ``role``.
    Raises ``ProgramError`` for a turn opened inside another turn or an image outside a
    turn, and ``TypeError`` for a value that is not an expr (see ``as_expr``).
    """
    ops: list[Op] = []
    names: list[str] = []
    _walk(as_expr(value), role, ops, names)
    return ops, names


def _walk(expr: Expr, role: str | None, ops: list[Op], names: list[str]) -> None:
    if isinstance(expr, Text):
        if expr.text:
            if ops and ops[-1][0] == TEXT:
                ops[-1] = (TEXT, ops[-1][1] + expr.text)
            else:
                ops.append((TEXT, expr.text))
    elif isinstance(expr, Concat):
        for part in expr.parts:
            _walk(part, role, ops, names)
    elif isinstance(expr, Gen):
        if expr.chat and role != "assistant":
            what = "tools" if expr.tools else "reasoning"
            where = f"the open {role} turn" if role is not None else "no turn"
            raise ProgramError(
                f"gen({expr.name!r}) with {what} must be inside an assistant turn, not in "
                f"{where}: s += assistant(gen({expr.name!r}, ...))"
            )
        ops.append((GEN, expr))
        if expr.name is not None:
            names.append(expr.name)
    elif isinstance(expr, Select):
        ops.append((SELECT, expr))
        names.append(expr.name)
    elif isinstance(expr, Role):
        if role is not None:
            raise ProgramError(
                f"cannot start a {expr.role} turn inside the open {role} turn; "
                f"close the {role} turn first"
            )
        ops.append((OPEN, expr.role))
        _walk(expr.body, expr.role, ops, names)
        ops.append((CLOSE, expr.role))
    elif isinstance(expr, ToolResult):
        if role is not None:
            raise ProgramError(
                f"tool_result() is a turn of its own: append it after the {role} turn, "
                "not inside it"
            )
        ops.append((TOOL, expr))
    elif isinstance(expr, Image):
        if role is None:
            raise ProgramError(
                "image() must be inside a turn, e.g. s += user(image(path) + 'Describe it.')"
            )
        ops.append((IMAGE, expr))
    elif isinstance(expr, Video):
        if role is None:
            raise ProgramError(
                "video() must be inside a turn, e.g. s += user(video(path) + 'What happens?')"
            )
        ops.append((VIDEO, expr))
    else:  # a user's own Expr subclass: nothing knows how to run it
        raise TypeError(f"cannot append a {type(expr).__name__} to a program state")
