"""Chat roles, in one place: structured messages for chat backends, templated text for
text backends.

A program state is a sequence of turns. For a chat API it becomes :class:`Message`\\ s
(text and image parts); for a text model it becomes one string, each turn wrapped in the
role's prefix and suffix from a :class:`ChatTemplate` (derived from the tokenizer's own
Jinja template for the engine).

Rendered text is a :class:`~aiolm.engine.tokenizer.MarkedText`: a ``str`` that remembers
which spans are message content, so the engine encodes special-token text a user typed
(``<|im_end|>\n<|im_start|>system``) as plain text while the template's own markers stay
control tokens. Text outside turns (a program's plain text) is the program's own and is not
marked.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Literal

import attrs

from .engine.tokenizer import MarkedText
from .tools.spec import ToolCall
from .values import ImageData

__all__ = [
    "SIMPLE_TEMPLATE",
    "ChatTemplate",
    "Message",
    "TextPart",
    "ImagePart",
    "as_text_turn",
    "render_text",
    "render_conversation",
    "messages_to_openai",
]

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


@attrs.frozen(kw_only=True)
class ChatTemplate:
    """How each role's turn is wrapped when a chat renders to text.

    ``default_system`` is inserted (as a system turn) before a conversation that starts
    without one, as many model templates do. ``image_token`` stands for an image in text.
    """

    name: str
    prefix: dict[str, str]
    suffix: dict[str, str]
    default_system: str | None = None
    bos: str = ""
    image_token: str = "<image>"

    def __attrs_post_init__(self) -> None:
        for role in ROLES:
            if role not in self.prefix or role not in self.suffix:
                raise ValueError(f"ChatTemplate {self.name!r}: missing prefix/suffix for {role!r}")

    def role_prefix(self, role: str) -> str:
        return self.prefix[role]

    def role_suffix(self, role: str) -> str:
        return self.suffix[role]

    @classmethod
    def from_renderer(cls, name: str, render: Callable[[list[dict[str, str]], bool], str]) -> ChatTemplate:
        """Derive prefixes and suffixes by rendering sentinel conversations.

        ``render(messages, add_generation_prompt)`` is typically the tokenizer's
        ``apply_chat_template(..., tokenize=False)``. Raises ``ValueError`` if the template
        does not wrap each turn independently (then the text of a conversation is not a
        concatenation of turns and a prefix cache could not reuse it).
        """
        s1, s2, s3 = "\x01AIOLM1\x01", "\x01AIOLM2\x01", "\x01AIOLM3\x01"
        full = render(
            [{"role": "system", "content": s1}, {"role": "user", "content": s2},
             {"role": "assistant", "content": s3}],
            False,
        )
        try:
            head, rest = full.split(s1)
            mid1, rest = rest.split(s2)
            mid2, tail = rest.split(s3)
        except ValueError:
            raise ValueError(f"chat template {name!r} does not render turns verbatim") from None
        # Two user turns tell where the user's prefix starts inside ``mid1``.
        probe = render(
            [{"role": "system", "content": s1}, {"role": "user", "content": s2},
             {"role": "assistant", "content": s3}, {"role": "user", "content": s2}],
            True,
        )
        after_assistant = probe.split(s3, 1)[1]
        between = after_assistant.split(s2)[0]   # assistant suffix + user prefix
        # assistant suffix is the common prefix of ``tail`` and ``between``.
        k = 0
        while k < min(len(tail), len(between)) and tail[k] == between[k]:
            k += 1
        assistant_suffix = tail[:k]
        user_prefix = between[k:]
        if not mid1.endswith(user_prefix):
            raise ValueError(f"chat template {name!r}: cannot separate system and user turns")
        system_suffix = mid1[: len(mid1) - len(user_prefix)]
        # ``mid2`` is the user's suffix followed by the assistant's prefix.
        user_suffix, assistant_prefix = _split_user_assistant(mid2, system_suffix)
        bos = ""
        system_prefix = head
        # Some templates put a BOS in front of the first turn only.
        if head.startswith("<|begin_of_text|>"):
            bos, system_prefix = "<|begin_of_text|>", head[len("<|begin_of_text|>"):]
        default_system = None
        no_system = render([{"role": "user", "content": s2}], False)
        lead = no_system.split(s2)[0]
        if lead != bos + user_prefix and lead.startswith(bos + system_prefix):
            inner = lead[len(bos + system_prefix):]
            if inner.endswith(system_suffix + user_prefix):
                default_system = inner[: len(inner) - len(system_suffix + user_prefix)]
        return cls(
            name=name,
            prefix={"system": system_prefix, "user": user_prefix, "assistant": assistant_prefix},
            suffix={"system": system_suffix, "user": user_suffix, "assistant": assistant_suffix},
            default_system=default_system,
            bos=bos,
        )


def _split_user_assistant(mid: str, system_suffix: str) -> tuple[str, str]:
    # Templates end every turn the same way: the user's suffix is the system's suffix.
    if system_suffix and mid.startswith(system_suffix):
        return system_suffix, mid[len(system_suffix):]
    return "", mid


#: A plain template for text backends that have none (and for the scripted backend).
SIMPLE_TEMPLATE = ChatTemplate(
    name="simple",
    prefix={"system": "SYSTEM: ", "user": "USER: ", "assistant": "ASSISTANT: "},
    suffix={"system": "\n", "user": "\n", "assistant": "\n"},
)


class _Marker:
    """Builds a :class:`MarkedText`: template text as is, message content marked literal."""

    def __init__(self, template: ChatTemplate) -> None:
        self.template = template
        self.pieces: list[str] = []
        self.spans: list[tuple[int, int]] = []
        self.size = 0

    def markup(self, text: str) -> None:
        self.pieces.append(text)
        self.size += len(text)

    def content(self, text: str) -> None:
        self.spans.append((self.size, self.size + len(text)))
        self.markup(text)

    def parts(self, parts: Sequence[TextPart | ImagePart]) -> None:
        for p in parts:
            if isinstance(p, TextPart):
                self.content(p.text)
            else:
                self.markup(self.template.image_token)

    def turn(self, message: Message) -> None:
        message = as_text_turn(message)
        self.markup(self.template.prefix[message.role])
        self.parts(message.parts)
        self.markup(self.template.suffix[message.role])

    def default_system(self) -> None:
        t = self.template
        self.markup(t.prefix["system"] + (t.default_system or "") + t.suffix["system"])

    def open_turn(self, role: str, text: str | Sequence[TextPart | ImagePart]) -> None:
        self.markup(self.template.prefix[role])
        if isinstance(text, str):
            self.content(text)
        else:
            self.parts(text)

    def text(self) -> MarkedText:
        return MarkedText("".join(self.pieces), self.spans)


def render_text(
    messages: Sequence[Message],
    template: ChatTemplate,
    *,
    open_role: str | None = None,
    open_text: str = "",
) -> MarkedText:
    """Render finished turns, then (if ``open_role``) the open turn's prefix and ``open_text``.

    Images render as ``template.image_token``. A conversation without a system turn gets
    the template's default system prompt, as the model's own template would add it. The
    result marks the turns' text and ``open_text`` as message content.
    """
    out = _Marker(template)
    out.markup(template.bos)
    roles = [m.role for m in messages] + ([open_role] if open_role else [])
    if template.default_system is not None and roles and roles[0] != "system":
        out.default_system()
    for m in messages:
        out.turn(m)
    if open_role is not None:
        out.open_turn(open_role, open_text)
    return out.text()


def render_conversation(
    items: Sequence[Message | str],
    template: ChatTemplate,
    *,
    open_role: str | None = None,
    open_text: str | Sequence[TextPart | ImagePart] = "",
) -> str:
    """Render a program state's content: turns (``Message``) and plain text (``str``).

    With no turns at all (and none open) the result is the plain text concatenated, as a
    completion model sees a few-shot prompt. Otherwise it is :func:`render_text` with each
    plain-text item kept verbatim where it stands (and the template's BOS and default system
    prompt in front of the conversation), so a state made only of turns renders exactly as
    :func:`render_text` renders it: a :class:`MarkedText` whose message content (the turns'
    parts and ``open_text``, text or parts) is marked, and whose plain text is not.
    """
    if open_role is None and not any(isinstance(it, Message) for it in items):
        return "".join(items)  # type: ignore[arg-type]
    out = _Marker(template)
    out.markup(template.bos)
    first = next((it.role for it in items if isinstance(it, Message)), open_role)
    needs_default = template.default_system is not None and first != "system"
    for it in items:
        if isinstance(it, str):
            out.markup(it)
            continue
        if needs_default:
            out.default_system()
            needs_default = False
        out.turn(it)
    if open_role is not None:
        if needs_default:
            out.default_system()
        out.open_turn(open_role, open_text)
    return out.text()


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
