"""``stream_chat``: a chat request with tools or reasoning, on any backend.

A chat API (``aiolm.OpenAI``) takes tools and reasoning natively, so its requests pass
through unchanged. A text backend (the engine, the scripted backend) gets them here:

1. the conversation renders through the model's own chat template with the tools (or,
   for a model without one, the tools are described in the system turn in the tool
   parser's format);
2. a forced call (``tool_choice="required"`` or a tool's name) becomes a grammar, so the
   output is a well-formed call whose arguments validate against the tool's schema, even
   from a weak model; a thinking budget or an answer constraint behind the thinking
   becomes a :class:`~aiolm.constraints.thinking.ThinkingBudget`;
3. the output is parsed as it streams: thinking into ``Chunk.reasoning``, calls into
   ``Chunk.tool_calls`` (:class:`~aiolm.tools.ToolCallDelta` pieces), the rest into
   ``Chunk.text``; the last chunk says ``finish_reason="tool_calls"`` when calls were made.

:func:`plan_chat` does steps 1-2 without I/O (the server runs it on a worker thread).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from ..backends.base import Chunk, GenerateRequest
from ..errors import UnsupportedFeature

if TYPE_CHECKING:
    from ..backends.base import Backend
    from ..chat import Message
    from .parsers import ToolParser, ToolStreamer
    from .reasoning import ReasoningParser, ReasoningStreamer

__all__ = ["ChatPlan", "needs_chat_layer", "plan_chat", "stream_chat", "stream_plan"]

#: The tool-call format assumed for a model whose template names none.
DEFAULT_TOOL_PARSER = "hermes"
#: The thinking format assumed for a model whose template names none.
DEFAULT_REASONING_PARSER = "qwen3"


@attrs.frozen(kw_only=True)
class ChatPlan:
    """What :func:`stream_chat` sends a text backend, and how it reads the answer."""

    request: GenerateRequest                 # the rendered text request
    tool_parser: ToolParser | None           # None: calls are not parsed (no tools, or "none")
    reasoning_parser: ReasoningParser | None  # None: no thinking is split off


def needs_chat_layer(request: GenerateRequest) -> bool:
    """True when ``request`` must go through :func:`stream_chat` (tools, tool turns or
    reasoning); a plain chat request renders the usual way."""
    if request.tools or request.reasoning is not None:
        return True
    return any(m.role == "tool" or m.tool_calls for m in request.messages or ())


@contextlib.asynccontextmanager
async def stream_chat(backend: Backend, request: GenerateRequest, *,
                      tool_parser: str | None = None,
                      reasoning_parser: str | None = None) -> AsyncIterator[AsyncIterator[Chunk]]:
    """Like ``backend.stream(request)`` for a chat ``request`` (``messages`` set) with
    ``tools`` / ``tool_choice`` / ``reasoning``; chunks carry ``text`` (the answer),
    ``reasoning`` and ``tool_calls``.

    ``tool_parser`` / ``reasoning_parser`` name the formats (``aiolm.tools.parsers``,
    ``aiolm.tools.reasoning``); by default they are detected from the model's chat
    template. Raises ``ValueError`` for a bad combination (a forced call with a response
    constraint, an unknown parser), ``UnsupportedFeature`` where the backend cannot.
    """
    if request.messages is None:
        raise ValueError("stream_chat: the request must carry messages")
    if backend.capabilities.chat_only:
        async with backend.stream(request) as chunks:
            yield chunks
        return
    plan = plan_chat(backend, request, tool_parser=tool_parser, reasoning_parser=reasoning_parser)
    async with stream_plan(backend, plan) as chunks:
        yield chunks


@contextlib.asynccontextmanager
async def stream_plan(backend: Backend, plan: ChatPlan) -> AsyncIterator[AsyncIterator[Chunk]]:
    """:func:`stream_chat` for a request already planned by :func:`plan_chat` (a server
    plans while it parses the request, on a worker thread)."""
    async with backend.stream(plan.request) as chunks:
        yield _parse_stream(chunks, plan)


def plan_chat(backend: Backend, request: GenerateRequest, *, tool_parser: str | None = None,
              reasoning_parser: str | None = None) -> ChatPlan:
    """Render ``request`` for text backend ``backend`` and choose its constraint and parsers."""
    from ..constraints.grammar import Grammar
    from ..constraints.thinking import ThinkingBudget
    from .parsers import detect_tool_parser, get_tool_parser
    from .reasoning import (
        detect_reasoning_parser,
        get_reasoning_parser,
        template_has_thinking_switch,
    )

    source = backend.chat_template_source
    tools = request.tools
    choice = request.tool_choice
    calls_wanted = bool(tools) and choice != "none"
    tparser = None
    if tools:
        tparser = get_tool_parser(tool_parser or detect_tool_parser(source) or DEFAULT_TOOL_PARSER)

    reasoning = request.reasoning
    template_kwargs = dict(request.template_kwargs)
    rparser = None
    if reasoning is not None:
        name = reasoning_parser or detect_reasoning_parser(source) or DEFAULT_REASONING_PARSER
        rparser = get_reasoning_parser(name)
        if template_has_thinking_switch(source):
            template_kwargs.setdefault("enable_thinking", reasoning.enabled)
        if not reasoning.enabled:
            rparser = None

    constraint = request.constraint
    if calls_wanted and choice != "auto":
        if constraint is not None:
            raise ValueError(f"tool_choice: a forced tool call ({choice!r}) cannot also take a "
                             "response constraint (regex, json_schema, grammar)")
        assert tparser is not None
        constraint = Grammar(tparser.grammar(tools, choice=choice,
                                             parallel=request.parallel_tool_calls))
    elif calls_wanted and constraint is not None:
        raise ValueError("tools: tool_choice='auto' cannot take a response constraint too; "
                         "use tool_choice='none' or drop the constraint")
    if rparser is not None and (constraint is not None or reasoning.max_thinking_tokens is not None):
        constraint = ThinkingBudget(inner=constraint, end=rparser.end,
                                    start=None if rparser.starts_inside else rparser.start,
                                    max_thinking_tokens=reasoning.max_thinking_tokens)
    if constraint is not None:
        constraint.validate()

    prompt = _render(backend, request.messages or (), tools, tparser, source, template_kwargs)
    images = tuple(img for m in request.messages or () for img in m.images)
    sampling = request.sampling
    if calls_wanted and tparser is not None and tparser.keeps_special_tokens:
        sampling = attrs.evolve(sampling, skip_special_tokens=False)
    text_request = GenerateRequest(prompt=prompt, images=images, sampling=sampling,
                                   constraint=constraint, request_id=request.request_id,
                                   session=request.session,
                                   prompt_logprobs=request.prompt_logprobs)
    return ChatPlan(request=text_request, tool_parser=tparser if calls_wanted else None,
                    reasoning_parser=rparser)


def _render(backend: Backend, messages: Sequence[Message], tools: Sequence[Any],
            tparser: ToolParser | None, source: str | None,
            template_kwargs: dict[str, Any]) -> str:
    """The prompt: finished turns through the chat template, then the open assistant turn."""
    from ..chat import as_text_turn, messages_to_openai, render_text
    from .parsers import get_tool_parser

    history = list(messages)
    open_text = ""
    if history and history[-1].role == "assistant" and not history[-1].tool_calls:
        open_text = history.pop().content
    writer = tparser or get_tool_parser(DEFAULT_TOOL_PARSER)
    if source is not None:
        listed = [t.to_openai() for t in tools] or None
        has_tool_turns = any(m.role == "tool" or m.tool_calls for m in history)
        if (listed is not None or has_tool_turns) and not _renders_tools(backend, source, template_kwargs):
            # The template knows no tools (SmolLM2's, say): rendered as they are, the model
            # would never see them. Describe them in the system turn and write calls and
            # answers as the tool parser reads them.
            history = [as_text_turn(m, writer.format_calls) for m in history]
            if listed is not None:
                history = _with_tools_described(history, writer.describe_tools(tools))
            listed = None
        rendered = backend.render_chat(messages_to_openai(history), tools=listed,
                                       add_generation_prompt=True, **template_kwargs)
        return _append_literal(rendered, open_text)
    template = backend.chat_template
    if template is None:
        raise UnsupportedFeature(f"{backend.model_name} has no chat template")
    # No template of the model's own: tools are described in the system turn, calls are
    # written the way the tool parser reads them, and a tool's answer is a user turn.
    turns = [as_text_turn(m, writer.format_calls) for m in history]
    if tools:
        turns = _with_tools_described(turns, writer.describe_tools(tools))
    return render_text(turns, template, open_role="assistant", open_text=open_text)


_PROBE_TOOL = {"type": "function", "function": {
    "name": "aiolm_probe_tool", "description": "", "parameters": {"type": "object", "properties": {}}}}


#: Whether a template renders tools, by (template source, its keyword arguments): the probe
#: is a render of its own, so each template is probed once, not once per request.
_RENDERS_TOOLS: dict[tuple[str, str], bool] = {}


def _renders_tools(backend: Backend, source: str, template_kwargs: dict[str, Any]) -> bool:
    """True when the backend's chat template writes the tools it is given into the prompt."""
    key = (source, repr(sorted(template_kwargs.items())))
    known = _RENDERS_TOOLS.get(key)
    if known is not None:
        return known
    try:
        probe = backend.render_chat([{"role": "user", "content": "x"}], tools=[_PROBE_TOOL],
                                    add_generation_prompt=True, **template_kwargs)
    except ValueError:   # a template that fails on tools does not render them
        probe = ""
    if len(_RENDERS_TOOLS) >= 64:   # templates of a process are few; bound it all the same
        _RENDERS_TOOLS.clear()
    _RENDERS_TOOLS[key] = known = "aiolm_probe_tool" in probe
    return known


