"""Running the ops that need the backend: ``gen`` (streamed; through the chat layer when
it has tools or reasoning), ``select`` (scored), ``image``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..backends.base import Chunk, GenerateRequest, TokenLogprob, Usage
from ..constraints.json_schema import JSONSchema
from ..errors import BackendError, ConstraintError, ProgramError, UnsupportedFeature
from ..primitives import Gen, Image, Select, parse_dtype
from ..sampling import SamplingParams
from ..tools.chat_stream import stream_chat
from ..tools.partial_json import parse_partial_json
from ..tools.spec import ToolCall, ToolCallDelta, assemble_tool_calls
from .context import GenerationMeta, StreamEvent, next_request_id
from .images import load_image

if TYPE_CHECKING:
    from .state import ProgramState

__all__ = ["PREFIX_SAMPLING", "run_gen", "run_image", "run_select"]

#: The sampling of a prefix-only request (scoring and prefill ignore it).
PREFIX_SAMPLING = SamplingParams()


def _describe(name: str | None, kind: str) -> str:
    return f"{kind}({name!r})" if name is not None else f"an unnamed {kind}"


async def run_gen(state: ProgramState, gen: Gen) -> None:
    """Stream one generation into ``state``: its text, then its variable and meta.

    A gen with tools or reasoning, or any gen of a conversation with tool turns, runs
    through the chat layer (:func:`aiolm.tools.stream_chat`). Raises ``UnsupportedFeature``
    before calling the backend when it cannot honour the gen, ``ConstraintError`` for an
    invalid constraint or an output ``dtype`` cannot parse, ``ProgramError`` for a chat gen
    outside an assistant turn, and whatever the backend raises.
    """
    ctx = state._run
    constraint = gen.constraint
    if constraint is not None:
        ctx.check_constraint(constraint, _describe(gen.name, "gen"))
        constraint.validate()
    if (gen.return_logprobs or gen.top_logprobs) and not ctx.caps.logprobs:
        raise UnsupportedFeature(
            f"{ctx.backend.model_name} does not return logprobs ({_describe(gen.name, 'gen')})"
        )
    if gen.chat or state._tooled:
        await _run_chat_gen(state, gen)
        return
    request = GenerateRequest(
        **state._request_fields(for_gen=True),
        sampling=ctx.sampling_for(gen),
        constraint=constraint,
        request_id=next_request_id(),
        session=ctx.session,
    )
    emit = ctx.emit
    typed = emit is not None and isinstance(constraint, JSONSchema)
    pieces: list[str] = []
    logprobs: list[TokenLogprob] = []
    last: Chunk | None = None
    async with ctx.backend.stream(request) as chunks:
        async for chunk in chunks:
            if chunk.text:
                pieces.append(chunk.text)
                if emit is not None:
                    partial = _json_so_far("".join(pieces)) if typed else None
                    await emit(StreamEvent(name=gen.name, text=chunk.text, branch=state._path,
                                           partial=partial))
            if chunk.logprobs:
                logprobs.extend(chunk.logprobs)
            if chunk.finish_reason is not None:
                last = chunk
    text = "".join(pieces)
    state._append_text(text, gen.name)
    _store(state, gen, request, text, last, logprobs)


async def _run_chat_gen(state: ProgramState, gen: Gen) -> None:
    """A gen through the chat layer: the content is appended to the open assistant turn,
    calls are recorded on it; the thinking goes to the meta only."""
    ctx = state._run
    if state._calls:
        raise ProgramError(
            f"{_describe(gen.name, 'gen')}: this assistant turn already made tool calls; "
            "answer them with tool_result(...) after the turn, then open a new one"
        )
    request = GenerateRequest(
        **state._request_fields(for_gen=True, chat=True),
        sampling=ctx.sampling_for(gen),
        constraint=gen.constraint,
        tools=gen.tools,
        tool_choice=gen.tool_choice,
        parallel_tool_calls=gen.parallel_tool_calls,
        reasoning=gen.reasoning,
        request_id=next_request_id(),
        # NOTE: API speculation cannot answer tools or thinking; such gens go without it.
        session=None if gen.chat else ctx.session,
    )
    emit = ctx.emit
    typed = emit is not None and isinstance(gen.constraint, JSONSchema)
    pieces: list[str] = []
    thinking: list[str] = []
    deltas: list[ToolCallDelta] = []
    logprobs: list[TokenLogprob] = []
    last: Chunk | None = None
    async with stream_chat(ctx.backend, request) as chunks:
        async for chunk in chunks:
            if chunk.text:
                pieces.append(chunk.text)
            if chunk.reasoning:
                thinking.append(chunk.reasoning)
            if chunk.tool_calls:
                deltas.extend(chunk.tool_calls)
            if chunk.logprobs:
                logprobs.extend(chunk.logprobs)
            if chunk.finish_reason is not None:
                last = chunk
            if emit is not None and (chunk.text or chunk.reasoning or chunk.tool_calls):
                if deltas:
                    partial: Any = _calls_so_far(deltas)
                else:
                    partial = _json_so_far("".join(pieces)) if typed else None
                await emit(StreamEvent(name=gen.name, text=chunk.text, branch=state._path,
                                       reasoning=chunk.reasoning, partial=partial))
    calls = _whole_calls(deltas)
    text = "".join(pieces)
    if text:
        state._append_text(text, gen.name)
    if calls:
        state._record_calls(calls, gen.name)
    _store(state, gen, request, text, last, logprobs, calls=list(calls) if calls else None,
           reasoning="".join(thinking) if gen.reasoning is not None else None,
           tool_calls=calls if gen.tools else None)


def _store(state: ProgramState, gen: Gen, request: GenerateRequest, text: str,
           last: Chunk | None, logprobs: list[TokenLogprob], *, calls: list[ToolCall] | None = None,
           **meta: Any) -> None:
    """Set ``gen``'s variable (its calls, or its text parsed to its dtype) and meta."""
    ctx = state._run
    if last is None:
        raise BackendError(f"{ctx.backend.model_name}: the stream ended without a finish reason")
    value: object = text if calls is None else calls
    constraint = gen.constraint
    # A constrained decoder cut by max_tokens leaves a valid prefix, not a valid answer
    # (finish reason "length"); it must not pass as the value. An answer that happens to
    # be complete at the limit is kept.
    if (calls is None and constraint is not None and last.finish_reason == "length"
            and not constraint.matches_text(text)):
        shown = text if len(text) <= 60 else text[:60] + "..."
        raise ConstraintError(
            f"{_describe(gen.name, 'gen')}: the output was cut at "
            f"max_tokens={request.sampling.max_tokens} before it was complete ({shown!r} does "
            f"not satisfy its {type(constraint).__name__} yet); raise max_tokens"
        )
    if calls is None and gen.dtype is not None and gen.dtype is not str:
        try:
            value = parse_dtype(gen.dtype, text)
        except ValueError as exc:
            raise ConstraintError(f"{_describe(gen.name, 'gen')}: {exc}") from None
    if gen.name is not None:
        usage = last.usage or Usage()
        state._set(gen.name, value, GenerationMeta.from_usage(
            usage, finish_reason=last.finish_reason,
            logprobs=tuple(logprobs) if request.sampling.logprobs else None,
            matched_stop=last.matched_stop, **meta,
        ))


