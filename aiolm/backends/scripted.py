"""``ScriptedBackend``: a deterministic stand-in model for tests and docs.

``reply(prompt)`` plays the model: it gets the prompt text as a text backend sees it (chat
roles rendered with :data:`aiolm.chat.SIMPLE_TEMPLATE`) and returns the continuation. The
backend streams it in pieces (one whitespace-separated word each, with its leading space),
applies ``stop`` / ``stop_regex`` / ``max_tokens`` (counting words), and raises
``ConstraintError`` when the result does not satisfy the request's constraint. Usage counts
words. With no ``reply`` it always answers :data:`DEFAULT_REPLY`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from types import TracebackType

import anyio
import anyio.lowlevel
import attrs
import regex

from ..chat import SIMPLE_TEMPLATE, ChatTemplate, ImagePart, render_text
from ..errors import ConstraintError, UnsupportedFeature
from ..sampling import SamplingParams
from ..sequences import common_prefix_length
from ..stops import StopMatcher
from .base import (
    Backend,
    Capabilities,
    Chunk,
    FinishReason,
    GenerateRequest,
    ScoreResult,
    TokenLogprob,
    Usage,
)

__all__ = ["DEFAULT_REPLY", "ScriptedBackend", "ScriptedStatistics"]

#: What a ScriptedBackend without ``reply`` answers to every prompt.
DEFAULT_REPLY = "This is a scripted reply."

_PIECE = regex.compile(r"\s*\S+|\s+")


def _words(text: str) -> int:
    return len(text.split())


@attrs.frozen(kw_only=True)
class ScriptedStatistics:
    """A snapshot of what a :class:`ScriptedBackend` was asked to do."""

    calls: int            # stream() requests
    score_calls: int      # score() requests (select)
    prefill_calls: int    # prefill() requests (forks)
    active_streams: int   # streams entered and not yet left


class ScriptedBackend(Backend):
    """A deterministic model: ``reply(prompt) -> continuation`` (see the module docstring).

    ``delay`` seconds pass between streamed pieces (0: no waiting at all). ``requests``
    lists every ``stream`` request received, in order. ``select`` picks the choice sharing
    the longest prefix with ``reply(prompt)`` (ties: the first) whatever its ``method``.
    """

    capabilities = Capabilities(
        chat_only=False, regex=True, json_schema=True, logprobs=True, images=True,
        token_ids=False, score=True,
    )

    def __init__(self, reply: Callable[[str], str] | None = None, *, delay: float = 0.0) -> None:
        if reply is not None and not callable(reply):
            raise TypeError(f"reply: expected a callable (prompt -> str), got {type(reply).__name__}")
        if isinstance(delay, bool) or not isinstance(delay, int | float):
            raise TypeError(f"delay: expected a number of seconds, got {type(delay).__name__}")
        if not math.isfinite(delay) or delay < 0:
            raise ValueError(f"delay: must be a finite number >= 0, got {delay}")
        self._reply = reply
        self._delay = float(delay)
        self._vocab: dict[str, int] = {}
        self._calls = 0
        self._score_calls = 0
        self._prefill_calls = 0
        self._active = 0
        self.requests: list[GenerateRequest] = []

    @property
    def chat_template(self) -> ChatTemplate:
        return SIMPLE_TEMPLATE

    @property
    def model_name(self) -> str:
        return "scripted"

    def statistics(self) -> ScriptedStatistics:
        """Counts of calls so far (a frozen snapshot)."""
        return ScriptedStatistics(
            calls=self._calls, score_calls=self._score_calls,
            prefill_calls=self._prefill_calls, active_streams=self._active,
        )

    def prompt_text(self, request: GenerateRequest) -> str:
        """The prompt ``reply`` sees for ``request`` (chat messages rendered as text).

        A chat request's last message, if it is the assistant's, is the open turn the
        model continues. Raises ``UnsupportedFeature`` for token-id prompts.
        """
        if request.prompt is not None:
            return request.prompt
        if request.messages is None:
            raise UnsupportedFeature("ScriptedBackend has no tokenizer: send a prompt or messages")
        messages = request.messages
        if messages and messages[-1].role == "assistant":
            last = messages[-1]
            open_text = "".join(
                SIMPLE_TEMPLATE.image_token if isinstance(p, ImagePart) else p.text for p in last.parts
            )
            return render_text(messages[:-1], SIMPLE_TEMPLATE, open_role="assistant", open_text=open_text)
        return render_text(messages, SIMPLE_TEMPLATE)

    def reply_to(self, prompt: str) -> str:
        """The model's whole continuation of ``prompt`` (before stop / max_tokens)."""
        if self._reply is None:
            return DEFAULT_REPLY
        text = self._reply(prompt)
        if not isinstance(text, str):
            raise TypeError(f"reply: must return a str, returned {type(text).__name__}")
        return text

    def stream(self, request: GenerateRequest) -> _ScriptedStream:
        """Stream the reply to ``request``. Raises ``ConstraintError`` on entry if the reply
        (after stop and max_tokens) does not satisfy ``request.constraint``, and
        ``UnsupportedFeature`` for tools or reasoning (a text model takes them through
        :func:`aiolm.tools.stream_chat`, which renders them into the prompt and parses the
        reply)."""
        if request.tools or request.reasoning is not None:
            raise UnsupportedFeature(
                "tools/reasoning: ScriptedBackend is a text model; send the request through "
                "aiolm.tools.stream_chat (programs do)"
            )
        self._calls += 1
        self.requests.append(request)
        return _ScriptedStream(self, request)

    async def score(
        self,
        prefix: GenerateRequest,
        continuations: Sequence[str],
        method: str = "token_length_normalized",
    ) -> ScoreResult:
        """Choose the continuation sharing the longest prefix with the reply (ties: first)."""
        await anyio.lowlevel.checkpoint()
        self._score_calls += 1
        if not continuations:
            raise ValueError("continuations: must not be empty")
        prompt = self.prompt_text(prefix)
        reply = self.reply_to(prompt)
        shared = [common_prefix_length(reply, c) for c in continuations]
        best = max(range(len(shared)), key=lambda i: (shared[i], -i))
        # A deterministic model gives its own reply probability 1 and the rest 0.
        normalized = tuple(0.0 if i == best else -math.inf for i in range(len(continuations)))
        per_token = tuple(
            tuple(normalized[i] for _ in range(max(_words(c), 1))) for i, c in enumerate(continuations)
        )
        return ScoreResult(
            index=best, normalized_logprobs=normalized, token_logprobs=per_token,
            usage=Usage(prompt_tokens=_words(prompt)),
        )

    async def prefill(self, prefix: GenerateRequest) -> None:
        """Nothing to cache; counts the call."""
        await anyio.lowlevel.checkpoint()
        self._prefill_calls += 1

    def _token_id(self, piece: str) -> int:
        ids = self._vocab
        tid = ids.get(piece)
        if tid is None:
            tid = ids[piece] = len(ids)
        return tid


