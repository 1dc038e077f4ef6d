"""One streamed call to the OpenAI API, its server-sent events parsed by ``httpx_sse``.

The SDK's own stream reader leaves its inner iterators unfinished after ``[DONE]`` (trio
then finalizes them on stray tasks and warns), so the SDK's raw response is read here with
``httpx_sse`` (a maintained parser of the SSE format: multi-line events, comments, CR/LF
line ends), to the end of the body; an early exit closes the response and runs httpx's
iterators out.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio
from httpx_sse import EventSource, SSEError

from ..errors import BackendError
from ..sampling import SamplingParams
from ..stops import StopMatcher
from ._openai_errors import MalformedResponse, map_openai_error
from ._openai_wire import (
    field,
    finish_reason,
    read_chat_logprobs,
    read_completion_logprobs,
    read_reasoning,
    read_tool_call_deltas,
    read_usage,
    sse_events,
)
from .base import Chunk, Usage

if TYPE_CHECKING:
    from .openai import OpenAI

__all__ = ["stream_call"]

_MAX_STOPS = 4          # the OpenAI API takes at most four stop strings
_CLOSE_TIMEOUT = 2.0    # seconds to wait for a stream's connection to close


async def stream_call(backend: OpenAI, resource: Any, kw: dict[str, Any], sampling: SamplingParams,
                      extra: dict[str, Any], *, chat: bool) -> AsyncIterator[Chunk]:
    """One streamed call of ``resource`` (the SDK's completions or chat completions).

    Stop strings beyond the API's four and ``stop_regex`` are applied here (to the answer's
    text). A chat model's thinking (``reasoning_content``) and tool calls come as
    ``Chunk.reasoning`` / ``Chunk.tool_calls``; a stream that made calls finishes with
    ``"tool_calls"``. Retries happen only before the first event; errors after it are
    mapped and raised.
    """
    client_stop = sampling.stop_regex is not None or len(sampling.stop) > _MAX_STOPS
    if sampling.stop and not client_stop:
        kw = dict(kw, stop=list(sampling.stop))
    stopper = StopMatcher(sampling.stop, sampling.stop_regex) if client_stop else None
    kw = dict(kw, stream=True, stream_options={"include_usage": True}, extra_body=extra or None)
    # The raw response (entering the SDK's streaming-response context by hand, so that
    # retries can wrap it), read as server-sent events below.
    response = await backend.call(lambda: resource.with_streaming_response.create(**kw).__aenter__())
    finish: str | None = None
    matched: str | int | None = None
    usage: Usage | None = None
    called = False
    source = EventSource(response.http_response).aiter_sse()
    events = sse_events(source)
    try:
        async for event in events:
            if field(event, "usage") is not None:
                usage = read_usage(event["usage"])
            for choice in field(event, "choices") or ():
                thinking, calls = "", ()
                if chat:
                    delta = field(choice, "delta") or {}
                    text = field(delta, "content") or ""
                    thinking = read_reasoning(delta)
                    calls = read_tool_call_deltas(field(delta, "tool_calls"))
                    called = called or bool(calls)
                    lps = read_chat_logprobs(field(choice, "logprobs"))
                else:
                    text = field(choice, "text") or ""
                    lps = read_completion_logprobs(field(choice, "logprobs"))
                if stopper is not None:
                    text, matched = stopper.feed(text)
                    if matched is not None:
                        finish = "stop"
                if text or lps or thinking or calls:
                    yield Chunk(text=text, logprobs=lps, reasoning=thinking, tool_calls=calls)
                if finish is None and field(choice, "finish_reason") is not None:
                    finish = field(choice, "finish_reason")
                    if stopper is None:
                        matched = field(choice, "matched_stop")
            if stopper is not None and matched is not None:
                break  # our own stop: the rest of the answer is not wanted
    except SSEError as exc:   # a 2xx whose Content-Type is not text/event-stream
        raise MalformedResponse(f"the API did not answer with server-sent events: {exc}") from exc
    except Exception as exc:
        mapped = map_openai_error(exc) if not isinstance(exc, BackendError) else None
        if mapped is None:
            raise
        raise mapped from exc
    finally:
        with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
            await response.close()
            await _run_out(source)
            await events.aclose()
    if stopper is not None and matched is None:
        tail = stopper.flush()
        if tail:
            yield Chunk(text=tail)
    if finish is None:
        raise BackendError(f"{backend.model_name}: the API's stream ended without a finish reason")
    backend.record_usage(usage)
    reason = finish_reason(finish)
    if called and reason == "stop":  # some servers say "stop" after calls
        reason = "tool_calls"
    yield Chunk(finish_reason=reason, usage=usage or Usage(),
                matched_stop=matched if isinstance(matched, str | int) else None)


async def _run_out(source: AsyncIterator[Any]) -> None:
    """Finish the chain of event/line/byte iterators under ``source`` after the response
    was closed.

    Closing only the outer one would leave the inner ones unfinished, to be finalized later
    on stray tasks (trio warns about each); reading on makes each one end, with the rest of
    a buffered body or with the error of the closed connection.
    """
    with contextlib.suppress(Exception):
        async for _ in source:
            pass
