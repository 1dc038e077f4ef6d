"""A transparent Backend wrapper that records every request a program issues.

The harness wraps the benchmarked backend in a :class:`RecordingBackend` to count calls
and tokens the same way for every backend (engine, transformers peer, scripted, and the
server side of the OpenAI path), and to keep each request's prompt as token ids: the input
of the offline DFS-optimal cache hit rate.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal

import attrs

from ..backends.base import Backend, Chunk, GenerateRequest, ScoreResult, Usage

__all__ = ["RecordedRequest", "RecordingBackend", "WordTokenizer"]

RequestKind = Literal["generate", "score", "prefill"]


@attrs.frozen(kw_only=True)
class RecordedRequest:
    """One request as the backend saw it.

    ``tokens`` are the prompt's token ids (a ``score`` gives one record for its prefix and
    one per choice, prefix + choice); None for chat messages, which only a server renders.
    ``usage`` is what the backend reported (None for a prefill).
    """

    kind: RequestKind
    tokens: tuple[int, ...] | None
    usage: Usage | None


class WordTokenizer:
    """Whitespace words as token ids, for backends without a tokenizer (the scripted one)."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}

    def __call__(self, text: str) -> list[int]:
        return [self._ids.setdefault(word, len(self._ids)) for word in text.split()]


class _Tap:
    """Passes chunks through; records the request when its last chunk goes by.

    An iterator object rather than an async generator, so an abandoned stream leaves no
    generator to finalize.
    """

    def __init__(self, chunks: AsyncIterator[Chunk], tokens: tuple[int, ...] | None,
                 sink: list[RecordedRequest]) -> None:
        self._chunks = chunks
        self._tokens = tokens
        self._sink = sink

    def __aiter__(self) -> _Tap:
        return self

    async def __anext__(self) -> Chunk:
        chunk = await self._chunks.__anext__()
        if chunk.finish_reason is not None:
            self._sink.append(RecordedRequest(kind="generate", tokens=self._tokens, usage=chunk.usage))
        return chunk


class RecordingBackend(Backend):
    """Forwards everything to ``inner`` and records each request and its usage.

    ``tokenize(text) -> list[int]`` turns text prompts into the ids the inner backend sees
    (the engine's own tokenizer; :class:`WordTokenizer` for others). Attributes the wrapper
    does not define (``statistics()`` …) are the inner backend's.
    """

    def __init__(self, inner: Backend, tokenize: Callable[[str], Sequence[int]] | None = None) -> None:
        if not isinstance(inner, Backend):
            raise TypeError(f"inner: expected an aiolm Backend, got {type(inner).__name__}")
        self.inner = inner
        self.capabilities = inner.capabilities
        self._tokenize = tokenize if tokenize is not None else WordTokenizer()
        self.requests: list[RecordedRequest] = []
        #: generate and score calls received (a score of many choices is one call).
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        # Only called for names this wrapper lacks: engine extras such as statistics().
        return getattr(self.inner, name)

    @property
    def chat_template(self):  # type: ignore[override]
        return self.inner.chat_template

    @property
    def model_name(self) -> str:
        return self.inner.model_name

    def new_session(self) -> Any:
        return self.inner.new_session()

    def _prompt_tokens(self, request: GenerateRequest, suffix: str = "") -> tuple[int, ...] | None:
        if request.input_ids is not None:
            return tuple(request.input_ids) + tuple(self._tokenize(suffix) if suffix else ())
        if request.prompt is not None:
            return tuple(self._tokenize(request.prompt + suffix))
        return None

    @asynccontextmanager
    async def stream(self, request: GenerateRequest) -> AsyncIterator[AsyncIterator[Chunk]]:
        tokens = self._prompt_tokens(request)
        self.calls += 1
        async with self.inner.stream(request) as chunks:
            yield _Tap(chunks.__aiter__(), tokens, self.requests)

    async def score(
        self, prefix: GenerateRequest, continuations: Sequence[str], method: str = "token_length_normalized"
    ) -> ScoreResult:
        self.calls += 1
        result = await self.inner.score(prefix, continuations, method)
        # The engine prefills the prefix once, then scores prefix + each choice.
        self.requests.append(RecordedRequest(kind="score", tokens=self._prompt_tokens(prefix), usage=None))
        for i, continuation in enumerate(continuations):
            # The usage of a score covers all its choices: give it to the first record.
            self.requests.append(
                RecordedRequest(
                    kind="score",
                    tokens=self._prompt_tokens(prefix, continuation),
                    usage=result.usage if i == 0 else None,
                )
            )
        return result

    async def prefill(self, prefix: GenerateRequest) -> None:
        await self.inner.prefill(prefix)
        self.requests.append(RecordedRequest(kind="prefill", tokens=self._prompt_tokens(prefix), usage=None))

    def usage_totals(self) -> Usage:
        """The sums of every recorded request's usage."""
        used = [r.usage for r in self.requests if r.usage is not None]
        return Usage(
            prompt_tokens=sum(u.prompt_tokens for u in used),
            completion_tokens=sum(u.completion_tokens for u in used),
            cached_tokens=sum(u.cached_tokens for u in used),
        )

    def token_sequences(self) -> list[tuple[int, ...]]:
        """The prompt token ids of every recorded request that has them, in issue order."""
        return [r.tokens for r in self.requests if r.tokens is not None]
