"""The async plumbing of :class:`aiolm.Engine`: the engine thread's crossing into the event
loop, the per-request chunk streams, and argument handling (private to ``backends.engine``)."""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import attrs

from ..errors import AiolmError, BackendUnavailable, EngineError
from ..sampling import SamplingParams
from .base import Chunk, GenerateRequest

if TYPE_CHECKING:
    from ..constraints.base import Constraint
    from ..engine.core import RequestOutput

__all__ = ["ChunkStream", "Mailbox", "Pending", "as_request", "final_event", "read_chat_template",
           "soon_caller", "translate_error"]


@attrs.define(eq=False)
class Pending:
    """A command posted to the engine loop, awaiting its reply (set on the event loop)."""

    event: anyio.Event = attrs.field(factory=anyio.Event)
    value: Any = None
    error: BaseException | None = None


def soon_caller() -> Callable[..., None]:
    """``call_soon(fn, *args)`` into the running event loop, callable from any thread."""
    token = anyio.lowlevel.current_token().native_token
    run_sync_soon = getattr(token, "run_sync_soon", None)  # trio.lowlevel.TrioToken
    if run_sync_soon is not None:
        return run_sync_soon
    return token.call_soon_threadsafe  # an asyncio event loop


class Mailbox:
    """One request's events from the engine loop: filled on the event loop by the step's
    fan-out (``put``), taken by the request's reader (``take``).

    Cheaper than a memory object stream where it counts, at hundreds of requests a step:
    ``put`` is a deque append, and it wakes the reader only when the reader waits (and,
    with ``final_only``, only for the request's last event); the reader takes everything
    queued in one go. An event loop that falls behind the engine therefore does less work
    per token, not more.
    """

    __slots__ = ("_items", "_waiter", "closed", "final_only")

    def __init__(self, *, final_only: bool = False) -> None:
        self._items: collections.deque[RequestOutput] = collections.deque()
        self._waiter: anyio.Event | None = None
        self.closed = False
        self.final_only = final_only

    def put(self, event: RequestOutput) -> None:
        if self.closed:
            return
        self._items.append(event)
        last = event.finish_reason is not None or event.error is not None
        if last:
            self.closed = True
        if self._waiter is not None and (last or not self.final_only):
            self._waiter.set()
            self._waiter = None

    def close(self) -> None:
        """No more events (the engine is gone, or the reader left); wakes the reader."""
        self.closed = True
        if self._waiter is not None:
            self._waiter.set()
            self._waiter = None

    async def take(self) -> list[RequestOutput]:
        """Every event queued, at least one (with ``final_only``: once the last is in).

        Raises :class:`BackendUnavailable` when the mailbox closed without the request's
        last event (the engine closed or failed underneath it).
        """
        while not self._items or (self.final_only and not self.closed):
            if self.closed:
                raise BackendUnavailable("the engine closed before the request finished")
            self._waiter = anyio.Event()
            await self._waiter.wait()
        items = list(self._items)
        self._items.clear()
        return items


class ChunkStream:
    """The async iterator ``Engine.stream`` yields: one :class:`Chunk` per engine step
    (events the mailbox held together are handed out one at a time)."""

    def __init__(self, mailbox: Mailbox) -> None:
        self._mailbox = mailbox
        self._pending: collections.deque[RequestOutput] = collections.deque()
        self.done = False

    def __aiter__(self) -> ChunkStream:
        return self

    async def __anext__(self) -> Chunk:
        if self.done:
            raise StopAsyncIteration
        if not self._pending:
            self._pending.extend(await self._mailbox.take())
        out = self._pending.popleft()
        if out.error is not None:
            self.done = True
            raise translate_error(out.error)
        if out.finish_reason is not None:
            self.done = True
        return Chunk(text=out.text, token_ids=out.token_ids, logprobs=out.logprobs,
                     finish_reason=out.finish_reason, usage=out.usage,
                     matched_stop=out.matched_stop, prompt_logprobs=out.prompt_logprobs)

    async def whole(self) -> Chunk:
        """The request's every event joined into one chunk (tokens, text and logprobs in
        order; the last event's finish and usage), for a ``final_only`` mailbox's reader:
        one wake-up for the whole completion. Raises the request's error, or
        :class:`BackendUnavailable` when the engine closed before it finished."""
        items = [*self._pending, *await self._mailbox.take()]
        self._pending.clear()
        self.done = True
        for out in items:
            if out.error is not None:
                raise translate_error(out.error)
        last = items[-1]
        if last.finish_reason is None:
            raise BackendUnavailable("the engine closed before the request finished")
        return Chunk(text="".join(o.text for o in items),
                     token_ids=tuple(t for o in items for t in o.token_ids),
                     logprobs=tuple(lp for o in items for lp in o.logprobs),
                     finish_reason=last.finish_reason, usage=last.usage,
                     matched_stop=last.matched_stop,
                     prompt_logprobs=next((o.prompt_logprobs for o in items
                                           if o.prompt_logprobs is not None), None))