def _with_tools_described(turns: list[Message], described: str) -> list[Message]:
    """``turns`` with ``described`` (the tools and how to call them) in the system turn."""
    from ..chat import Message, TextPart

    if turns and turns[0].role == "system":
        first = turns[0]
        return [Message(role="system", parts=(*first.parts, TextPart(text="\n\n" + described))),
                *turns[1:]]
    return [Message(role="system", parts=(TextPart(text=described),)), *turns]


def _append_literal(rendered: str, text: str) -> str:
    """``rendered`` then ``text`` marked as message content (see ``aiolm.chat``)."""
    if not text:
        return rendered
    from ..engine.tokenizer import MarkedText

    return rendered + MarkedText(text, [(0, len(text))])


async def _parse_stream(chunks: AsyncIterator[Chunk], plan: ChatPlan) -> AsyncIterator[Chunk]:
    """The backend's chunks with thinking and calls split off the text."""
    thinking: ReasoningStreamer | None = (plan.reasoning_parser.streamer()
                                          if plan.reasoning_parser is not None else None)
    calls: ToolStreamer | None = plan.tool_parser.streamer() if plan.tool_parser is not None else None
    made_calls = False
    async for chunk in chunks:
        reasoning, content = (thinking.feed(chunk.text) if thinking is not None
                              else ("", chunk.text))
        if chunk.finish_reason is not None and thinking is not None:
            r_tail, c_tail = thinking.finish()
            reasoning, content = reasoning + r_tail, content + c_tail
        deltas: tuple[Any, ...] = ()
        if calls is not None:
            piece = calls.feed(content)
            content, deltas = piece.content, piece.calls
            if chunk.finish_reason is not None:
                tail = calls.finish()
                content, deltas = content + tail.content, deltas + tail.calls
        made_calls = made_calls or bool(deltas)
        finish = chunk.finish_reason
        if finish == "stop" and made_calls:
            finish = "tool_calls"
        yield attrs.evolve(chunk, text=content, reasoning=chunk.reasoning + reasoning,
                           tool_calls=chunk.tool_calls + deltas, finish_reason=finish)
