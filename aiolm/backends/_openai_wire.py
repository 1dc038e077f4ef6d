"""Reading and writing the OpenAI wire format: response fields → aiolm values, constraints →
request fields. Pure functions, no I/O."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import regex

from ..chat import Message
from ..constraints.base import Constraint
from ..errors import BackendError, ConstraintError, UnsupportedFeature
from ..tools.spec import ToolCallDelta
from ._openai_errors import MalformedResponse
from .base import FinishReason, GenerateRequest, TokenLogprob, Usage

if TYPE_CHECKING:
    from httpx_sse import ServerSentEvent

__all__ = [
    "field",
    "sse_events",
    "chat_fields",
    "choice_schema",
    "constraint_fields",
    "finish_reason",
    "parse_choice_json",
    "read_chat_logprobs",
    "read_completion_logprobs",
    "read_reasoning",
    "read_tool_call_deltas",
    "read_usage",
    "split_open_turn",
    "the_choice",
]

#: The wrapper object a chat model fills for ``select`` / ``gen(choices=...)``.
CHOICE_KEY = "choice"


def field(obj: Any, name: str) -> Any:
    """``obj.name`` of an SDK object, or ``obj[name]`` of a parsed stream event (else None)."""
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


def the_choice(response: Any) -> Any:
    """The first choice of a response; MalformedResponse if there is none."""
    choices = field(response, "choices")
    if not choices or not isinstance(choices, list):
        raise MalformedResponse("the API's response has no choices")
    return choices[0]


def read_usage(usage: Any) -> Usage | None:
    """aiolm ``Usage`` from an OpenAI ``usage`` object (cached tokens from the details)."""
    if usage is None:
        return None
    details = field(usage, "prompt_tokens_details")
    return Usage(
        prompt_tokens=field(usage, "prompt_tokens") or 0,
        completion_tokens=field(usage, "completion_tokens") or 0,
        cached_tokens=(field(details, "cached_tokens") if details is not None else 0) or 0,
    )


def finish_reason(reason: str | None) -> FinishReason:
    """OpenAI's finish reason in aiolm's terms (a content filter is an abort)."""
    if reason == "length":
        return "length"
    if reason == "content_filter":
        return "abort"
    if reason in ("tool_calls", "function_call"):
        return "tool_calls"
    return "stop"


def read_reasoning(delta: Any) -> str:
    """The thinking in a chat message or delta: ``reasoning_content`` (aiolm's server,
    vLLM, SGLang, DeepSeek) or ``reasoning`` (some other servers)."""
    text = field(delta, "reasoning_content") or field(delta, "reasoning") or ""
    return text if isinstance(text, str) else ""


def read_tool_call_deltas(items: Any) -> tuple[ToolCallDelta, ...]:
    """The ``tool_calls`` of a chat delta (or a whole message) as aiolm's pieces.

    A piece without an ``index`` (a whole message's calls) takes its position. Raises
    MalformedResponse for a piece that is not an object or whose fields have wrong types.
    """
    if not items:
        return ()
    if not isinstance(items, list):
        raise MalformedResponse(f"the API sent tool_calls that are not a list: {items!r:.200}")
    out = []
    for position, item in enumerate(items):
        function = field(item, "function") or {}
        index = field(item, "index")
        index = position if index is None else index
        call_id, name = field(item, "id"), field(function, "name")
        arguments = field(function, "arguments") or ""
        if (isinstance(index, bool) or not isinstance(index, int) or index < 0
                or not isinstance(call_id, str | None) or not isinstance(name, str | None)
                or not isinstance(arguments, str)):
            raise MalformedResponse(f"the API sent a malformed tool call: {item!r:.200}")
        out.append(ToolCallDelta(index=index, id=call_id or None, name=name or None,
                                 arguments=arguments))
    return tuple(out)


def chat_fields(request: GenerateRequest) -> tuple[dict[str, Any], dict[str, Any]]:
    """The tool and reasoning fields of a chat request: (standard OpenAI fields, aiolm-server
    extension fields).

    Tools go as ``tools`` (a named ``tool_choice`` as OpenAI's object form;
    ``parallel_tool_calls`` only when off); ``Reasoning.effort`` as ``reasoning_effort``.
    A thinking budget, thinking switched off, and template variables are aiolm's:
    ``max_thinking_tokens`` and ``chat_template_kwargs``.
    """
    fields: dict[str, Any] = {}
    extension: dict[str, Any] = {}
    if request.tools:
        fields["tools"] = [t.to_openai() for t in request.tools]
        choice = request.tool_choice
        fields["tool_choice"] = (choice if choice in ("none", "auto", "required")
                                 else {"type": "function", "function": {"name": choice}})
        if not request.parallel_tool_calls:
            fields["parallel_tool_calls"] = False
    template_kwargs = dict(request.template_kwargs)
    reasoning = request.reasoning
    if reasoning is not None:
        if reasoning.effort is not None:
            fields["reasoning_effort"] = reasoning.effort
        if reasoning.max_thinking_tokens is not None:
            extension["max_thinking_tokens"] = reasoning.max_thinking_tokens
        if not reasoning.enabled:
            template_kwargs.setdefault("enable_thinking", False)
    if template_kwargs:
        extension["chat_template_kwargs"] = template_kwargs
    return fields, extension


def _lp(value: Any) -> float:
    return float(value) if value is not None else -math.inf


def read_completion_logprobs(logprobs: Any) -> tuple[TokenLogprob, ...]:
    """Token logprobs of a completions choice (``tokens`` / ``token_logprobs`` / ``top_logprobs``).

    The API gives no token ids: ``token_id`` is -1.
    """
    tokens = field(logprobs, "tokens") if logprobs is not None else None
    if not tokens:
        return ()
    values = field(logprobs, "token_logprobs") or [None] * len(tokens)
    tops = field(logprobs, "top_logprobs") or [None] * len(tokens)
    return tuple(
        TokenLogprob(token_id=-1, token=tok, logprob=_lp(lp),
                     top=tuple((-1, t, _lp(v)) for t, v in (top or {}).items()))
        for tok, lp, top in zip(tokens, values, tops, strict=False)
    )


def read_chat_logprobs(logprobs: Any) -> tuple[TokenLogprob, ...]:
    """Token logprobs of a chat choice (``logprobs.content``). ``token_id`` is -1."""
    content = field(logprobs, "content") if logprobs is not None else None
    if not content:
        return ()
    return tuple(
        TokenLogprob(token_id=-1, token=field(item, "token"), logprob=_lp(field(item, "logprob")),
                     top=tuple((-1, field(t, "token"), _lp(field(t, "logprob")))
                               for t in (field(item, "top_logprobs") or ())))
        for item in content
    )


def split_open_turn(messages: tuple[Message, ...]) -> tuple[tuple[Message, ...], str]:
    """Split off the open assistant turn: (the turns before it, its text so far).

    A conversation that does not end with an assistant turn opens a new, empty one.
    """
    if messages and messages[-1].role == "assistant":
        return messages[:-1], messages[-1].content
    return messages, ""


def choice_schema(choices: tuple[str, ...]) -> dict[str, Any]:
    """A strict response format whose only valid answers name one of ``choices``."""
    return {
        "type": "json_schema",
        "json_schema": {
            "name": "choice",
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {CHOICE_KEY: {"type": "string", "enum": list(choices)}},
                "required": [CHOICE_KEY],
                "additionalProperties": False,
            },
        },
    }


def parse_choice_json(text: str, choices: tuple[str, ...]) -> int:
    """The index of the choice a :func:`choice_schema` answer names (ConstraintError if none)."""
    try:
        value = json.loads(text)[CHOICE_KEY]
    except (ValueError, TypeError, KeyError):
        raise ConstraintError(f"the API's answer {text!r} is not the choice object asked for") from None
    if value not in choices:
        raise ConstraintError(f"the API chose {value!r}, which is not one of {list(choices)}")
    return choices.index(value)


def constraint_fields(constraint: Constraint | None, *, chat: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Request fields for ``constraint``: (standard OpenAI fields, aiolm-server extension fields).

    Chat models take JSON schemas (and choices) as ``response_format``; regex and grammars
    are not part of the chat API. Completion models take every constraint only as aiolm
    server extensions. Raises ``UnsupportedFeature`` for what neither can carry.
    """
    if constraint is None:
        return {}, {}
    grammar = constraint.as_grammar()
    if grammar is None:
        raise UnsupportedFeature(
            f"constraint: the OpenAI backend cannot apply a custom {type(constraint).__name__}; "
            "use aiolm.Engine"
        )
    if grammar.kind == "json_schema":
        schema = json.loads(grammar.source)
        fmt = {"type": "json_schema",
               "json_schema": {"name": "output", "schema": schema, "strict": False}}
        return ({"response_format": fmt}, {}) if chat else ({}, {"response_format": fmt})
    if grammar.kind == "choices":
        if chat:
            return {"response_format": choice_schema(grammar.source)}, {}
        return {}, {"regex": "|".join(regex.escape(c) for c in grammar.source)}
    kind = "regex" if grammar.kind == "regex" else "grammar"
    if chat:
        raise UnsupportedFeature(
            f"{kind} constraints: the OpenAI chat API cannot constrain decoding by a {kind}; "
            "use json_schema, a completion model on aiolm's server, or aiolm.Engine"
        )
    return {}, {kind: grammar.source}


async def sse_events(events: AsyncIterator[ServerSentEvent]) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of a server-sent-event stream, parsed by ``httpx_sse``, to the end.

    The parser joins an event's ``data:`` lines with newlines (JSON may span lines) and drops
    comments; events without data (keep-alives) and ``[DONE]`` are skipped. Reading past
    ``[DONE]`` to the end of the body lets every iterator underneath finish normally (an
    abandoned one would be finalized later, on another task). An event with an ``error``
    raises :class:`BackendError`; data that is not a JSON object, MalformedResponse.
    """
    async for sse in events:
        data = sse.data
        if data.strip() in ("", "[DONE]"):
            continue
        try:
            event = json.loads(data)
        except ValueError:
            raise MalformedResponse(f"the API streamed an event that is not JSON: {data[:200]!r}") from None
        if not isinstance(event, dict):
            raise MalformedResponse(f"the API streamed an event that is not an object: {data[:200]!r}")
        error = event.get("error")
        if error:
            message = error.get("message") if isinstance(error, dict) else str(error)
            raise BackendError(f"the API reported an error mid-stream: {message}")
        yield event
