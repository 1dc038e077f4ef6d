"""The content of a :class:`~aiolm._program.state.ProgramState` — plain text, chat turns,
images, tool calls and results, and the history of every change — and how a backend sees
it: the text prompt, the OpenAI messages, a request's prompt fields."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..backends.base import ImageData
from ..chat import (
    ImagePart,
    Message,
    TextPart,
    as_text_turn,
    messages_to_openai,
    render_conversation,
)
from ..errors import ProgramError, UnsupportedFeature
from ..values import VideoData
from .ops import CALLS, CLOSE, IMAGE, OPEN, TEXT, TOOL

if TYPE_CHECKING:
    from ..primitives import ToolResult
    from ..tools.spec import ToolCall
    from .context import RunContext
    from .ops import Op

__all__ = ["TranscriptMixin"]


class TranscriptMixin:
    """The content methods of :class:`~aiolm._program.state.ProgramState` (a mixin: the
    fields are the state's). They change and read the content now, never waiting; the
    state's queue calls the changing ones in order."""

    __slots__ = ()

    if TYPE_CHECKING:  # the ProgramState fields and method these methods use
        _run: RunContext
        _items: list[Message | str]
        _plain: list[str]
        _role: str | None
        _parts: list[str | ImageData]
        _calls: list[ToolCall]
        _images: list[ImageData]
        _tooled: bool
        _history: list[str | tuple[int, Any, str | None]]

        def _apply(self, op: Op) -> None: ...

    # ------------------------------------------------------------------ content (sync)

    def _append_text(self, text: str, var: str | None = None) -> None:
        """Append ``text``; ``var``: the gen/select variable that generated it."""
        if self._role is None:
            self._plain.append(text)
        else:
            self._parts.append(text)
        self._history.append(text if var is None else (TEXT, text, var))

    def _append_image(self, image: ImageData | VideoData) -> None:
        """Append an image, or a video's frames (a visual part: the backend sees both in
        the request's ``images``, in prompt order)."""
        if self._role is None:
            raise ProgramError("image() must be inside a turn")
        self._parts.append(image)
        self._images.append(image)
        self._history.append((IMAGE, image, None))

    def _open(self, role: str) -> None:
        if self._role is not None:
            raise ProgramError(f"cannot start a {role} turn inside the open {self._role} turn")
        if self._plain:
            self._items.append("".join(self._plain))
            self._plain.clear()
        self._role = role
        self._parts = []
        self._calls = []
        self._history.append((OPEN, role, None))

    def _close(self) -> None:
        role = self._role
        if role is None:
            raise ProgramError("no turn is open")
        self._items.append(self._open_turn())
        self._role = None
        self._parts = []
        self._calls = []
        self._history.append((CLOSE, role, None))

    def _open_turn(self) -> Message:
        return Message(role=self._role, parts=_to_parts(self._parts),  # type: ignore[arg-type]
                       tool_calls=tuple(self._calls))

    def _record_calls(self, calls: tuple[ToolCall, ...], var: str | None = None) -> None:
        """Record the tool calls a gen (of variable ``var``) made in the open assistant turn."""
        self._calls.extend(calls)
        self._tooled = True
        self._history.append((CALLS, calls, var))

    def _tool_turn(self, result: ToolResult) -> None:
        """Append a ``tool`` turn answering call ``result.call_id`` of the last assistant turn.

        Raises ``ProgramError`` inside a turn, or when no such call was made.
        """
        if self._role is not None:
            raise ProgramError(f"tool_result() is a turn of its own: append it after the "
                               f"{self._role} turn, not inside it")
        last = next((it for it in reversed(self._items)
                     if isinstance(it, Message) and it.role != "tool"), None)
        ids = [c.id for c in last.tool_calls] if last is not None else []
        if result.call_id not in ids:
            made = ", ".join(repr(i) for i in ids) or "none"
            raise ProgramError(f"tool_result: no call {result.call_id!r} in the last assistant "
                               f"turn (its calls: {made}); answer the calls of "
                               "gen(..., tools=...) right after its turn")
        if self._plain:
            self._items.append("".join(self._plain))
            self._plain.clear()
        self._items.append(Message(role="tool", parts=(TextPart(text=result.content),),
                                   tool_call_id=result.call_id))
        self._tooled = True
        self._history.append((TOOL, result, None))

    def _entries(self, start: int = 0) -> Iterator[tuple[int, Any, str | None]]:
        """The content changes from ``_history[start]`` on, as ``(kind, argument, variable)``."""
        for entry in self._history[start:]:
            yield (TEXT, entry, None) if type(entry) is str else entry  # type: ignore[misc]

    def _replay(self, kind: int, arg: Any, var: str | None) -> None:
        """Apply an entry of another state's history (a concat-join of a branch)."""
        if kind == IMAGE:
            self._append_image(arg)
        elif kind == TEXT:
            self._append_text(arg, var)
        elif kind == CALLS:
            self._record_calls(arg, var)
        else:
            self._apply((kind, arg))

    # ------------------------------------------------------------------ as a backend sees it

    def text(self) -> str:
        """The whole text so far, as a text backend sees it (roles through its chat
        template; the scripted template for chat backends; tool calls and results in the
        Hermes form, see :func:`aiolm.chat.as_text_turn`). Queued exprs are not in it."""
        return str(self._prompt())

    def _prompt(self) -> str:
        """:meth:`text` as a text backend's prompt: a ``MarkedText`` marking message content
        (see :mod:`aiolm.chat`) once there are turns."""
        items = self._items
        if self._plain:
            items = [*items, "".join(self._plain)]
        open_parts: tuple[TextPart | ImagePart, ...] = ()
        if self._role is not None:
            open_parts = as_text_turn(self._open_turn()).parts if self._calls else _to_parts(self._parts)
        return render_conversation(items, self._run.template, open_role=self._role,
                                   open_text=open_parts)

    def messages(self) -> list[dict[str, Any]]:
        """The chat turns so far (the open turn last), in the OpenAI format the ``openai``
        client takes as is: ``{"role", "content"}`` (the text, or text and ``image_url``
        parts; None for an assistant turn with only calls), plus ``tool_calls`` on an
        assistant turn that made calls and ``tool_call_id`` on a ``tool`` turn. Text outside
        turns is not a message. Queued exprs are not in it."""
        return messages_to_openai(self._turns())

    def _turns(self) -> list[Message]:
        """The chat turns so far as :class:`aiolm.Message` objects (the open turn last)."""
        out = [it for it in self._items if isinstance(it, Message)]
        if self._role is not None:
            out.append(self._open_turn())
        return out

    def _request_fields(self, *, for_gen: bool, chat: bool = False) -> dict[str, Any]:
        """The prompt part of a ``GenerateRequest`` for what this state holds now.

        ``chat``: the request goes through the chat layer (tools, reasoning, tool turns),
        which needs messages on every backend. Raises ``UnsupportedFeature`` (a chat
        backend) or ``ProgramError`` (the chat layer) when a gen is not inside an assistant
        turn or text stands outside the turns.
        """
        ctx = self._run
        if not (ctx.chat or chat):
            return {"prompt": self._prompt(), "images": tuple(self._images)}
        if for_gen:
            if ctx.chat:
                error: type[Exception] = UnsupportedFeature
                why = f"{ctx.backend.model_name} is a chat backend"
            else:
                error, why = ProgramError, "tools, reasoning and tool turns make a chat"
            if self._role != "assistant":
                raise error(f"{why}: put gen/select inside an assistant turn, e.g. "
                            "s += assistant(gen('answer'))")
            if any(isinstance(it, str) and it.strip() for it in self._items):
                raise error(f"{why}: the model cannot see text outside a turn; wrap it in "
                            "system(...) or user(...)")
        return {"messages": tuple(self._turns())}


def _to_parts(raw: list[str | ImageData]) -> tuple[TextPart | ImagePart, ...]:
    parts: list[TextPart | ImagePart] = []
    run: list[str] = []
    for p in raw:
        if type(p) is str:
            run.append(p)
            continue
        if run:
            parts.append(TextPart(text="".join(run)))
            run = []
        parts.append(ImagePart(image=p))  # type: ignore[arg-type]
    if run:
        parts.append(TextPart(text="".join(run)))
    return tuple(parts)
