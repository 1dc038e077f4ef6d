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
from .errors import ApiError
from .fields import bad, get

__all__ = ["ChatOptions", "ChatParsers", "parse_chat_options"]

# Variables the chat layer itself passes to the template: a client may not set them.
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "messages", "tools", "documents", "add_generation_prompt", "continue_final_message",
    "tokenize", "return_dict", "chat_template", "tool_choice",
})


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


def parse_chat_options(body: dict[str, Any], parsers: ChatParsers) -> ChatOptions:
    """The tool and reasoning fields of ``body``; ``parsers`` are the server's formats."""
    tools = _tools(body.get("tools"))
    choice = body.get("tool_choice")
    if choice is None:
        choice = "auto" if tools else "none"
    else:
        try:
            choice = check_tool_choice(choice, tools)
        except ValueError as exc:
            raise ApiError(400, str(exc), param="tool_choice", code="invalid_value") from None
    parallel = get(body, "parallel_tool_calls", bool, True)
    kwargs = _template_kwargs(body)
    return ChatOptions(tools=tools, tool_choice=choice, parallel_tool_calls=parallel,
                       reasoning=_reasoning(body, kwargs, parsers),
                       template_kwargs=tuple(kwargs.items()))


def _tools(value: Any) -> tuple[Tool, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise bad("tools", "expected a list of {'type': 'function', 'function': {...}}")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise bad("tools", f"tools[{i}]: expected an object")
        if item.get("type") != "function":
            raise bad("tools", f"tools[{i}]: unsupported tool type {item.get('type')!r} "
                               "(only 'function')")
        if not isinstance(item.get("function"), dict):
            raise bad("tools", f"tools[{i}]: expected a 'function' object")
    try:
        tools = as_tools(value)
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


def _template_kwargs(body: dict[str, Any]) -> dict[str, Any]:
    kwargs = get(body, "chat_template_kwargs", dict, {})
    for key in kwargs:
        if not key.isidentifier() or key in _RESERVED_TEMPLATE_KWARGS:
            raise bad("chat_template_kwargs", f"{key!r} cannot be set (template variables are "
                                              "identifiers other than messages, tools, ...)")
    thinking = kwargs.get("enable_thinking")
    if thinking is not None and not isinstance(thinking, bool):
        raise bad("chat_template_kwargs", "enable_thinking must be a boolean")
    return kwargs


def _reasoning(body: dict[str, Any], kwargs: dict[str, Any], parsers: ChatParsers) -> Reasoning | None:
    budget = get(body, "max_thinking_tokens", int, None)
    effort = get(body, "reasoning_effort", str, None)
    try:
        reasoning = Reasoning(enabled=kwargs.get("enable_thinking") is not False,
                              max_thinking_tokens=budget, effort=effort)
    except ValueError as exc:
        param = "max_thinking_tokens" if str(exc).startswith("max_thinking") else "reasoning_effort"
        raise ApiError(400, str(exc), param=param, code="invalid_value") from None
    if parsers.reasoning is not None:
        return reasoning
    if budget is not None:
        raise bad("max_thinking_tokens", "this server reads no thinking from its model (start it "
                                         "with --reasoning-parser for a reasoning model)")
    return None   # reasoning_effort of a model that does not think: accepted, as OpenAI does
