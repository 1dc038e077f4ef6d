"""Running the ops that need the backend: ``gen`` (streamed), ``select`` (scored), ``image``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..backends.base import Chunk, GenerateRequest, TokenLogprob, Usage
from ..errors import BackendError, ConstraintError, UnsupportedFeature
from ..primitives import Gen, Image, Select, parse_dtype
from ..sampling import SamplingParams
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

    Raises ``UnsupportedFeature`` before calling the backend when it cannot honour the gen,
    ``ConstraintError`` for an invalid constraint or an output ``dtype`` cannot parse, and
    whatever the backend raises.
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
    request = GenerateRequest(
        **state._request_fields(for_gen=True),
        sampling=ctx.sampling_for(gen),
        constraint=constraint,
        request_id=next_request_id(),
        session=ctx.session,
    )
    emit = ctx.emit
    pieces: list[str] = []
    logprobs: list[TokenLogprob] = []
    last: Chunk | None = None
    async with ctx.backend.stream(request) as chunks:
        async for chunk in chunks:
            if chunk.text:
                pieces.append(chunk.text)
                if emit is not None:
                    await emit(StreamEvent(name=gen.name, text=chunk.text, branch=state._path))
            if chunk.logprobs:
                logprobs.extend(chunk.logprobs)
            if chunk.finish_reason is not None:
                last = chunk
    if last is None:
        raise BackendError(f"{ctx.backend.model_name}: the stream ended without a finish reason")
    text = "".join(pieces)
    value: object = text
    if gen.dtype is not None and gen.dtype is not str:
        try:
            value = parse_dtype(gen.dtype, text)
        except ValueError as exc:
            raise ConstraintError(f"{_describe(gen.name, 'gen')}: {exc}") from None
    state._append_text(text)
    if gen.name is not None:
        usage = last.usage or Usage()
        meta = GenerationMeta.from_usage(
            usage, finish_reason=last.finish_reason,
            logprobs=tuple(logprobs) if request.sampling.logprobs else None,
            matched_stop=last.matched_stop,
        )
        state._set(gen.name, value, meta)


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
    state._append_text(choice)
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
