"""Parsing OpenAI chat ``messages`` into :class:`aiolm.chat.Message`\\ s (400 naming the
message and field on anything wrong).

Roles: ``system`` (and ``developer``, its newer name), ``user``, ``assistant`` (its
``content`` may be null when it carries ``tool_calls``) and ``tool`` (the answer to the
call ``tool_call_id`` of an earlier assistant message). Content is a string or a list of
``text`` and ``image_url`` parts.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from ..backends.base import ImageData
from ..chat import ImagePart, Message, TextPart
from ..tools.spec import ToolCall
from .fields import bad

__all__ = ["parse_messages"]

_ROLES = ("system", "user", "assistant", "tool")


def parse_messages(value: Any, *, tools: bool = True) -> list[Message]:
    """The conversation ``value``; ``tools=False`` refuses tool turns and calls (a route
    that renders without the model's own template cannot write them)."""
    if not isinstance(value, list) or not value:
        raise bad("messages", "expected a non-empty list of messages")
    out: list[Message] = []
    call_ids: set[str] = set()
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, "expected an object")
        role = m.get("role")
        role = "system" if role == "developer" else role
        allowed = _ROLES if tools else _ROLES[:3]
        if role not in allowed:
            raise bad(f"{where}.role", f"unsupported role {role!r} ({', '.join(allowed)})")
        parts = _parts(m.get("content"), f"{where}.content")
        if role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise bad(f"{where}.tool_call_id", "a tool message needs the id of the call it "
                                                    "answers (a string)")
            if call_id not in call_ids:
                raise bad(f"{where}.tool_call_id", f"no earlier assistant message made a call "
                                                    f"with id {call_id!r}")
            out.append(Message(role="tool", parts=parts, tool_call_id=call_id))
            continue
        calls: tuple[ToolCall, ...] = ()
        if role == "assistant" and m.get("tool_calls") is not None:
            if not tools:
                raise bad(f"{where}.tool_calls", "tool calls are not taken on this route")
            calls = _tool_calls(m["tool_calls"], f"{where}.tool_calls")
            call_ids.update(c.id for c in calls)
        out.append(Message(role=role, parts=parts, tool_calls=calls))
    return out


def _tool_calls(value: Any, param: str) -> tuple[ToolCall, ...]:
    """An assistant message's ``tool_calls``: ``[{"id", "type": "function", "function":
    {"name", "arguments": "<JSON object>"}}]``."""
    if not isinstance(value, list):
        raise bad(param, "expected a list of tool calls")
    calls = []
    for j, call in enumerate(value):
        where = f"{param}[{j}]"
        if not isinstance(call, dict):
            raise bad(where, "expected an object")
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            raise bad(f"{where}.id", "expected the call's id (a non-empty string)")
        if call.get("type", "function") != "function":
            raise bad(f"{where}.type", f"expected 'function', got {call.get('type')!r}")
        function = call.get("function")
        if not isinstance(function, dict):
            raise bad(f"{where}.function", "expected an object with name and arguments")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise bad(f"{where}.function.name", "expected the function's name (a non-empty string)")
        raw = function.get("arguments", "{}")
        arguments = raw
        if isinstance(raw, str):
            try:
                arguments = json.loads(raw or "{}")
            except ValueError:
                raise bad(f"{where}.function.arguments", "not valid JSON") from None
        if not isinstance(arguments, dict):
            raise bad(f"{where}.function.arguments", "expected a JSON object (as a string)")
        calls.append(ToolCall(id=call_id, name=name, arguments=arguments))
    return tuple(calls)


def _parts(content: Any, param: str) -> tuple[TextPart | ImagePart, ...]:
    if content is None:
        return ()
    if isinstance(content, str):
        return (TextPart(text=content),)
    if not isinstance(content, list):
        raise bad(param, "expected a string or a list of content parts")
    parts: list[TextPart | ImagePart] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(TextPart(text=part["text"]))
        elif kind == "image_url" and isinstance(part.get("image_url"), dict | str):
            spec = part["image_url"]
            url = spec.get("url") if isinstance(spec, dict) else spec
            parts.append(ImagePart(image=_image(url, param)))
        else:
            raise bad(param, "content parts must be {'type': 'text'} or {'type': 'image_url'}")
    return tuple(parts)


def _image(url: Any, param: str) -> ImageData:
    if not isinstance(url, str):
        raise bad(param, "image_url.url must be a string")
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        if not header.endswith(";base64"):
            raise bad(param, "image data URLs must be base64")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise bad(param, "image data URL is not valid base64") from None
        return ImageData(data=raw, mime=header[5:-7] or "image/png")
    if url.startswith(("http://", "https://")):
        return ImageData(url=url)
    raise bad(param, "image_url.url must be a data: or http(s) URL")
