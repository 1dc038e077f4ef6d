"""``aiolm.OpenAI``: completion and chat models behind an OpenAI-compatible API.

Built on the official SDK (``openai.AsyncOpenAI``; inject your own ``client`` to point it
anywhere, e.g. at ``aiolm serve``). The SDK's retries are off: this backend retries 429,
5xx, connection errors, timeouts and malformed bodies through ``tenacity`` (exponential
backoff with jitter, honouring ``Retry-After``; one hook counts every attempt) and maps
every failure into :mod:`aiolm.errors`.

API speculative execution (``spec_tokens``) lets one call answer several consecutive
``gen``\\ s; see :mod:`aiolm.backends._speculative` and ``docs/openai.md``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import re
import uuid
import weakref
from collections.abc import AsyncIterator, Sequence
from typing import Any

import attrs

from ..chat import SIMPLE_TEMPLATE, ChatTemplate, Message, TextPart, messages_to_openai, render_text
from ..errors import BackendError, ConstraintError, UnsupportedFeature
from ..sampling import SamplingParams
from . import _openai_score
from ._openai_errors import RetryPolicy, retrying
from ._openai_stream import stream_call
from ._openai_tokens import local_encoding, token_texts
from ._openai_wire import (
    chat_fields,
    constraint_fields,
    parse_choice_json,
    read_chat_logprobs,
    read_completion_logprobs,
    read_usage,
    split_open_turn,
    the_choice,
)
from ._speculative import Cut, SpecSession, Speculation, sampling_key, speculable
from .base import Backend, Capabilities, Chunk, GenerateRequest, ScoreResult, Usage

__all__ = ["SESSION_HEADER", "OpenAI", "OpenAIStatistics"]

#: The header naming the program run a request belongs to (one key per ``new_session()``,
#: forks included), so that a router in front of several replicas (aiolm on Ray Serve) keeps
#: a program's requests on the replica whose cache holds what it computed so far.
SESSION_HEADER = "x-aiolm-session"
_session_key: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "aiolm_openai_session", default=None)


async def _send_session_key(request: Any) -> None:
    """httpx request hook: the current program run's session key as :data:`SESSION_HEADER`."""
    key = _session_key.get()
    if key is not None:
        request.headers[SESSION_HEADER] = key

# Families served only by /v1/completions; every other model name is taken for a chat model.
_COMPLETION_MODELS = re.compile(r"^(gpt-3\.5-turbo-instruct|davinci|babbage|text-|code-)")
# Reasoning models that refuse logprobs.
_NO_LOGPROBS = re.compile(r"^(o\d|gpt-5)")


@attrs.frozen(kw_only=True)
class OpenAIStatistics:
    """A snapshot of an :class:`OpenAI` backend's counters.

    ``calls`` counts HTTP attempts (``retries`` of them were repeats); ``calls_saved`` counts
    requests answered from a speculation with no call; ``speculative_calls`` the calls that
    speculated; ``speculation_misses`` speculations that could not answer their request.
    """

    calls: int
    retries: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    speculative_calls: int
    calls_saved: int
    speculation_misses: int


@attrs.define(eq=False)
class _Counters:
    calls: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    speculative_calls: int = 0
    calls_saved: int = 0
    speculation_misses: int = 0

    def add_usage(self, usage: Usage | None) -> None:
        if usage is not None:
            self.prompt_tokens += usage.prompt_tokens
            self.completion_tokens += usage.completion_tokens
            self.cached_tokens += usage.cached_tokens