def _truncate(text: str, sampling: SamplingParams) -> tuple[list[str], FinishReason, str | None]:
    """Apply stop strings, stop_regex and max_tokens; return the pieces to stream.

    The pieces (words) are fed one by one to the stop matcher every backend uses, so a stop
    counts once the words so far contain it; a word past ``max_tokens`` is never produced
    (whitespace after the last word is free).
    """
    pieces = _PIECE.findall(text)
    stops = StopMatcher(sampling.stop, sampling.stop_regex)
    words = 0
    for i, piece in enumerate(pieces):
        if not piece.isspace():
            if words == sampling.max_tokens:
                return pieces[:i], "length", None
            words += 1
        _, matched = stops.feed(piece)
        if matched is not None:
            return _PIECE.findall(stops.text), "stop", matched
    return pieces, "stop", None


class _ScriptedStream:
    """One request's stream: an async context manager that is its own chunk iterator."""

    __slots__ = ("_backend", "_request", "_chunks", "_next", "_entered")

    def __init__(self, backend: ScriptedBackend, request: GenerateRequest) -> None:
        self._backend = backend
        self._request = request
        self._chunks: list[Chunk] = []
        self._next = 0
        self._entered = False

    async def __aenter__(self) -> _ScriptedStream:
        await anyio.lowlevel.checkpoint()
        backend, request = self._backend, self._request
        prompt = backend.prompt_text(request)
        sampling = request.sampling
        pieces, finish, matched = _truncate(backend.reply_to(prompt), sampling)
        text = "".join(pieces)
        constraint = request.constraint
        if constraint is not None and finish != "length" and not constraint.matches_text(text):
            raise ConstraintError(
                f"ScriptedBackend: the reply {text!r} does not satisfy {constraint!r}"
            )
        ids = [backend._token_id(piece) for piece in pieces]
        logprobs: list[tuple[TokenLogprob, ...]] = [()] * len(pieces)
        if sampling.logprobs:
            logprobs = [
                (TokenLogprob(token_id=tid, token=piece, logprob=0.0,
                              top=((tid, piece, 0.0),) if sampling.top_logprobs else ()),)
                for tid, piece in zip(ids, pieces, strict=True)
            ]
        last = len(pieces) - 1
        self._chunks = [
            Chunk(text=pieces[i], token_ids=(ids[i],), logprobs=logprobs[i]) for i in range(last)
        ]
        self._chunks.append(Chunk(
            text=pieces[last] if pieces else "",
            token_ids=(ids[last],) if pieces else (),
            logprobs=logprobs[last] if pieces else (),
            finish_reason=finish,
            usage=Usage(prompt_tokens=_words(prompt), completion_tokens=_words(text)),
            matched_stop=matched,
        ))
        backend._active += 1
        self._entered = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._entered:
            self._entered = False
            self._backend._active -= 1

    def __aiter__(self) -> _ScriptedStream:
        return self

    async def __anext__(self) -> Chunk:
        i = self._next
        if i >= len(self._chunks):
            raise StopAsyncIteration
        if i and self._backend._delay:
            await anyio.sleep(self._backend._delay)
        self._next = i + 1
        return self._chunks[i]
