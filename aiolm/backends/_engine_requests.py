"""The internals of :class:`aiolm.Engine` between its public calls and the engine loop.

:class:`EngineRequests` is the part of :class:`~aiolm.backends.engine.Engine` that turns
a request's prompt into text or token ids (refusing one too long for the context before
it is encoded), submits requests and commands to the loop and waits for their results,
and the engine thread's one crossing per step: the fan-out of a step's events to the
per-request streams (:meth:`EngineRequests._deliver`). Also the weak-reference ``post``
the loop thread holds, and what happens when an open engine is garbage-collected.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio

from ..chat import ChatTemplate, JinjaChatTemplate, render_text
from ..engine.multimodal import is_multimodal
from ..errors import BackendUnavailable, ContextLengthExceeded, UnsupportedFeature
from ..values import VideoData
from ._engine_plumbing import Mailbox, Pending, final_event

if TYPE_CHECKING:
    from ..engine.config import EngineConfig
    from ..engine.core import EngineCore, RequestOutput
    from ..engine.loaded import LoadedModel
    from ..engine.multimodal import MultimodalInputs
    from ..engine.tokenizer import Tokenizer
    from .base import GenerateRequest
    from .engine import Engine

__all__ = ["EngineRequests"]

_log = logging.getLogger("aiolm.engine")


class EngineRequests:
    """Prompt encoding, request and command submission, and the event fan-out of
    :class:`~aiolm.backends.engine.Engine` (a mixin: the state it reads and mutates is
    the engine's, set up by ``Engine.__init__``)."""

    config: EngineConfig
    _core: EngineCore | None
    _tokenizer: Tokenizer | None
    _template: ChatTemplate | JinjaChatTemplate
    _call_soon: Callable[..., None] | None
    _streams: dict[str, Mailbox]
    _tickets: dict[int, Pending]
    _ticket_ids: itertools.count[int]
    _failed: BaseException | None
    _closed: bool
    _loaded: LoadedModel | None
    _processor: Any
    _processed: Any
    model_name: str

    async def _command(self, post: Callable[[int], None]) -> Any:
        """Post a command to the engine loop and wait for its ``CommandDone`` value."""
        ticket = next(self._ticket_ids)
        pending = self._tickets[ticket] = Pending()
        post(ticket)
        await pending.event.wait()
        if pending.error is not None:
            raise pending.error
        return pending.value

    def _submit(self, req: Any, *, final_only: bool = False) -> Mailbox:
        """Hand ``req`` to the engine loop; its events arrive in the mailbox returned
        (``final_only``: the reader is woken for the last one only)."""
        core = self._require_core()
        if req.rid in self._streams:
            raise ValueError(f"request_id: {req.rid!r} is already running")
        mailbox = self._streams[req.rid] = Mailbox(final_only=final_only)
        core.add(req)
        return mailbox

    def _release(self, rid: str, mailbox: Mailbox, *, abort: bool) -> None:
        if self._streams.get(rid) is mailbox:
            del self._streams[rid]
        if abort and self._core is not None:
            self._core.abort(rid)
        mailbox.close()

    async def _run_to_end(self, req: Any) -> RequestOutput:
        return (await self._run_all([req]))[0]

    async def _run_all(self, reqs: Sequence[Any]) -> list[RequestOutput]:
        """Submit ``reqs`` together (one engine step sees them all); return their last events."""
        mailboxes = [self._submit(r, final_only=True) for r in reqs]
        finals: list[Any] = []
        try:
            for mailbox in mailboxes:
                finals.append(await final_event(mailbox))
        finally:
            for i, (r, mailbox) in enumerate(zip(reqs, mailboxes, strict=True)):
                self._release(r.rid, mailbox, abort=i >= len(finals))
        return finals

    def _prompt_text(self, request: GenerateRequest) -> str:
        # A chat rendered to text is a MarkedText (its message content marked): the
        # tokenizer encodes special-token text there as plain text. A plain str is raw.
        if request.prompt is not None:
            text = request.prompt
        elif request.messages is not None:
            text = render_text(request.messages, self._template, open_role="assistant")
        else:
            raise ValueError("prompt: this request has token ids, not text")
        return text if self.config.escape_special_tokens else str(text)

    def _refuse_overlong(self, chars: int) -> None:
        """Raise ContextLengthExceeded when ``chars`` characters cannot fit the context
        whatever they encode to (each token stands for at most ``max_token_chars``)."""
        tok, core = self._tokenizer, self._core
        if tok is None or core is None:
            return
        least = -(-chars // tok.max_token_chars)
        if least > core.context_len:
            raise ContextLengthExceeded(
                f"the prompt has {chars} characters, so at least {least} tokens: more than "
                f"the model's context of {core.context_len}")

    def _refuse_images(self, request: GenerateRequest) -> None:
        """Raise before anything is encoded when ``request`` has images the engine cannot
        take: ``UnsupportedFeature`` for a text-only model (or video to an image model)."""
        if not request.images:
            return
        loaded = self._loaded
        if loaded is None or not is_multimodal(loaded.model):
            raise UnsupportedFeature(f"{self.model_name} does not take images; use a "
                                     "multimodal model (LLaVA, Qwen2.5-VL)")
        if (any(isinstance(x, VideoData) for x in request.images)
                and not hasattr(loaded.model, "video_token_id")):   # H-QVL's addition
            raise UnsupportedFeature(f"{self.model_name} does not take video; use a video "
                                     "model (Qwen2.5-VL, LLaVA-NeXT-Video)")

    async def _with_images(self, ids: list[int], request: GenerateRequest,
                           ) -> tuple[list[int], MultimodalInputs | None]:
        """``ids`` with ``request``'s images in place (their placeholder runs; see
        :mod:`aiolm.engine.multimodal` for where they go), and their
        :class:`MultimodalInputs`; ``(ids, None)`` without images. Decoding and
        preprocessing run on a worker thread. Raises ``ValueError`` for an unreadable
        image or image tokens that do not match the images."""
        if not request.images:
            return ids, None
        loaded = self._loaded
        assert loaded is not None  # _refuse_images let a multimodal model's request through
        return await anyio.to_thread.run_sync(self._prepare_images, loaded, ids,
                                              request.images)

    def _prepare_images(self, loaded: LoadedModel, ids: list[int],
                        images: Sequence[Any]) -> tuple[list[int], MultimodalInputs]:
        from ..engine.multimodal import ProcessedCache, build_processor, prepare_multimodal

        if self._processor is None:
            processor = build_processor(loaded)
            self._processed = ProcessedCache()   # first: a thread seeing the processor
            self._processor = processor          # finds the cache too
        tok = self._tokenizer
        bos = tok.bos_token_id if tok is not None else loaded.model_config.bos_token_id
        return prepare_multimodal(loaded.model, self._processor, ids, images,
                                  vocab_size=loaded.model_config.vocab_size, bos_token_id=bos,
                                  cache=self._processed)

    def _prompt_ids(self, request: GenerateRequest) -> list[int]:
        if request.input_ids is not None:
            return list(request.input_ids)
        tok = self._require_tokenizer("a text prompt")
        return tok.encode(self._prompt_text(request))

    def _context_token(self) -> int:
        tok = self._require_tokenizer("select")
        bos = tok.bos_token_id
        if bos is not None:
            return int(bos)
        return int(sorted(tok.eos_token_ids)[0])

    def _require_core(self) -> EngineCore:
        if self._failed is not None:
            raise BackendUnavailable(f"the engine failed: {self._failed!r}") from self._failed
        if self._core is None:
            state = "closed" if self._closed else "not started (use `async with` or start())"
            raise BackendUnavailable(f"the engine is {state}")
        return self._core

    def _require_tokenizer(self, what: str) -> Tokenizer:
        if self._tokenizer is None:
            raise UnsupportedFeature(
                f"{what} needs a tokenizer; this engine has dummy weights (pass input_ids)"
            )
        return self._tokenizer

    # ------------------------------------------------ the engine thread's crossing
    def _post(self, events: list[Any]) -> None:
        """Called on the engine thread once per step: schedule the fan-out, never block."""
        call_soon = self._call_soon
        if call_soon is None:
            return
        with contextlib.suppress(Exception):  # the event loop is gone: nobody is listening
            call_soon(self._deliver, events)

    def _deliver(self, events: list[Any]) -> None:
        """Fan one step's events out to the streams (on the event loop; must not raise)."""
        from ..engine.core import CommandDone, EngineFailed

        streams = self._streams
        for ev in events:
            if isinstance(ev, CommandDone):
                pending = self._tickets.pop(ev.ticket, None)
                if pending is not None:
                    pending.value = ev.value
                    pending.event.set()
            elif isinstance(ev, EngineFailed):
                self._failed = ev.error
                self._fail_all(BackendUnavailable(f"the engine loop failed: {ev.error!r}"))
            else:
                mailbox = streams.get(ev.rid)
                if mailbox is not None:
                    mailbox.put(ev)

    def _fail_all(self, error: BaseException) -> None:
        from ..engine.core import RequestOutput

        for rid, mailbox in list(self._streams.items()):
            mailbox.put(RequestOutput(rid=rid, finish_reason="abort", error=error))
            mailbox.close()
        for pending in self._tickets.values():
            pending.error = error
            pending.event.set()
        self._tickets.clear()


def _weak_post(ref: weakref.ref[Engine]) -> Callable[[list[Any]], None]:
    """``Engine._post`` for the loop thread, through a weak reference to the engine (a
    no-op once the engine is collected: its finalizer has asked the loop to stop)."""
    def post(events: list[Any]) -> None:
        engine = ref()
        if engine is not None:
            engine._post(events)

    return post


def _collected_while_running(core: EngineCore, model_name: str, loaded: LoadedModel) -> None:
    """An open engine lost its last reference: stop its loop thread and say so.

    Runs on whatever thread collected the engine, maybe in the middle of another task's
    code: it only posts the shutdown to the loop's inbox and never touches an event loop.
    The weights are released for another engine once the loop thread has ended and
    dropped the core (a finalizer on the core), not before: the loop may be mid-step.
    """
    if core.failure is not None:  # the loop already stopped; collecting frees the rest
        return
    core.shutdown()
    weakref.finalize(core, setattr, loaded, "in_use", False)
    message = (f"an aiolm Engine ({model_name}) was garbage-collected while running; its "
               "engine thread is being stopped. Close engines with `await engine.aclose()` "
               "or use `async with aiolm.Engine(...) as engine:`")
    _log.warning("%s", message)
    warnings.warn(message, ResourceWarning, stacklevel=1)


def _text_chars(request: GenerateRequest) -> int:
    """How many characters of text ``request``'s prompt has (its messages' content too)."""
    return len(request.prompt or "") + sum(len(m.content) for m in request.messages or ())
