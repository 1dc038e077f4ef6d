"""The ingress's backend: aiolm's Backend protocol over the engine replicas' deployment.

:class:`RayBackend` is what the OpenAI app (:func:`aiolm.server.create_app`) runs on in the
ingress replica. It takes the model's tokenizer and chat template from one replica, so it
serves the chat routes as an engine would; for each request it computes the prompt's token
ids and their chained block hashes (what the router matches against the replicas' caches)
and takes the program's session key from the ``x-aiolm-session`` header
(:class:`SessionHeader`), then calls a replica through the deployment handle. Ray's errors
become aiolm's: a replica that died mid-request is :class:`aiolm.BackendUnavailable` (503,
which :class:`aiolm.OpenAI` retries when nothing was streamed yet). Runs on asyncio only
(Ray's futures), as Serve does.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
import attrs

from ..backends.base import Backend, Capabilities, Chunk, GenerateRequest, ScoreResult
from ..backends.openai import SESSION_HEADER
from ..cache.block_events import DEFAULT_BLOCK_SIZE, block_hashes
from ..chat import render_text
from ..errors import AiolmError, BackendUnavailable, RateLimited, UnsupportedFeature
from .wire import ReplicaInfo, RoutedRequest

__all__ = ["SESSION_HEADER", "RayBackend", "SessionHeader"]

_SESSION_BYTES = SESSION_HEADER.encode()
_MAX_SESSION_CHARS = 128
_INLINE_ENCODE_CHARS = 8192
_session: contextvars.ContextVar[str | None] = contextvars.ContextVar("aiolm_session", default=None)


class SessionHeader:
    """ASGI middleware: the ``x-aiolm-session`` header of an HTTP request becomes the session
    key of the backend requests it makes (a context variable, so every task and worker
    thread of the request sees it). Longer keys than 128 characters are cut."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        key = None
        if scope["type"] == "http":
            key = next((v.decode("latin-1")[:_MAX_SESSION_CHARS]
                        for k, v in scope.get("headers", ()) if k.lower() == _SESSION_BYTES), None)
        token = _session.set(key or None)
        try:
            await self.app(scope, receive, send)
        finally:
            _session.reset(token)


def _ray_error(exc: BaseException) -> BaseException:
    """The aiolm error for a Ray error (the replica's own aiolm error when it raised one)."""
    from ray import exceptions as rx
    from ray.serve import exceptions as sx

    cause = getattr(exc, "cause", None)
    if isinstance(exc, rx.RayTaskError) and isinstance(cause, AiolmError | ValueError | TypeError):
        return cause
    if isinstance(exc, sx.BackPressureError):
        return RateLimited(f"every engine replica is at its request limit: {exc}")
    if isinstance(exc, rx.RayActorError | rx.ActorUnavailableError):
        return BackendUnavailable(
            "the engine replica serving this request stopped (it died or is being replaced); "
            "retry the request")
    return BackendUnavailable(f"the engine replicas failed the request: {type(exc).__name__}")


@contextlib.contextmanager
def _mapped_errors():
    from ray.exceptions import RayError
    from ray.serve.exceptions import BackPressureError

    try:
        yield
    except (RayError, BackPressureError) as exc:
        raise _ray_error(exc) from exc


@attrs.define(eq=False)
class RayBackend(Backend):
    """A :class:`~aiolm.backends.Backend` over the engine replicas' deployment ``handle``.

    :meth:`start` fetches the model's :class:`~aiolm.serve_ray.wire.ReplicaInfo` from a
    replica (waiting for one to be up); the other methods raise ``BackendUnavailable``
    before it.
    """

    handle: Any
    block_size: int = DEFAULT_BLOCK_SIZE
    _info: ReplicaInfo | None = attrs.field(default=None, init=False)

    async def start(self) -> None:
        """Take the model's description from one replica."""
        with _mapped_errors():
            self._info = await self.handle.info.remote()

    def _require(self) -> ReplicaInfo:
        if self._info is None:
            raise BackendUnavailable("the Ray backend is not started (await start())")
        return self._info

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        return self._info.capabilities if self._info is not None else Capabilities()

    @property
    def model_name(self) -> str:
        return self._require().model_name

    @property
    def chat_template(self) -> Any:
        return self._require().chat_template

    @property
    def chat_template_source(self) -> str | None:
        return self._info.chat_template_source if self._info is not None else None

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (None for dummy weights without one)."""
        return self._require().tokenizer

    def render_chat(self, messages: Sequence[dict[str, Any]], *,
                    tools: Sequence[dict[str, Any]] | None = None,
                    add_generation_prompt: bool = True, **template_kwargs: Any) -> str:
        """As :meth:`aiolm.Engine.render_chat` (the replicas' tokenizer and template)."""
        info = self._require()
        if info.tokenizer is None or info.chat_template_source is None:
            raise UnsupportedFeature(f"{info.model_name} has no chat template to render with")
        return info.tokenizer.render_chat(messages, tools=tools,
                                          add_generation_prompt=add_generation_prompt,
                                          chat_template=info.chat_template_source,
                                          **template_kwargs)

    # ------------------------------------------------------------------ routing
    def prompt_ids(self, request: GenerateRequest) -> list[int] | None:
        """The token ids the engine will see for ``request`` (None where the ingress cannot
        tell: images, or no tokenizer)."""
        info = self._require()
        if request.input_ids is not None:
            return list(request.input_ids)
        if request.images or info.tokenizer is None:
            return None
        if request.prompt is not None:
            text = request.prompt
        elif request.messages is not None:
            text = render_text(request.messages, info.chat_template, open_role="assistant")
        else:
            return None
        return info.tokenizer.encode(text if info.escape_special_tokens else str(text))

    async def routed(self, request: GenerateRequest) -> RoutedRequest:
        """``request`` with its block hashes and the current session key (long prompts are
        tokenized on a worker thread)."""
        long = len(request.prompt or "") > _INLINE_ENCODE_CHARS or request.messages is not None
        ids = (await anyio.to_thread.run_sync(self.prompt_ids, request) if long
               else self.prompt_ids(request))
        hashes = tuple(block_hashes(ids, self.block_size)) if ids else ()
        return RoutedRequest(request=attrs.evolve(request, session=None), block_hashes=hashes,
                             session=_session.get())

    # ------------------------------------------------------------------ Backend
    @contextlib.asynccontextmanager
    async def stream(self, request: GenerateRequest) -> AsyncIterator[AsyncIterator[Chunk]]:
        """Start ``request`` on the replica the router picks; see :meth:`Backend.stream`."""
        routed = await self.routed(request)
        responses = self.handle.options(stream=True).stream.remote(routed)
        chunks = self._chunks(responses)
        try:
            yield chunks
        finally:
            await chunks.aclose()
            responses.cancel()

    @staticmethod
    async def _chunks(responses: Any) -> AsyncIterator[Chunk]:
        with _mapped_errors():
            async for chunk in responses:
                yield chunk

    async def score(self, prefix: GenerateRequest, continuations: Sequence[str],
                    method: str = "token_length_normalized") -> ScoreResult:
        """Score on the replica the router picks for ``prefix``."""
        routed = await self.routed(prefix)
        with _mapped_errors():
            return await self.handle.score.remote(routed, list(continuations), method)

    async def prefill(self, prefix: GenerateRequest) -> None:
        """Prefill on the replica the router picks for ``prefix``."""
        routed = await self.routed(prefix)
        with _mapped_errors():
            await self.handle.prefill.remote(routed)
