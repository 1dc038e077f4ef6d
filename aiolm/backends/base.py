"""The one async interface every backend implements, and the values that cross it.

A program never talks to a model directly: it builds a :class:`GenerateRequest` and reads
:class:`Chunk`\\ s from ``backend.stream(request)``, or asks ``backend.score(...)`` for a
``select``. Foreign errors are translated at this boundary into :mod:`aiolm.errors`.
"""

from __future__ import annotations

import abc
import math
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Literal

import attrs

from ..sampling import SamplingParams

if TYPE_CHECKING:
    from ..chat import ChatTemplate, Message
    from ..constraints.base import Constraint

__all__ = [
    "Backend",
    "Capabilities",
    "Chunk",
    "Completion",
    "FinishReason",
    "GenerateRequest",
    "ImageData",
    "ScoreResult",
    "TokenLogprob",
    "Usage",
    "choose_by_method",
    "new_request_id",
]

FinishReason = Literal["stop", "length", "abort"]


def new_request_id() -> str:
    return uuid.uuid4().hex


@attrs.frozen(kw_only=True)
class ImageData:
    """A loaded image: raw bytes and their MIME type, or a URL the backend fetches itself."""

    data: bytes | None = None
    mime: str = "image/png"
    url: str | None = None

    @property
    def digest(self) -> str:
        """A stable content hash (used as the image's key in the engine's prefix cache)."""
        import hashlib

        return hashlib.sha256(self.data if self.data is not None else (self.url or "").encode()).hexdigest()


@attrs.frozen(kw_only=True)
class Capabilities:
    """What a backend can do; the program layer raises ``UnsupportedFeature`` for the rest."""

    chat_only: bool = False          # accepts only chat messages (no raw text prompts)
    regex: bool = True               # regex / grammar / choices constraints during decoding
    json_schema: bool = True
    logprobs: bool = True
    images: bool = False
    token_ids: bool = True           # prompts as token ids
    score: bool = True               # ``select`` by scoring continuations


@attrs.frozen(kw_only=True)
class GenerateRequest:
    """One generation call.

    Exactly one of ``prompt`` (text), ``input_ids`` (token ids) or ``messages`` (chat,
    for chat backends) is set. ``images`` go with a text prompt for multimodal models.
    ``session`` is an opaque per-program-run object from :meth:`Backend.new_session`
    (speculative execution keeps its state there, not on the backend).
    """

    prompt: str | None = None
    input_ids: tuple[int, ...] | None = None
    messages: tuple[Message, ...] | None = None
    images: tuple[ImageData, ...] = ()
    sampling: SamplingParams = attrs.field(factory=SamplingParams)
    constraint: Constraint | None = None
    request_id: str = attrs.field(factory=new_request_id)
    session: Any = attrs.field(default=None, eq=False, hash=False)

    def __attrs_post_init__(self) -> None:
        given = sum(x is not None for x in (self.prompt, self.input_ids, self.messages))
        if given != 1:
            raise ValueError("GenerateRequest: give exactly one of prompt, input_ids, messages")


@attrs.frozen(kw_only=True)
class TokenLogprob:
    """The logprob of one generated token, and the top alternatives if asked for."""

    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()


@attrs.frozen(kw_only=True)
class Usage:
    """Token counts of one request. ``cached_tokens`` were served from the prefix cache."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@attrs.frozen(kw_only=True)
class Chunk:
    """A piece of a streamed completion. The last chunk has ``finish_reason`` and ``usage``."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    matched_stop: str | int | None = None


