"""The tool-calling and reasoning fields of ``/v1/chat/completions``: ``tools``,
``tool_choice``, ``parallel_tool_calls``, ``reasoning_effort``, and aiolm's
``chat_template_kwargs`` and ``max_thinking_tokens`` (400 naming the field on anything wrong).

Whether a request thinks depends on the server: with a reasoning parser (configured, or
detected from the model's chat template) it does, unless ``chat_template_kwargs`` says
``enable_thinking: false``; the thinking is returned apart as ``reasoning_content``.
"""

from __future__ import annotations

from typing import Any

import attrs

from ..backends.base import Reasoning
from ..constraints import JSONSchema
from ..errors import ConstraintError
from ..tools.spec import Tool, as_tools, check_tool_choice
from .bodies import ChatBody
from .errors import ApiError, bad

__all__ = ["ChatOptions", "ChatParsers", "parse_chat_options"]


@attrs.frozen(kw_only=True)
class ChatParsers:
    """The tool-call and thinking formats the server reads (``None``: none known)."""

    tool: str | None = None
    reasoning: str | None = None


@attrs.frozen(kw_only=True)
class ChatOptions:
    """The tool and reasoning fields of one chat request, as ``GenerateRequest`` takes them."""

    tools: tuple[Tool, ...] = ()
    tool_choice: str = "auto"
    parallel_tool_calls: bool = True
    reasoning: Reasoning | None = None
    template_kwargs: tuple[tuple[str, Any], ...] = ()


def parse_chat_options(body: ChatBody, parsers: ChatParsers) -> ChatOptions:
    """The tool and reasoning fields of ``body``; ``parsers`` are the server's formats."""
    tools = _tools(body)
    choice = body.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    else:
        try:
            choice = check_tool_choice(choice, tools)
        except ValueError as exc:
            raise ApiError(400, str(exc), param="tool_choice", code="invalid_value") from None
    kwargs = body.chat_template_kwargs
    return ChatOptions(tools=tools, tool_choice=choice, parallel_tool_calls=body.parallel_tool_calls,
                       reasoning=_reasoning(body, kwargs, parsers),
                       template_kwargs=tuple(kwargs.items()))


def _tools(body: ChatBody) -> tuple[Tool, ...]:
    if not body.tools:
        return ()
    try:
        tools = as_tools([{"type": "function", "function": t.function} for t in body.tools])
    except (TypeError, ValueError) as exc:
        raise ApiError(400, str(exc), param="tools", code="invalid_value") from None
    for i, tool in enumerate(tools):
        # The schema is compiled to a grammar when a call is forced or strict: a schema the
        # grammar engine refuses is a bad request now, not an error mid-answer.
        try:
            JSONSchema(dict(tool.parameters)).validate()
        except ConstraintError as exc:
            message = str(exc).removeprefix("json_schema: ")
            raise ApiError(400, f"tools[{i}] ({tool.name}): parameters is not a valid JSON "
                                f"schema: {message}", param="tools",
                           code="invalid_value") from None
    return tools


def _reasoning(body: ChatBody, kwargs: dict[str, Any], parsers: ChatParsers) -> Reasoning | None:
    budget = body.max_thinking_tokens
    try:
        reasoning = Reasoning(enabled=kwargs.get("enable_thinking") is not False,
                              max_thinking_tokens=budget, effort=body.reasoning_effort)
    except ValueError as exc:
        param = "max_thinking_tokens" if str(exc).startswith("max_thinking") else "reasoning_effort"
        raise ApiError(400, str(exc), param=param, code="invalid_value") from None
    if parsers.reasoning is not None:
        return reasoning
    if budget is not None:
        raise bad("max_thinking_tokens", "this server reads no thinking from its model (start it "
                                         "with --reasoning-parser for a reasoning model)")
    return None   # reasoning_effort of a model that does not think: accepted, as OpenAI does
