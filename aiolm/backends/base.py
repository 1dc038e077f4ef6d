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
from typing import TYPE_CHECKING, Any, Literal, get_args

import attrs

from ..sampling import SamplingParams
from ..values import ImageData, TokenLogprob, Usage, VideoData

if TYPE_CHECKING:
    from ..chat import ChatTemplate, Message
    from ..constraints.base import Constraint
    from ..tools.spec import Tool, ToolCall, ToolCallDelta

__all__ = [
    "Backend",
    "Capabilities",
    "Chunk",
    "Completion",
    "FinishReason",
    "GenerateRequest",
    "ImageData",
    "Reasoning",
    "SELECT_METHODS",
    "ScoreResult",
    "SelectMethod",
    "TokenLogprob",
    "Usage",
    "choose_by_method",
    "new_request_id",
]

FinishReason = Literal["stop", "length", "abort", "tool_calls"]
#: How ``select`` picks a choice (see :func:`choose_by_method`).
SelectMethod = Literal["token_length_normalized", "greedy", "unconditional_normalized"]
SELECT_METHODS: tuple[str, ...] = get_args(SelectMethod)


def new_request_id() -> str:
    return uuid.uuid4().hex


@attrs.frozen(kw_only=True)
class Capabilities:
    """What a backend can do; the program layer raises ``UnsupportedFeature`` for the rest."""

    chat_only: bool = False          # accepts only chat messages (no raw text prompts)
    regex: bool = True               # regex / grammar / choices constraints during decoding
    json_schema: bool = True
    logprobs: bool = True
    images: bool = False
    video: bool = False              # ``VideoData`` items among a request's ``images``
    token_ids: bool = True           # prompts as token ids
    score: bool = True               # ``select`` by scoring continuations


@attrs.frozen(kw_only=True)
class Reasoning:
    """How a reasoning model thinks before it answers (chat requests only).

    ``enabled``: the model thinks (its chat template's ``enable_thinking``); the thinking is
    returned apart from the answer (``Chunk.reasoning``). ``max_thinking_tokens``: at that
    many thinking tokens the end of thinking is forced, then the answer's own constraint
    applies. ``effort``: ``"low" | "medium" | "high"``, for APIs that take it (OpenAI's
    ``reasoning_effort``).
    """

    enabled: bool = True
    max_thinking_tokens: int | None = None
    effort: str | None = None

    def __attrs_post_init__(self) -> None:
        n = self.max_thinking_tokens
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ValueError(f"max_thinking_tokens: expected an int >= 0 or None, got {n!r}")
        if self.effort not in (None, "minimal", "low", "medium", "high"):
            raise ValueError(f"reasoning_effort: expected 'minimal', 'low', 'medium' or 'high', "
                             f"got {self.effort!r}")


@attrs.frozen(kw_only=True)
class GenerateRequest:
    """One generation call.

    Exactly one of ``prompt`` (text), ``input_ids`` (token ids) or ``messages`` (chat,
    for chat backends) is set. ``images`` go with a text prompt for multimodal models
    (a ``VideoData`` among them is a video, for backends whose ``Capabilities.video``).
    ``session`` is an opaque per-program-run object from :meth:`Backend.new_session`
    (speculative execution keeps its state there, not on the backend).

    ``tools``, ``tool_choice``, ``parallel_tool_calls`` and ``reasoning`` go with
    ``messages``: a chat backend takes them natively; for a text backend
    :func:`aiolm.tools.stream_chat` renders them through the model's chat template and
    parses the output (``Chunk.tool_calls``, ``Chunk.reasoning``).
    ``prompt_logprobs``: the first chunk carries the logprob of every prompt token
    (``Chunk.prompt_logprobs``; ``None`` for the first), with ``sampling.top_logprobs``
    alternatives.
    """

    prompt: str | None = None
    input_ids: tuple[int, ...] | None = None
    messages: tuple[Message, ...] | None = None
    images: tuple[ImageData | VideoData, ...] = ()
    sampling: SamplingParams = attrs.field(factory=SamplingParams)
    constraint: Constraint | None = None
    request_id: str = attrs.field(factory=new_request_id)
    session: Any = attrs.field(default=None, eq=False, hash=False)
    tools: tuple[Tool, ...] = ()
    tool_choice: str = "auto"
    parallel_tool_calls: bool = True
    reasoning: Reasoning | None = None
    prompt_logprobs: bool = False
    #: Extra keyword arguments of the chat template (``enable_thinking``, say).
    template_kwargs: tuple[tuple[str, Any], ...] = ()

    def __attrs_post_init__(self) -> None:
        given = sum(x is not None for x in (self.prompt, self.input_ids, self.messages))
        if given != 1:
            raise ValueError("GenerateRequest: give exactly one of prompt, input_ids, messages")
        if (self.tools or self.reasoning is not None) and self.messages is None:
            raise ValueError("GenerateRequest: tools and reasoning go with messages")


@attrs.frozen(kw_only=True)
class Chunk:
    """A piece of a streamed completion. The last chunk has ``finish_reason`` and ``usage``.

    ``text`` is the answer's text (the content); ``reasoning`` the thinking of a reasoning
    model; ``tool_calls`` pieces of the calls the model makes (``finish_reason`` is then
    ``"tool_calls"``). ``prompt_logprobs`` (first chunk, when the request asked): one entry
    per prompt token, ``None`` for the first.
    """

    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    matched_stop: str | int | None = None
    reasoning: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


@attrs.frozen(kw_only=True)
class Completion:
    """A whole completion: what :meth:`Backend.generate` returns."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...]
    finish_reason: FinishReason
    usage: Usage
    matched_stop: str | int | None = None
    reasoning: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


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

    @property
    def chat_template_source(self) -> str | None:
        """The model's own (Jinja) chat template, for text backends that have one."""
        return None

    def render_chat(self, messages: Sequence[dict[str, Any]], *,
                    tools: Sequence[dict[str, Any]] | None = None,
                    add_generation_prompt: bool = True, **template_kwargs: Any) -> str:
        """OpenAI-format ``messages`` (and ``tools``) rendered by the model's own chat
        template, as prompt text. Raises ``UnsupportedFeature`` where there is none."""
        from ..errors import UnsupportedFeature

        raise UnsupportedFeature(f"{self.model_name} has no chat template to render tools with")

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
        from ..tools.spec import assemble_tool_calls

        text: list[str] = []
        reasoning: list[str] = []
        ids: list[int] = []
        lps: list[TokenLogprob] = []
        calls: list[ToolCallDelta] = []
        prompt_logprobs = None
        last: Chunk | None = None
        async with self.stream(request) as chunks:
            async for chunk in chunks:
                text.append(chunk.text)
                reasoning.append(chunk.reasoning)
                ids.extend(chunk.token_ids)
                lps.extend(chunk.logprobs)
                calls.extend(chunk.tool_calls)
                if chunk.prompt_logprobs is not None:
                    prompt_logprobs = chunk.prompt_logprobs
                last = chunk
        if last is None or last.finish_reason is None:
            raise RuntimeError(f"{type(self).__name__}.stream ended without a finish reason")
        return Completion(
            text="".join(text), token_ids=tuple(ids), logprobs=tuple(lps),
            finish_reason=last.finish_reason, usage=last.usage or Usage(),
            matched_stop=last.matched_stop, reasoning="".join(reasoning),
            # A call cut by max_tokens, or one found malformed after its first pieces had
            # streamed, is left out (its text is in ``text``).
            tool_calls=assemble_tool_calls(calls, strict=False),
            prompt_logprobs=prompt_logprobs,
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