def translate_error(error: BaseException) -> BaseException:
    """A request's error as the caller sees it: aiolm and argument errors as they are,
    anything else wrapped in :class:`EngineError`."""
    if isinstance(error, AiolmError | ValueError | TypeError):
        return error
    wrapped = EngineError(f"the engine failed this request: {type(error).__name__}: {error}")
    wrapped.__cause__ = error
    return wrapped


async def final_event(mailbox: Mailbox) -> RequestOutput:
    """Wait for a request's last event (raising its error); ``mailbox`` is ``final_only``."""
    out = (await mailbox.take())[-1]
    if out.error is not None:
        raise translate_error(out.error)
    if out.finish_reason is None:
        raise BackendUnavailable("the engine closed before the request finished")
    return out


def as_request(request: Any, prompt: str | None, input_ids: Sequence[int] | None,
               constraint: Constraint | None, sampling: dict[str, Any], *,
               prompt_logprobs: bool = False) -> GenerateRequest:
    """The :class:`GenerateRequest` of ``Engine.stream`` / ``generate``'s arguments.

    Raises ``TypeError`` for a missing or doubled prompt or a non-bool ``prompt_logprobs``,
    ``ValueError`` / ``TypeError`` (from :class:`SamplingParams`) for bad sampling options.
    """
    if not isinstance(prompt_logprobs, bool):
        raise TypeError(f"prompt_logprobs: expected a bool, got {type(prompt_logprobs).__name__}")
    if isinstance(request, GenerateRequest):
        if (prompt is not None or input_ids is not None or constraint is not None or sampling
                or prompt_logprobs):
            raise TypeError("request: give a GenerateRequest or prompt/sampling arguments, "
                            "not both")
        return request
    if isinstance(request, str):
        if prompt is not None:
            raise TypeError("prompt: given twice")
        prompt = request
    elif request is not None:
        if input_ids is not None:
            raise TypeError("input_ids: given twice")
        input_ids = request
    if input_ids is not None:
        ids = tuple(input_ids)
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int):
                raise TypeError(f"input_ids: expected ints, got {type(t).__name__}")
        input_ids = ids
    if (prompt is None) == (input_ids is None):
        raise TypeError("prompt: give exactly one of a prompt text or input_ids")
    return GenerateRequest(prompt=prompt, input_ids=input_ids,
                           sampling=SamplingParams(**sampling), constraint=constraint,
                           prompt_logprobs=prompt_logprobs)


def read_chat_template(value: str | os.PathLike[str] | None) -> str | None:
    """``Engine(chat_template=...)``'s Jinja source: the text itself, or a file's contents.

    A path object is a file; so is a string with neither ``{`` nor a line break (no Jinja
    template lacks both). Raises ``FileNotFoundError`` naming a missing file, ``TypeError``
    for another type, ``ValueError`` for an empty template.
    """
    if value is None:
        return None
    if isinstance(value, os.PathLike) or (isinstance(value, str)
                                           and not any(c in value for c in "{\n")):
        path = Path(value).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"chat_template: no such file: {str(path)!r}")
        source = path.read_text(encoding="utf-8")
        where = f"the file {str(path)!r}"
    elif isinstance(value, str):
        source, where = value, "the template"
    else:
        raise TypeError(f"chat_template: expected Jinja source or a path, got "
                        f"{type(value).__name__}")
    if not source.strip():
        raise ValueError(f"chat_template: {where} is empty")
    return source
