"""Running the ops that need the backend: ``gen`` (streamed; through the chat layer when
it has tools or reasoning), ``select`` (scored), ``image``, ``video``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import attrs

from ..backends.base import Chunk, GenerateRequest, TokenLogprob, Usage
from ..errors import BackendError, ConstraintError, ProgramError, UnsupportedFeature
from ..primitives import Gen, Image, Select, Video, parse_dtype
from ..sampling import SamplingParams
from ..tools.chat_stream import stream_chat
from ..tools.partial_json import parse_partial_json
from ..tools.spec import ToolCall, ToolCallDelta, assemble_tool_calls
from .context import EmitFn, GenerationMeta, StreamEvent, is_json_schema, next_request_id
from .images import load_image
from .videos import load_video

if TYPE_CHECKING:
    from .state import ProgramState

__all__ = ["PREFIX_SAMPLING", "run_gen", "run_image", "run_select", "run_video"]

#: The sampling of a prefix-only request (scoring and prefill ignore it).
PREFIX_SAMPLING = SamplingParams()


def _describe(name: str | None, kind: str) -> str:
    return f"{kind}({name!r})" if name is not None else f"an unnamed {kind}"


async def run_gen(state: ProgramState, gen: Gen) -> None:
    """Stream one generation into ``state``: its text, then its variable and meta.

    A gen with tools or reasoning, or any gen of a conversation with tool turns, runs
    through the chat layer (:func:`aiolm.tools.stream_chat`). A constraint that checks part
    of its rule on the finished output (:meth:`~aiolm.constraints.Constraint.check_output`)
    is regenerated when that check fails (see :func:`_generate`). Raises
    ``UnsupportedFeature`` before calling the backend when it cannot honour the gen,
    ``ConstraintError`` for an invalid constraint, an output no attempt made valid or an
    output ``dtype`` cannot parse, ``ProgramError`` for a chat gen outside an assistant
    turn, and whatever the backend raises.
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
    chat = gen.chat or state._tooled
    if chat and state._calls:
        raise ProgramError(
            f"{_describe(gen.name, 'gen')}: this assistant turn already made tool calls; "
            "answer them with tool_result(...) after the turn, then open a new one"
        )
    out = await _generate(state, gen, _chat_attempt if chat else _plain_attempt)
    if not chat:
        state._append_text(out.text, gen.name)
        _store(state, gen, out.request, out.text, out.last, out.logprobs, attempts=out.attempts)
        return
    calls = _whole_calls(out.deltas)
    if out.text:
        state._append_text(out.text, gen.name)
    if calls:
        state._record_calls(calls, gen.name)
    _store(state, gen, out.request, out.text, out.last, out.logprobs,
           calls=list(calls) if calls else None,
           reasoning="".join(out.thinking) if gen.reasoning is not None else None,
           tool_calls=calls if gen.tools else None, attempts=out.attempts)


@attrs.define(eq=False, kw_only=True)
class _Attempt:
    """One generation of a gen: its request and what the backend streamed."""

    request: GenerateRequest
    text: str = ""
    last: Chunk | None = None
    logprobs: list[TokenLogprob] = attrs.field(factory=list)
    thinking: list[str] = attrs.field(factory=list)
    deltas: list[ToolCallDelta] = attrs.field(factory=list)
    attempts: int = 1


AttemptFn = Callable[["ProgramState", Gen, SamplingParams, "EmitFn | None", list[str]],
                     Awaitable[_Attempt]]


async def _generate(state: ProgramState, gen: Gen, attempt: AttemptFn) -> _Attempt:
    """Run ``attempt`` until its output passes the constraint's check after decoding.

    This is the one place every program ``gen`` goes through on every backend, so a
    constraint that checks part of its rule on the finished value (a JSON schema's ``not``,
    ``uniqueItems``, ``oneOf`` exclusivity, ...) is regenerated here: up to
    ``constraint.attempts`` outputs, each a new request with the same prompt (free from the
    prefix cache) and, for a seeded gen, the seed plus the attempt's index. An attempt fails
    when its finished text fails :meth:`~aiolm.constraints.Constraint.check_output` or the
    backend raises ``ConstraintError`` (the engine refuses to end a value that fails; the
    scripted and OpenAI backends check answers themselves). Its stream events are held back
    until it passes, so a consumer never sees an output that did not. Raises
    ``ConstraintError`` naming the last failure (keyword and path) when no attempt passes,
    or after two identical outputs (greedy decoding repeats itself).
    """
    ctx = state._run
    constraint = gen.constraint
    checked = constraint is not None and bool(constraint.checked_after())
    sampling = ctx.sampling_for(gen)
    if not checked:
        return await attempt(state, gen, sampling, ctx.emit, [])
    assert constraint is not None
    seen: set[str] = set()
    failure = ""
    tried = 0
    for k in range(constraint.attempts):
        tried = k + 1
        held: list[StreamEvent] = []
        pieces: list[str] = []
        if k and sampling.seed is not None:
            sampling = attrs.evolve(sampling, seed=(sampling.seed + 1) % _SEEDS)
        try:
            out = await attempt(state, gen, sampling, _holder(held) if ctx.emit else None,
                                pieces)
        except ConstraintError as exc:
            failure = str(exc)
        else:
            failure = "" if out.last is None or out.last.finish_reason == "length" \
                else constraint.check_output(out.text) or ""
            if not failure:
                if ctx.emit is not None:
                    for event in held:
                        await ctx.emit(event)
                out.attempts = k + 1
                return out
        text = "".join(pieces)
        if text in seen:
            failure += (" (the same output twice: decoding repeats itself, so sample with "
                        "temperature > 0 for regeneration to find another)")
            break
        seen.add(text)
    raise ConstraintError(
        f"{_describe(gen.name, 'gen')}: no output satisfied its {type(constraint).__name__} "
        f"after {tried} attempt(s); the last: {failure}"
    )


