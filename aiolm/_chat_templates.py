"""Chat templates: how a conversation renders to text for a text model (private:
:mod:`aiolm.chat` is the public namespace).

A template the model's own Jinja template can be split into, role by role, is a
:class:`ChatTemplate` (prefixes and suffixes: a conversation is the concatenation of its
turns). One that cannot be split is a :class:`JinjaChatTemplate`, which renders each
conversation whole with the tokenizer's ``apply_chat_template``; :func:`chat_template_for`
picks between them and warns when it has to use a template whole.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from ._chat_messages import ROLES, ImagePart, Message, TextPart, as_text_turn
from .engine.tokenizer import MarkedText
from .sequences import common_prefix_length

if TYPE_CHECKING:
    from .engine.tokenizer import Tokenizer

__all__ = ["SIMPLE_TEMPLATE", "ChatTemplate", "JinjaChatTemplate", "chat_template_for",
           "render_conversation", "render_text"]


@attrs.frozen(kw_only=True)
class ChatTemplate:
    """How each role's turn is wrapped when a chat renders to text.

    A conversation renders as the concatenation of its turns, each turn's text between its
    role's ``prefix`` and ``suffix``, so a longer conversation's text extends a shorter
    one's and the prefix cache keeps hitting. ``default_system`` is inserted (as a system
    turn) before a conversation that starts without one, as many model templates do;
    ``bos`` is written once in front of the conversation. ``trim_content``: each finished
    turn's text is stripped of surrounding whitespace, as templates that ``| trim`` their
    content do (Llama-3's, Gemma's). ``image_token`` stands for an image in text.
    """

    name: str
    prefix: dict[str, str]
    suffix: dict[str, str]
    default_system: str | None = None
    bos: str = ""
    trim_content: bool = False
    image_token: str = "<image>"

    def __attrs_post_init__(self) -> None:
        for role in ROLES:
            if role not in self.prefix or role not in self.suffix:
                raise ValueError(f"ChatTemplate {self.name!r}: missing prefix/suffix for {role!r}")

    def render(self, items: Sequence[Message | str], *, open_role: str | None = None,
               open_text: str | Sequence[TextPart | ImagePart] = "") -> MarkedText:
        """``items`` (turns, and plain text kept verbatim where it stands), then the open
        turn's prefix and ``open_text`` when ``open_role`` is given; see :func:`render_text`."""
        out = _Marker(self)
        out.markup(self.bos)
        first = next((it.role for it in items if isinstance(it, Message)), open_role)
        needs_default = self.default_system is not None and first not in (None, "system")
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

    @classmethod
    def from_renderer(cls, name: str, render: Callable[[list[dict[str, str]], bool], str], *,
                      bos_token: str = "") -> ChatTemplate:
        """Derive prefixes and suffixes by rendering sentinel conversations.

        ``render(messages, add_generation_prompt)`` is typically the tokenizer's
        ``apply_chat_template(..., tokenize=False)``; ``bos_token`` the tokenizer's BOS
        text, which a template may write once in front of the conversation (Llama-3's
        ``<|begin_of_text|>``). Raises ``ValueError`` if the template does not wrap each
        turn on its own (Mistral's folds the system prompt into the first user turn): the
        derived template must render conversations with and without a system turn, of one
        and of several turns, exactly as ``render`` does. Errors of ``render`` itself (a
        template that refuses a system turn) pass through.
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
        k = common_prefix_length(tail, between)
        assistant_suffix = tail[:k]
        user_prefix = between[k:]
        if not mid1.endswith(user_prefix):
            raise ValueError(f"chat template {name!r}: cannot separate system and user turns")
        system_suffix = mid1[: len(mid1) - len(user_prefix)]
        # ``mid2`` is the user's suffix followed by the assistant's prefix.
        user_suffix, assistant_prefix = _split_user_assistant(mid2, system_suffix)
        lead = render([{"role": "user", "content": s2}], False).split(s2)[0]
        padded = f" {s2} "
        trim_content = padded not in render([{"role": "user", "content": padded}], False)
        # The text before the first turn is the system prefix, unless the template writes the
        # tokenizer's BOS once whatever the first turn is (Llama-3's): the first reading that
        # reproduces the template wins.
        for bos in dict.fromkeys(("", bos_token)):
            if not head.startswith(bos):
                continue
            system_prefix = head[len(bos):]
            default_system = None
            if lead != bos + user_prefix and lead.startswith(bos + system_prefix):
                inner = lead[len(bos + system_prefix):]
                if inner.endswith(system_suffix + user_prefix):
                    default_system = inner[: len(inner) - len(system_suffix + user_prefix)]
            template = cls(
                name=name,
                prefix={"system": system_prefix, "user": user_prefix, "assistant": assistant_prefix},
                suffix={"system": system_suffix, "user": user_suffix, "assistant": assistant_suffix},
                default_system=default_system,
                bos=bos,
                trim_content=trim_content,
            )
            if _renders_as(template, render):
                return template
        raise ValueError(f"chat template {name!r} does not render a conversation as the "
                         "concatenation of its turns")


def _split_user_assistant(mid: str, system_suffix: str) -> tuple[str, str]:
    # Templates end every turn the same way: the user's suffix is the system's suffix.
    if system_suffix and mid.startswith(system_suffix):
        return system_suffix, mid[len(system_suffix):]
    return "", mid


#: The role orders a derived template is checked on (each turn gets its own text, with
#: whitespace around it, which a template either keeps or trims in every turn).
_CHECKED_ORDERS = (("user",), ("user", "assistant", "user"), ("system", "user"),
                   ("system", "user", "assistant"), ("system", "user", "assistant", "user"))


def _renders_as(template: ChatTemplate, render: Callable[[list[dict[str, str]], bool], str]) -> bool:
    """Whether ``template`` renders every conversation of :data:`_CHECKED_ORDERS` as
    ``render`` does (finished turns; the generation prompt is not compared, as a template
    may add none while the derived assistant prefix is what generation needs)."""
    for roles in _CHECKED_ORDERS:
        turns = [Message(role=role, parts=(TextPart(text=f" \x01AIOLM{i}\x01\n"),))  # type: ignore[arg-type]
                 for i, role in enumerate(roles)]
        wanted = render([{"role": m.role, "content": m.content} for m in turns], False)
        if str(template.render(turns)) != wanted:
            return False
    return True


#: A plain template for text backends that have none (and for the scripted backend).
SIMPLE_TEMPLATE = ChatTemplate(
    name="simple",
    prefix={"system": "SYSTEM: ", "user": "USER: ", "assistant": "ASSISTANT: "},
    suffix={"system": "\n", "user": "\n", "assistant": "\n"},
)

#: Where an open turn's text starts, while a template that cannot be split renders it.
_OPEN_MARK = "\ue000aiolm-open\ue001"
#: An image part while a whole template renders the chat: the template writes it inside
#: the message's content (marked literal), so afterwards it becomes the image token as
#: markup, which encodes to the model's image token where the image stood.
_IMAGE_MARK = "\ue000aiolm-image\ue001"


@attrs.frozen(kw_only=True)
class JinjaChatTemplate:
    """A model's chat template that does not wrap each turn on its own, used whole.

    Some templates render a turn by what surrounds it (Mistral's folds the system prompt
    into the first user turn; Gemma's refuses a system turn), so no prefix and suffix per
    role reproduce them (see :meth:`ChatTemplate.from_renderer`). Then every conversation
    is rendered by ``render_chat(messages, add_generation_prompt)``: the tokenizer's own
    ``apply_chat_template`` (through :meth:`~aiolm.engine.tokenizer.Tokenizer.render_chat`,
    which marks message content). A longer conversation's text need not extend a shorter
    one's, so the prefix cache may reuse less of it; :func:`chat_template_for` warns.

    Turns render as the text turns of :func:`as_text_turn` (tool calls and answers in the
    Hermes form), images as ``image_token``. Plain text outside turns may stand before the
    first turn or after the last (with no turn open): nowhere else can it be placed.
    """

    name: str
    source: str = attrs.field(repr=False)
    render_chat: Callable[[list[dict[str, Any]], bool], MarkedText] = attrs.field(
        eq=False, repr=False)
    image_token: str = "<image>"

    def render(self, items: Sequence[Message | str], *, open_role: str | None = None,
               open_text: str | Sequence[TextPart | ImagePart] = "") -> MarkedText:
        """``items`` and the open turn rendered by the template, as :meth:`ChatTemplate.render`.

        Raises ``ValueError`` for plain text between turns (or between the last turn and
        the open one), for an open turn the template cannot start, and when the template
        refuses the conversation (its message says why).
        """
        index = [k for k, it in enumerate(items) if isinstance(it, Message)]
        if not index and open_role is None:
            return MarkedText("".join(items))  # type: ignore[arg-type]
        first, last = (index[0], index[-1]) if index else (len(items), len(items))
        between = [it for it in items[first:last + 1] if isinstance(it, str)]
        trailing = "".join(items[last + 1:]) if index else ""  # type: ignore[arg-type]
        if any(between) or (trailing and open_role is not None):
            raise ValueError(
                f"chat template {self.name!r} renders a conversation whole: text outside the "
                "chat turns can only stand before the first turn or after the last")
        chat = [self._as_dict(items[k]) for k in index]  # type: ignore[arg-type]
        if open_role is None:
            body = self.render_chat(chat, False)
        elif open_role == "assistant":
            body = self.render_chat(chat, True)
        else:
            body = self._opened(chat, open_role)
        body = self._images_as_markup(body)
        out = _Marker(self)
        if open_role is not None:
            out.parts([TextPart(text=open_text)] if isinstance(open_text, str) else open_text)
        return "".join(items[:first]) + body + out.text() + trailing  # type: ignore[arg-type]

    def _as_dict(self, message: Message) -> dict[str, str]:
        message = as_text_turn(message)
        text = "".join(p.text if isinstance(p, TextPart) else _IMAGE_MARK
                       for p in message.parts)
        return {"role": message.role, "content": text}

    def _images_as_markup(self, text: MarkedText) -> MarkedText:
        """``text`` with every image mark replaced by the image token, outside the literal
        spans (the spans cut around it and moved by the difference in length)."""
        raw = str(text)
        if _IMAGE_MARK not in raw:
            return text
        size, grow = len(_IMAGE_MARK), len(self.image_token) - len(_IMAGE_MARK)
        marks, at = [], raw.find(_IMAGE_MARK)
        while at >= 0:
            marks.append(at)
            at = raw.find(_IMAGE_MARK, at + size)

        def moved(i: int) -> int:   # i is never inside a mark
            return i + grow * sum(1 for m in marks if m + size <= i)

        spans = []
        for start, end in text.literal_spans:
            for m in (m for m in marks if start <= m < end):
                spans.append((moved(start), moved(m)))
                start = m + size
            if start < end:
                spans.append((moved(start), moved(end)))
        return MarkedText(raw.replace(_IMAGE_MARK, self.image_token), spans)

    def _opened(self, chat: list[dict[str, str]], role: str) -> MarkedText:
        """``chat`` followed by the start of a ``role`` turn, up to where its text goes."""
        text = self.render_chat([*chat, {"role": role, "content": _OPEN_MARK}], False)
        cut = str(text).find(_OPEN_MARK)
        if cut < 0:
            raise ValueError(f"chat template {self.name!r} cannot open a {role!r} turn: it "
                             "does not render the turn's text as it is")
        return MarkedText(str(text)[:cut], [s for s in text.literal_spans if s[1] <= cut])


def chat_template_for(tokenizer: Tokenizer | None, source: str | None = None, *,
                      model_name: str = "the model") -> ChatTemplate | JinjaChatTemplate:
    """The chat template text backends render chats with, for a model's ``tokenizer``:
    ``source`` (Jinja) if given, else the tokenizer's own, as role prefixes and suffixes
    (:meth:`ChatTemplate.from_renderer`); a template that cannot be split is used whole
    (:class:`JinjaChatTemplate`), with a ``UserWarning`` naming ``model_name`` (shown once
    per process by Python's default warning filter). :data:`SIMPLE_TEMPLATE` without a
    tokenizer (dummy weights) or a template.

    Raises ``ValueError`` when ``source`` has a Jinja syntax error.
    """
    if tokenizer is None or (source is None and not tokenizer.has_chat_template):
        return SIMPLE_TEMPLATE
    import jinja2

    from .engine.tokenizer import chat_template_error

    def render(messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                             chat_template=source)

    def render_whole(messages: list[dict[str, Any]], add_generation_prompt: bool) -> MarkedText:
        return tokenizer.render_chat(messages, add_generation_prompt=add_generation_prompt,
                                     chat_template=source)

    try:
        return ChatTemplate.from_renderer("model", render, bos_token=tokenizer.bos_token or "")
    except jinja2.TemplateSyntaxError as exc:
        if source is not None:
            raise chat_template_error(exc) from exc
        reason: Exception = chat_template_error(exc)
    except Exception as exc:  # whatever stops the split (a refused system turn too) says why
        reason = exc
    warnings.warn(
        f"the chat template of {model_name} does not wrap each turn on its own ({reason}); "
        "chats are rendered whole by it, so a conversation's text need not extend the one "
        "before it, and the prefix cache may reuse less of it", UserWarning, stacklevel=2)
    whole = source if source is not None else tokenizer.chat_template_source
    return JinjaChatTemplate(name="model", source=whole or "", render_chat=render_whole)


class _Marker:
    """Builds a :class:`MarkedText`: template text as is, message content marked literal."""

    def __init__(self, template: ChatTemplate | JinjaChatTemplate) -> None:
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
        self.parts(_trimmed(message.parts) if self.template.trim_content else message.parts)
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
    template: ChatTemplate | JinjaChatTemplate,
    *,
    open_role: str | None = None,
    open_text: str = "",
) -> MarkedText:
    """Render finished turns, then (if ``open_role``) the open turn's prefix and ``open_text``.

    Images render as ``template.image_token``. A conversation without a system turn gets
    the template's default system prompt, as the model's own template would add it. The
    result marks the turns' text and ``open_text`` as message content.
    """
    return template.render(messages, open_role=open_role, open_text=open_text)


def render_conversation(
    items: Sequence[Message | str],
    template: ChatTemplate | JinjaChatTemplate,
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
    return template.render(items, open_role=open_role, open_text=open_text)


def _trimmed(parts: Sequence[TextPart | ImagePart]) -> list[TextPart | ImagePart]:
    """``parts`` with the whitespace around their text stripped (as Jinja's ``trim`` strips
    a turn's content): from the text parts at the start and at the end."""
    out = list(parts)
    for step, strip in ((1, str.lstrip), (-1, str.rstrip)):
        indices = range(len(out)) if step == 1 else range(len(out) - 1, -1, -1)
        for k in indices:
            part = out[k]
            if not isinstance(part, TextPart):
                break
            out[k] = TextPart(text=strip(part.text))
            if out[k].text:
                break
    return out
