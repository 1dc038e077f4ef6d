"""Chat turns: the :class:`Message` a program state or a chat request is made of, and the
OpenAI wire form of a conversation (private: :mod:`aiolm.chat` is the public namespace)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Literal

import attrs

from .errors import UnsupportedFeature
from .tools.spec import ToolCall
from .values import ImageData

__all__ = ["ROLES", "ImagePart", "Message", "Role", "TextPart", "as_text_turn",
           "messages_to_openai"]

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant")   # the roles every template wraps


@attrs.frozen(kw_only=True)
class TextPart:
    text: str


@attrs.frozen(kw_only=True)
class ImagePart:
    image: ImageData


@attrs.frozen(kw_only=True)
class Message:
    """One chat turn: a role and its content parts (text and images, in order).

    An assistant turn may carry the ``tool_calls`` the model made; a ``tool`` turn is the
    answer to the call ``tool_call_id``.
    """

    role: Role
    parts: tuple[TextPart | ImagePart, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    @property
    def content(self) -> str:
        """The turn's text (image parts left out)."""
        return "".join(p.text for p in self.parts if isinstance(p, TextPart))

    @property
    def images(self) -> tuple[ImageData, ...]:
        return tuple(p.image for p in self.parts if isinstance(p, ImagePart))


def as_text_turn(message: Message,
                 write_calls: Callable[[Sequence[ToolCall]], str] | None = None) -> Message:
    """``message`` as a turn a template without tool syntax can render.

    A ``tool`` turn becomes a user turn holding ``<tool_response>\\n{content}\\n</tool_response>``;
    an assistant turn's calls are written after its text by ``write_calls`` (a tool
    parser's ``format_calls``), by default as ``<tool_call>\\n{"name": ..., "arguments":
    {...}}\\n</tool_call>`` blocks (the Hermes / Qwen format, which is also how those
    models' own templates render them). Other turns are returned as they are.
    """
    if message.role == "tool":
        body = f"<tool_response>\n{message.content}\n</tool_response>"
        return Message(role="user", parts=(TextPart(text=body),))
    if not message.tool_calls:
        return message
    if write_calls is not None:
        calls = write_calls(message.tool_calls)
    else:
        calls = "\n".join(
            "<tool_call>\n" + json.dumps({"name": c.name, "arguments": dict(c.arguments)},
                                         ensure_ascii=False) + "\n</tool_call>"
            for c in message.tool_calls)
    lead: tuple[TextPart | ImagePart, ...] = message.parts
    if message.content:
        lead = (*lead, TextPart(text="\n"))
    return Message(role=message.role, parts=(*lead, TextPart(text=calls)))


def messages_to_openai(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Chat messages in the OpenAI wire format, as the ``openai`` client sends them.

    ``content`` is the text, or a list of text and ``image_url`` parts (images as base64
    data URLs or their URLs) when the turn has images. An assistant turn with calls has
    ``tool_calls`` (its ``content`` is None when it wrote no text); a ``tool`` turn has
    ``tool_call_id``.
    """
    return [_message_to_openai(m) for m in messages]


def _message_to_openai(m: Message) -> dict[str, Any]:
    import base64

    content: str | list[dict[str, Any]] | None
    if m.images:
        content = []
        for p in m.parts:
            if isinstance(p, TextPart):
                if p.text:
                    content.append({"type": "text", "text": p.text})
            else:
                img = p.image
                if not isinstance(img, ImageData):  # a video's frames (aiolm.video)
                    raise UnsupportedFeature("video: the OpenAI chat format has no video part; "
                                             "messages() cannot show a turn with a video")
                url = img.url or f"data:{img.mime};base64,{base64.b64encode(img.data or b'').decode()}"
                content.append({"type": "image_url", "image_url": {"url": url}})
    else:
        content = m.content
    out: dict[str, Any] = {"role": m.role, "content": content}
    if m.tool_calls:
        out["content"] = content or None
        out["tool_calls"] = [c.to_openai() for c in m.tool_calls]
    if m.role == "tool":
        out["tool_call_id"] = m.tool_call_id
    return out