_SEEDS = 1 << 64


def _holder(events: list[StreamEvent]) -> EmitFn:
    """A stream sink that keeps ``events`` until their attempt passes its check."""
    async def hold(event: StreamEvent) -> None:
        events.append(event)

    return hold


async def _plain_attempt(state: ProgramState, gen: Gen, sampling: SamplingParams,
                         emit: EmitFn | None, pieces: list[str]) -> _Attempt:
    """One generation of a gen outside the chat layer, its text streamed to ``emit`` and
    collected in ``pieces``."""
    ctx = state._run
    out = _Attempt(request=GenerateRequest(
        **state._request_fields(for_gen=True),
        sampling=sampling,
        constraint=gen.constraint,
        request_id=next_request_id(),
        session=ctx.session,
    ))
    typed = emit is not None and is_json_schema(gen.constraint)
    async with ctx.backend.stream(out.request) as chunks:
        async for chunk in chunks:
            if chunk.text:
                pieces.append(chunk.text)
                if emit is not None:
                    partial = _json_so_far("".join(pieces)) if typed else None
                    await emit(StreamEvent(name=gen.name, text=chunk.text, branch=state._path,
                                           partial=partial))
            if chunk.logprobs:
                out.logprobs.extend(chunk.logprobs)
            if chunk.finish_reason is not None:
                out.last = chunk
    out.text = "".join(pieces)
    return out


async def _chat_attempt(state: ProgramState, gen: Gen, sampling: SamplingParams,
                        emit: EmitFn | None, pieces: list[str]) -> _Attempt:
    """One generation of a gen through the chat layer: content, thinking and calls."""
    ctx = state._run
    out = _Attempt(request=GenerateRequest(
        **state._request_fields(for_gen=True, chat=True),
        sampling=sampling,
        constraint=gen.constraint,
        tools=gen.tools,
        tool_choice=gen.tool_choice,
        parallel_tool_calls=gen.parallel_tool_calls,
        reasoning=gen.reasoning,
        request_id=next_request_id(),
        # NOTE: API speculation cannot answer tools or thinking; such gens go without it.
        session=None if gen.chat else ctx.session,
    ))
    typed = emit is not None and is_json_schema(gen.constraint)
    async with stream_chat(ctx.backend, out.request) as chunks:
        async for chunk in chunks:
            if chunk.text:
                pieces.append(chunk.text)
            if chunk.reasoning:
                out.thinking.append(chunk.reasoning)
            if chunk.tool_calls:
                out.deltas.extend(chunk.tool_calls)
            if chunk.logprobs:
                out.logprobs.extend(chunk.logprobs)
            if chunk.finish_reason is not None:
                out.last = chunk
            if emit is not None and (chunk.text or chunk.reasoning or chunk.tool_calls):
                if out.deltas:
                    partial: Any = _calls_so_far(out.deltas)
                else:
                    partial = _json_so_far("".join(pieces)) if typed else None
                await emit(StreamEvent(name=gen.name, text=chunk.text, branch=state._path,
                                       reasoning=chunk.reasoning, partial=partial))
    out.text = "".join(pieces)
    return out


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


async def run_video(state: ProgramState, vid: Video) -> None:
    """Sample ``vid``'s frames and add them to the open turn (before any later gen runs).

    Raises ``UnsupportedFeature`` when the backend takes no video, and the errors of
    :func:`~aiolm._program.videos.load_video` for a source that cannot be read.
    """
    ctx = state._run
    if not ctx.caps.video:
        raise UnsupportedFeature(
            f"{ctx.backend.model_name} does not take video; use a video model "
            "(Qwen2.5-VL or LLaVA-NeXT-Video on aiolm.Engine)"
        )
    state._append_image(await load_video(vid.source, vid.num_frames))