class OpenAI(Backend):
    """A model behind the OpenAI API (or any server that speaks it, such as ``aiolm serve``).

    ``chat``: True for a chat model (``/v1/chat/completions``), False for a completion model
    (``/v1/completions``); None guesses from ``model`` (the legacy ``*-instruct``, ``davinci``
    and ``babbage`` models are completion models, everything else chat). ``spec_tokens``
    turns on API speculative execution for every run (``new_session(spec_tokens=...)``
    overrides it per run). ``aiolm_server`` says whether the server is ``aiolm serve`` (None:
    asked from ``/v1/models`` when an extension is needed). ``client`` is an
    ``openai.AsyncOpenAI`` (its own retries are switched off on a copy); otherwise one is
    built from ``base_url`` / ``api_key`` (or the SDK's environment variables).
    """

    def __init__(
        self,
        model: str,
        *,
        client: Any = None,
        base_url: str | None = None,
        api_key: str | None = None,
        chat: bool | None = None,
        spec_tokens: int | None = None,
        max_retries: int = 4,
        timeout: float = 60.0,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        spec_max_tries: int = 3,
        chat_template: ChatTemplate | None = None,
        aiolm_server: bool | None = None,
    ) -> None:
        if not isinstance(model, str) or not model:
            raise TypeError(f"model: expected a non-empty str, got {model!r}")
        if spec_tokens is not None and (isinstance(spec_tokens, bool) or not isinstance(spec_tokens, int) or spec_tokens < 1):
            raise ValueError(f"spec_tokens: expected a positive int or None, got {spec_tokens!r}")
        if not isinstance(spec_max_tries, int) or spec_max_tries < 1:
            raise ValueError(f"spec_max_tries: expected a positive int, got {spec_max_tries!r}")
        if not timeout > 0:
            raise ValueError(f"timeout: must be > 0, got {timeout!r}")
        self._retry = RetryPolicy(max_retries=max_retries, base_delay=backoff, max_delay=max_backoff)
        import openai

        if client is None:
            try:
                client = openai.AsyncOpenAI(
                    base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout,
                    http_client=openai.DefaultAsyncHttpxClient(
                        timeout=timeout, event_hooks={"request": [_send_session_key]}))
            except openai.OpenAIError as exc:  # no key given and none in the environment
                raise ValueError(f"api_key: {exc}") from exc
            self._owns_client = True
        else:
            if base_url is not None or api_key is not None:
                raise ValueError("base_url/api_key: give them to your client, not with client=")
            client = client.with_options(max_retries=0, timeout=timeout)
            self._owns_client = False
        self._client = client
        self._model = model
        self._chat = chat if chat is not None else not _COMPLETION_MODELS.match(model.lower())
        self._template = chat_template or SIMPLE_TEMPLATE
        self._spec_tokens = spec_tokens
        self._spec_max_tries = spec_max_tries
        self._aiolm_server = aiolm_server
        self._encoding = local_encoding(model)
        self._stats = _Counters()
        self._session_keys: weakref.WeakKeyDictionary[SpecSession, str] = weakref.WeakKeyDictionary()
        logprobs = not _NO_LOGPROBS.match(model.lower())
        extensions = aiolm_server is not False
        if self._chat:
            self.capabilities = Capabilities(chat_only=True, regex=False, json_schema=True,
                                             logprobs=logprobs, images=True, token_ids=False)
        else:
            self.capabilities = Capabilities(chat_only=False, regex=extensions, json_schema=extensions,
                                             logprobs=logprobs, token_ids=False)

    # ------------------------------------------------------------------ public surface

    @property
    def model_name(self) -> str:
        return self._model

    @property
    def chat_template(self) -> ChatTemplate | None:
        """How a completion model's prompt renders chat roles (None for chat models)."""
        return None if self._chat else self._template

    @property
    def client(self) -> Any:
        """The ``openai.AsyncOpenAI`` client in use (its SDK retries off)."""
        return self._client

    def new_session(self, *, spec_tokens: int | None = None) -> SpecSession:
        """Per-run speculation state; ``spec_tokens`` overrides the backend's for this run."""
        session = SpecSession(spec_tokens=spec_tokens if spec_tokens is not None else self._spec_tokens)
        self._session_keys[session] = uuid.uuid4().hex
        return session

    @contextlib.contextmanager
    def _in_session(self, session: Any):
        """Send ``session``'s key (:data:`SESSION_HEADER`) with the calls made meanwhile, on
        a client this backend made."""
        key = self._session_keys.get(session) if isinstance(session, SpecSession) else None
        previous = _session_key.get()
        _session_key.set(key)
        try:
            yield
        finally:
            _session_key.set(previous)

    def statistics(self) -> OpenAIStatistics:
        """A frozen snapshot of calls, tokens and speculation counters."""
        return OpenAIStatistics(**attrs.asdict(self._stats))

    def count_tokens(self, text: str) -> int | None:
        """Tokens in ``text`` by tiktoken, when the model's encoding is on this machine."""
        return None if self._encoding is None else len(self._encoding.encode(text, disallowed_special=()))

    async def aclose(self) -> None:
        """Close the HTTP client if this backend made it."""
        if self._owns_client:
            await self._client.close()

    async def score(self, prefix: GenerateRequest, continuations: Sequence[str],
                    method: str = "token_length_normalized") -> ScoreResult:
        """Pick among ``continuations`` (``select``).

        On aiolm's server: its scoring route (every method, exact). Completion models
        elsewhere: echoed prompt logprobs. Chat models elsewhere: one call whose response
        format allows only the choices (``method`` cannot apply; the unchosen get -inf).
        """
        choices = tuple(continuations)
        if not choices:
            raise ValueError("continuations: must not be empty")
        prompt, messages = self._prefix_of(prefix)
        if await self._is_aiolm():
            with self._in_session(prefix.session):
                return await _openai_score.by_route(self, prompt, messages, choices, method)
        if messages is None:
            return await _openai_score.by_echo(self, prompt, choices, method)
        pre, partial = split_open_turn(messages)
        if partial:
            raise UnsupportedFeature(
                "select: a chat API cannot continue a started assistant turn; put select "
                "right after assistant( or use aiolm serve / aiolm.Engine"
            )
        return await _openai_score.by_enum(self, pre, choices)

    @contextlib.asynccontextmanager
    async def stream(self, request: GenerateRequest) -> AsyncIterator[AsyncIterator[Chunk]]:
        """Start ``request``; see :meth:`Backend.stream`.

        Unsupported features raise ``UnsupportedFeature`` on entry; API failures raise
        :mod:`aiolm.errors` types on entry or while iterating. Leaving early closes the
        HTTP stream.
        """
        with self._in_session(request.session):
            if self._chat:
                chunks = await self._chat_request(request)
            else:
                chunks = await self._completion_request(request)
            if request.constraint is not None:
                chunks = self._checked(chunks, request.constraint)
            try:
                yield chunks
            finally:
                await chunks.aclose()

    # ------------------------------------------------------------------ calls

    async def call(self, make: Any) -> Any:
        """Await ``make()`` (an SDK call) with retries and error mapping; count attempts."""
        return await retrying(make, self._retry, before=self._count_attempt)

    def _count_attempt(self, state: Any) -> None:
        """The retry loop's hook before each attempt (a tenacity ``RetryCallState``)."""
        self._stats.calls += 1
        if state.attempt_number > 1:
            self._stats.retries += 1

    def record_usage(self, usage: Usage | None) -> None:
        self._stats.add_usage(usage)

    async def _is_aiolm(self) -> bool:
        """Whether the server is ``aiolm serve`` (asked once from ``/v1/models``)."""
        if self._aiolm_server is None:
            try:  # not counted in statistics(): they count generation calls
                page = await retrying(lambda: self._client.models.list(), self._retry)
            except BackendError:
                self._aiolm_server = False
            else:
                self._aiolm_server = any(getattr(m, "owned_by", None) == "aiolm" for m in page.data)
        return self._aiolm_server

    async def _extension_body(self, sampling: SamplingParams, extra: dict[str, Any]) -> dict[str, Any]:
        """aiolm-server fields for what the OpenAI API lacks; UnsupportedFeature elsewhere."""
        body = dict(extra)
        if sampling.top_k not in (0, -1):
            body["top_k"] = sampling.top_k
        if sampling.min_p:
            body["min_p"] = sampling.min_p
        if sampling.min_tokens:
            body["min_tokens"] = sampling.min_tokens
        if sampling.ignore_eos:
            body["ignore_eos"] = True
        if sampling.stop_token_ids:
            body["stop_token_ids"] = list(sampling.stop_token_ids)
        if body and not await self._is_aiolm():
            raise UnsupportedFeature(
                f"{', '.join(sorted(body))}: not part of the OpenAI API (model {self._model}); "
                "aiolm serve and aiolm.Engine support them"
            )
        return body

    def _common(self, sampling: SamplingParams) -> dict[str, Any]:
        kw: dict[str, Any] = {"model": self._model, "temperature": sampling.temperature}
        if sampling.top_p != 1.0:
            kw["top_p"] = sampling.top_p
        if sampling.seed is not None:
            kw["seed"] = sampling.seed
        if sampling.frequency_penalty:
            kw["frequency_penalty"] = sampling.frequency_penalty
        if sampling.presence_penalty:
            kw["presence_penalty"] = sampling.presence_penalty
        if sampling.logit_bias:  # the API keys token ids as strings
            kw["logit_bias"] = {str(token): bias for token, bias in sampling.logit_bias}
        return kw

    def _prefix_of(self, request: GenerateRequest) -> tuple[str | None, tuple[Message, ...] | None]:
        """The prompt text (completion models) or messages (chat models) of ``request``."""
        if request.input_ids is not None:
            raise UnsupportedFeature("input_ids: the OpenAI backend takes text prompts")
        if self._chat:
            if request.messages is not None:
                return None, request.messages
            parts = (TextPart(text=request.prompt or ""),)
            return None, (Message(role="user", parts=parts),)
        if request.images:
            raise UnsupportedFeature(f"images: {self._model} is a completion model; use a vision chat model")
        if request.messages is not None:
            pre, partial = split_open_turn(request.messages)
            return render_text(pre, self._template, open_role="assistant", open_text=partial), None
        return request.prompt, None

    # ------------------------------------------------------------------ completion models

    async def _completion_request(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        if request.tools or request.reasoning is not None:
            raise UnsupportedFeature(
                f"tools/reasoning: {self._model} is a completion model; run the request "
                "through aiolm.tools.stream_chat (programs do), which renders them as text"
            )
        sampling = request.sampling
        prompt, _ = self._prefix_of(request)
        _, ext = constraint_fields(request.constraint, chat=False)
        extra = await self._extension_body(sampling, ext)
        kw = self._common(sampling)
        kw["prompt"] = prompt
        session = request.session if isinstance(request.session, SpecSession) else None
        # NOTE: a speculated continuation was sampled without a logit bias.
        if (session is not None and session.spec_tokens and speculable(sampling, request.constraint)
                and not sampling.logit_bias):
            spec_kw = dict(kw, max_tokens=max(session.spec_tokens, sampling.max_tokens), logprobs=0)
            return self._speculative(
                session, sampling, lambda spec: prompt[len(spec.key):] if prompt.startswith(spec.key) else None,
                functools.partial(self._speculate, spec_kw, prompt, sampling, extra, chat=False),
                fallback=functools.partial(self._completion_plain, kw, sampling, extra),
                retry_pattern=False,
            )
        return self._completion_plain(kw, sampling, extra)

    def _completion_plain(self, kw: dict[str, Any], sampling: SamplingParams,
                          extra: dict[str, Any]) -> AsyncIterator[Chunk]:
        kw = dict(kw, max_tokens=sampling.max_tokens)
        if sampling.logprobs:
            kw["logprobs"] = sampling.top_logprobs
        return stream_call(self, self._client.completions, kw, sampling, extra, chat=False)

    # ------------------------------------------------------------------ chat models

    async def _chat_request(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        sampling = request.sampling
        _, messages = self._prefix_of(request)
        pre, partial = split_open_turn(messages)
        fields, ext = constraint_fields(request.constraint, chat=True)
        tool_fields, tool_ext = chat_fields(request)
        extra = await self._extension_body(sampling, {**ext, **tool_ext})
        kw = self._common(sampling)
        kw.update(fields)
        kw.update(tool_fields)
        if sampling.logprobs and self.capabilities.logprobs:
            kw["logprobs"] = True
            if sampling.top_logprobs:
                kw["top_logprobs"] = sampling.top_logprobs
        choices = getattr(request.constraint, "choices", None) if "response_format" in fields else None
        session = request.session if isinstance(request.session, SpecSession) else None
        # NOTE: a speculated continuation is unbiased text only: it cannot stand in for calls,
        # thinking, or an answer under a logit bias.
        if (session is not None and session.spec_tokens and speculable(sampling, request.constraint)
                and not tool_fields and not tool_ext and request.reasoning is None
                and not sampling.logit_bias):
            want = max(session.spec_tokens, sampling.max_tokens)
            if self.capabilities.logprobs:
                kw_spec = dict(kw, logprobs=True)
            else:
                kw_spec = kw
            if partial and await self._is_aiolm():
                # aiolm's server continues the started turn: speculate from here, exactly
                # as for a completion model.
                messages = [*messages_to_openai(pre), {"role": "assistant", "content": partial}]
                spec_kw = dict(kw_spec, messages=messages, max_completion_tokens=want)
                speculate = functools.partial(
                    self._speculate, spec_kw, pre, sampling, dict(extra, continue_final_message=True),
                    chat=True, prefix=partial)
                may, retry = True, False
            else:
                # The whole assistant turn in one call (once per turn); this gen and the next
                # ones of the turn are cut out of it (room for the literal text before it).
                room = self.count_tokens(partial) or len(partial.encode())
                spec_kw = dict(kw_spec, messages=messages_to_openai(pre), max_completion_tokens=want + room)
                speculate = functools.partial(self._speculate, spec_kw, pre, sampling, extra, chat=True)
                may, retry = not session.has(pre, sampling), not sampling.greedy
            return self._speculative(
                session, sampling, lambda spec: partial if spec.key == pre else None, speculate,
                fallback=functools.partial(self._chat_plain, kw, pre, partial, sampling, extra, choices),
                retry_pattern=retry, may_speculate=may,
            )
        return self._chat_plain(kw, pre, partial, sampling, extra, choices)

    async def _chat_plain(self, kw: dict[str, Any], pre: tuple[Message, ...], partial: str,
                          sampling: SamplingParams, extra: dict[str, Any],
                          choices: tuple[str, ...] | None) -> AsyncIterator[Chunk]:
        messages = messages_to_openai(pre)
        if partial:
            if not await self._is_aiolm():
                raise UnsupportedFeature(
                    "a chat API cannot continue a started assistant turn: put gen right after "
                    "assistant(, turn on speculation (spec_tokens=...), or use aiolm serve"
                )
            messages.append({"role": "assistant", "content": partial})
            extra = dict(extra, continue_final_message=True)
        kw = dict(kw, messages=messages, max_completion_tokens=sampling.max_tokens)
        if choices is not None:
            chunks = self._chosen(kw, choices, extra)
        else:
            chunks = stream_call(self, self._client.chat.completions, kw, sampling, extra, chat=True)
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                yield chunk

    @staticmethod
    async def _checked(chunks: AsyncIterator[Chunk], constraint: Any) -> AsyncIterator[Chunk]:
        """``chunks``, with the finished text checked against ``constraint``.

        An API may not enforce a response format strictly; an answer that does not satisfy
        it raises ``ConstraintError`` (one cut short by ``max_tokens`` is reported as such).
        """
        text: list[str] = []
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                text.append(chunk.text)
                if chunk.finish_reason == "stop" and not constraint.matches_text("".join(text)):
                    raise ConstraintError(
                        f"the API's answer does not satisfy {constraint!r}: {''.join(text)[:200]!r}")
                yield chunk

    async def _chosen(self, kw: dict[str, Any], choices: tuple[str, ...],
                      extra: dict[str, Any]) -> AsyncIterator[Chunk]:
        """A ``choices`` gen on a chat model: the enum answer, unwrapped to the choice."""
        response = await self.call(lambda: self._client.chat.completions.create(**kw, extra_body=extra or None))
        usage = read_usage(getattr(response, "usage", None))
        self.record_usage(usage)
        index = parse_choice_json(the_choice(response).message.content or "", choices)
        yield Chunk(text=choices[index], finish_reason="stop", usage=usage or Usage())

    # ------------------------------------------------------------------ shared paths

    async def _speculate(self, kw: dict[str, Any], key: Any, sampling: SamplingParams,
                         extra: dict[str, Any], *, chat: bool, prefix: str = "") -> tuple[Speculation, Usage]:
        """One unstreamed call with no stop: the continuation to answer gens from.

        ``prefix`` is text the continuation follows within the speculation (the started
        assistant turn a continued chat call was given).
        """
        create = self._client.chat.completions.create if chat else self._client.completions.create
        response = await self.call(lambda: create(**kw, extra_body=extra or None))
        self._stats.speculative_calls += 1
        usage = read_usage(getattr(response, "usage", None)) or Usage()
        self.record_usage(usage)
        choice = the_choice(response)
        if chat:
            text = choice.message.content or "" if choice.message is not None else ""
            lps = read_chat_logprobs(choice.logprobs)
        else:
            text, lps = choice.text or "", read_completion_logprobs(choice.logprobs)
        tokens: tuple[str, ...] | None = tuple(lp.token for lp in lps)
        if "".join(tokens) != text:  # no logprobs (or odd ones): fall back to tiktoken
            tokens = token_texts(self._encoding, text) if self._encoding is not None else None
        if prefix:
            text, tokens = prefix + text, (None if tokens is None else (prefix, *tokens))
        spec = Speculation(key=key, text=text, tokens=tokens, finished=choice.finish_reason == "stop",
                           sampling=sampling_key(sampling))
        return spec, usage

    async def _speculative(self, session: SpecSession, sampling: SamplingParams, consumed: Any,
                           speculate: Any, *, fallback: Any, retry_pattern: bool,
                           may_speculate: bool = True) -> AsyncIterator[Chunk]:
        """Answer from the session's speculation, else speculate anew, else call plainly."""
        answer = session.serve(consumed, sampling)
        if answer is not None:
            self._stats.calls_saved += 1
            yield _served(answer, Usage(completion_tokens=answer.num_tokens or 0))
            return
        for _ in range(self._spec_max_tries if may_speculate else 0):
            spec, usage = await speculate()
            session.remember(spec)
            answer = session.serve(consumed, sampling)
            if answer is not None:
                yield _served(answer, usage)
                return
            self._stats.speculation_misses += 1
            # Retrying helps only when a sampled reply missed the turn's literal text.
            used = consumed(spec)
            if not retry_pattern or (used is not None and spec.text.startswith(used)):
                break
        async with contextlib.aclosing(fallback()) as chunks:
            async for chunk in chunks:
                yield chunk


def _served(answer: Cut, usage: Usage) -> Chunk:
    return Chunk(text=answer.text, finish_reason=answer.finish_reason, usage=usage,
                 matched_stop=answer.matched_stop)
