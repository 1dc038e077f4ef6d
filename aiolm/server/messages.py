"""OpenAI chat ``messages`` (validated as :class:`~.bodies.MessageBody`) as
:class:`aiolm.chat.Message`\\ s, with what the models cannot check alone (400 naming the
message and field).

Roles: ``system`` (and ``developer``, its newer name), ``user``, ``assistant`` (its
``content`` may be null when it carries ``tool_calls``) and ``tool`` (the answer to the
call ``tool_call_id`` of an earlier assistant message). Content is a string or a list of
``text`` and ``image_url`` parts; an image is a base64 ``data:`` URL or an http(s) URL.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

from ..backends.base import ImageData
from ..chat import ImagePart, Message, TextPart
from ..tools.spec import ToolCall
from .bodies import ImagePartBody, MessageBody
from .errors import bad

__all__ = ["to_messages"]


def to_messages(bodies: Sequence[MessageBody], *, tools: bool = True) -> list[Message]:
    """The conversation ``bodies``; ``tools=False`` refuses tool turns and calls (a route
    that renders without the model's own template cannot write them)."""
    out: list[Message] = []
    call_ids: set[str] = set()
    for i, m in enumerate(bodies):
        where = f"messages[{i}]"
        role = "system" if m.role == "developer" else m.role
        if not tools and role == "tool":
            raise bad(f"{where}.role", "tool messages are not taken on this route "
                                       "(system, user, assistant)")
        parts = _parts(m, f"{where}.content")
        if role == "tool":
            if not m.tool_call_id:
                raise bad(f"{where}.tool_call_id", "a tool message needs the id of the call it "
                                                    "answers (a string)")
            if m.tool_call_id not in call_ids:
                raise bad(f"{where}.tool_call_id", f"no earlier assistant message made a call "
                                                    f"with id {m.tool_call_id!r}")
            out.append(Message(role="tool", parts=parts, tool_call_id=m.tool_call_id))
            continue
        calls: tuple[ToolCall, ...] = ()
        if role == "assistant" and m.tool_calls is not None:
            if not tools:
                raise bad(f"{where}.tool_calls", "tool calls are not taken on this route")
            calls = tuple(ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments)
                          for c in m.tool_calls)
            call_ids.update(c.id for c in calls)
        out.append(Message(role=role, parts=parts, tool_calls=calls))
    return out


def _parts(message: MessageBody, param: str) -> tuple[TextPart | ImagePart, ...]:
    content = message.content
    if content is None:
        return ()
    if isinstance(content, str):
        return (TextPart(text=content),)
    return tuple(ImagePart(image=_image(part, param)) if isinstance(part, ImagePartBody)
                 else TextPart(text=part.text) for part in content)


def _image(part: ImagePartBody, param: str) -> ImageData:
    url = part.url
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