@attrs.frozen(kw_only=True)
class Completion:
    """A whole completion: what :meth:`Backend.generate` returns."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...]
    finish_reason: FinishReason
    usage: Usage
    matched_stop: str | int | None = None


@attrs.frozen(kw_only=True)
class ScoreResult:
    """The outcome of scoring ``select`` choices.

    ``index`` is the chosen choice. ``normalized_logprobs[i]`` is the mean token logprob of
    choice ``i``; ``token_logprobs[i]`` its per-token logprobs; ``unconditional_logprobs``
    the per-token logprobs of each choice with no prompt (only for that method).
    """

    index: int
    normalized_logprobs: tuple[float, ...]
    token_logprobs: tuple[tuple[float, ...], ...]
    unconditional_logprobs: tuple[tuple[float, ...], ...] | None = None
    usage: Usage = attrs.field(factory=Usage)


def choose_by_method(
    method: str,
    token_logprobs: Sequence[Sequence[float]],
    *,
    greedy_matches: Sequence[int] | None = None,
    unconditional_logprobs: Sequence[Sequence[float]] | None = None,
) -> tuple[int, tuple[float, ...]]:
    """Pick a choice from per-token logprobs with one of ``select``'s methods.

    Returns ``(index, normalized_logprobs)``. Ties go to the first choice.

    - ``token_length_normalized``: highest mean token logprob.
    - ``greedy``: the choice greedy decoding follows for the most tokens
      (``greedy_matches[i]``), ties broken by mean logprob.
    - ``unconditional_normalized``: highest mean of (logprob given prompt − logprob without).
    """
    normalized = tuple(
        (sum(lp) / len(lp)) if lp else -math.inf for lp in token_logprobs
    )
    if method == "token_length_normalized":
        keys = [(n,) for n in normalized]
    elif method == "greedy":
        if greedy_matches is None:
            raise ValueError("greedy select needs greedy_matches")
        keys = [(greedy_matches[i], normalized[i]) for i in range(len(normalized))]
    elif method == "unconditional_normalized":
        if unconditional_logprobs is None:
            raise ValueError("unconditional_normalized select needs unconditional_logprobs")
        keys = []
        for cond, unc in zip(token_logprobs, unconditional_logprobs, strict=True):
            diff = [c - u for c, u in zip(cond, unc, strict=True)]
            keys.append((sum(diff) / len(diff) if diff else -math.inf,))
    else:
        raise ValueError(f"method: unknown select method {method!r}")
    best = max(range(len(keys)), key=lambda i: (keys[i], -i))
    return best, normalized


class Backend(abc.ABC):
    """The async interface of every model backend.

    Implementations: :class:`aiolm.Engine` (in-process), :class:`aiolm.OpenAI`,
    :class:`aiolm.backends.ScriptedBackend`. All methods may be called concurrently from
    many tasks; none blocks the event loop.
    """

    #: What this backend supports.
    capabilities: Capabilities = Capabilities()

    @property
    def chat_template(self) -> ChatTemplate | None:
        """How chat roles render into prompt text, for text backends (None: chat-only)."""
        return None

    @property
    def model_name(self) -> str:
        return type(self).__name__

    @abc.abstractmethod
    def stream(self, request: GenerateRequest) -> AbstractAsyncContextManager[AsyncIterator[Chunk]]:
        """Start ``request``; the context manager yields an async iterator of chunks.

        Leaving the block before the last chunk aborts the request and frees what it holds
        (KV slots, connections) without waiting. Raises :class:`aiolm.BackendError`
        subclasses, :class:`aiolm.EngineError`, :class:`aiolm.ConstraintError` or
        :class:`aiolm.UnsupportedFeature`, either on entry or while iterating.
        """

    async def generate(self, request: GenerateRequest) -> Completion:
        """Run ``request`` to the end and return the whole completion."""
        text: list[str] = []
        ids: list[int] = []
        lps: list[TokenLogprob] = []
        last: Chunk | None = None
        async with self.stream(request) as chunks:
            async for chunk in chunks:
                text.append(chunk.text)
                ids.extend(chunk.token_ids)
                lps.extend(chunk.logprobs)
                last = chunk
        if last is None or last.finish_reason is None:
            raise RuntimeError(f"{type(self).__name__}.stream ended without a finish reason")
        return Completion(
            text="".join(text), token_ids=tuple(ids), logprobs=tuple(lps),
            finish_reason=last.finish_reason, usage=last.usage or Usage(),
            matched_stop=last.matched_stop,
        )

    @abc.abstractmethod
    async def score(
        self,
        prefix: GenerateRequest,
        continuations: Sequence[str],
        method: str = "token_length_normalized",
    ) -> ScoreResult:
        """Score each continuation after ``prefix`` (its prompt/messages; sampling ignored).

        The engine prefills the prefix once and scores all continuations in one batch.
        Raises :class:`aiolm.UnsupportedFeature` where the backend cannot score.
        """

    async def prefill(self, prefix: GenerateRequest) -> None:
        """Compute and cache ``prefix`` (a fork's shared prompt) before branches start.

        The default does nothing (backends without a prefix cache).
        """
        return None

    def new_session(self) -> Any:
        """A fresh per-program-run object passed back in ``GenerateRequest.session``."""
        return None

    async def aclose(self) -> None:
        """Release the backend's resources. The default does nothing."""
        return None
