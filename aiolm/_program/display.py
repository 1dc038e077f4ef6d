"""How a program state shows itself in a notebook: its text as HTML, every generated
variable highlighted (its name in the tooltip), chat turns as labelled blocks, and the
error of a failed state. Everything the program or the model wrote is HTML-escaped."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from html import escape
from typing import Any

from .ops import CALLS, CLOSE, IMAGE, OPEN, TEXT, TOOL

__all__ = ["state_html"]

#: Background colours of highlighted variables, in order of first appearance.
_PALETTE = ("#fde68a", "#bfdbfe", "#bbf7d0", "#fbcfe8", "#ddd6fe", "#fed7aa", "#a5f3fc")
#: The left border of each role's turn.
_ROLE_COLOURS = {"system": "#9ca3af", "user": "#3b82f6", "assistant": "#10b981", "tool": "#f59e0b"}

_BOX = ("font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:13px;"
        "white-space:pre-wrap;line-height:1.45")


def state_html(*, summary: str, history: Iterable[tuple[int, Any, str | None]],
               variables: Sequence[str], error: BaseException | None) -> str:
    """The HTML of a state: ``summary`` as a header, then its ``history`` (the content
    entries ``(op kind, argument, variable)`` the state applied), a legend of
    ``variables``, and ``error`` when the state failed."""
    colours: dict[str, str] = {}
    body: list[str] = []
    depth = 0
    for kind, arg, var in history:
        if kind == TEXT:
            body.append(_marked(escape(arg), var, colours))
        elif kind == OPEN:
            body.append(_open_turn(arg))
            depth += 1
        elif kind == CLOSE:
            body.append("</div>")
            depth -= 1
        elif kind == IMAGE:
            body.append('<i style="color:#6b7280">[image]</i>')
        elif kind == CALLS:
            for call in arg:
                arguments = json.dumps(dict(call.arguments), ensure_ascii=False)
                body.append(_marked(f'<span class="aiolm-call" style="color:#92400e">[call '
                                    f"{escape(call.name)}({escape(arguments)})]</span>", var, colours))
        elif kind == TOOL:
            body.append(f"{_open_turn('tool', arg.call_id)}{escape(arg.content)}</div>")
    body.append("</div>" * depth)  # the open turn
    legend = " ".join(
        f'<span style="background:{colours[name]};border-radius:3px">{escape(name)}</span>'
        if name in colours else escape(name)
        for name in variables
    )
    head = escape(summary) + (f" · variables: {legend}" if legend else "")
    out = [f'<div class="aiolm-state" style="{_BOX}">',
           f'<div style="color:#6b7280;margin-bottom:4px;white-space:normal">{head}</div>',
           *body]
    if error is not None:
        out.append(f'<div class="aiolm-error" style="color:#b91c1c;margin-top:6px">'
                   f"<b>{escape(type(error).__name__)}</b>: {escape(str(error))}</div>")
    out.append("</div>")
    return "".join(out)


def _marked(html: str, var: str | None, colours: dict[str, str]) -> str:
    """``html`` highlighted as variable ``var``'s (its colour picked on first sight)."""
    if var is None:
        return html
    colour = colours.setdefault(var, _PALETTE[len(colours) % len(_PALETTE)])
    return (f'<span class="aiolm-var" title="{escape(var)}" style="background:{colour};'
            f'border-radius:3px">{html}</span>')


def _open_turn(role: str, call_id: str | None = None) -> str:
    colour = _ROLE_COLOURS.get(role, "#9ca3af")
    label = escape(role) + (f" ({escape(call_id)})" if call_id is not None else "")
    return (f'<div class="aiolm-turn" style="border-left:3px solid {colour};padding-left:8px;'
            f'margin:4px 0"><div style="font-weight:bold;color:{colour}">{label}</div>')