def _whole_calls(deltas: list[ToolCallDelta]) -> tuple[ToolCall, ...]:
    """The calls ``deltas`` make up, leaving out any whose arguments are not a JSON object.

    A tool parser streams a call's pieces before it knows the call is well formed; one that
    proves malformed stays in the content instead (and an API's call cut short by
    ``max_tokens`` has no whole arguments), so it is no call.
    """
    pieces: dict[int, list[ToolCallDelta]] = {}
    for d in deltas:
        pieces.setdefault(d.index, []).append(d)
    calls = []
    for index in sorted(pieces):
        try:
            (call,) = assemble_tool_calls(pieces[index])
        except ValueError:
            continue
        if call.name:
            calls.append(call)
    return tuple(calls)


def _json_so_far(text: str) -> Any:
    """The value of a streamed JSON answer so far (None where it is not JSON)."""
    try:
        return parse_partial_json(text)
    except ValueError:
        return None


def _calls_so_far(deltas: list[ToolCallDelta]) -> list[dict[str, Any]]:
    """The calls streamed so far, as ``{"name", "arguments"}`` with arguments parsed so far."""
    calls: dict[int, list[Any]] = {}
    for d in deltas:
        entry = calls.setdefault(d.index, [None, []])
        entry[0] = entry[0] or d.name
        entry[1].append(d.arguments)
    return [{"name": name, "arguments": _json_so_far("".join(args)) or {}}
            for _, (name, args) in sorted(calls.items())]


async def run_select(state: ProgramState, sel: Select) -> None:
    """Score ``sel.choices`` after the state's text and append the chosen one."""
    ctx = state._run
    if not ctx.caps.score:
        raise UnsupportedFeature(
            f"{ctx.backend.model_name} cannot score choices for select({sel.name!r}); "
            f"use gen({sel.name!r}, choices=[...]) instead"
        )
    prefix = GenerateRequest(
        **state._request_fields(for_gen=True), sampling=PREFIX_SAMPLING,
        request_id=next_request_id(), session=ctx.session,
    )
    result = await ctx.backend.score(prefix, sel.choices, sel.method)
    if not 0 <= result.index < len(sel.choices):
        raise BackendError(
            f"{ctx.backend.model_name}: score() chose index {result.index} of "
            f"{len(sel.choices)} choices"
        )
    choice = sel.choices[result.index]
    if ctx.emit is not None:
        await ctx.emit(StreamEvent(name=sel.name, text=choice, branch=state._path))
    state._append_text(choice, sel.name)
    meta = GenerationMeta.from_usage(
        result.usage, finish_reason="stop", choice_logprobs=result.normalized_logprobs
    )
    state._set(sel.name, choice, meta)


async def run_image(state: ProgramState, img: Image) -> None:
    """Load ``img`` and add it to the open turn."""
    ctx = state._run
    if not ctx.caps.images:
        raise UnsupportedFeature(
            f"{ctx.backend.model_name} does not take images; use a vision model"
        )
    state._append_image(await load_image(img.source))
