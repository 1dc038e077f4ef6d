"""Parsing OpenAI request bodies into aiolm ``GenerateRequest``\\ s (400 on anything wrong).

Besides the OpenAI fields, both endpoints take aiolm's extensions: ``regex``, ``grammar``,
``top_k``, ``min_p``, ``min_tokens``, ``ignore_eos``, ``skip_special_tokens``, ``stop_token_ids``, ``stop_regex``,
``return_token_ids`` (each choice and chunk also carries its ``token_ids``);
``/v1/completions`` also takes ``response_format``; ``/v1/chat/completions`` takes
``continue_final_message`` (the last assistant message is continued, not closed),
``chat_template_kwargs`` (extra variables of the model's chat template, such as
``enable_thinking``) and ``max_thinking_tokens`` (a reasoning model's thinking budget).

Fields OpenAI defines that change nothing here (``user``, ``store``, ``metadata``,
``service_tier``) are type-checked and ignored; fields nobody defines are ignored, as
OpenAI's own API does. How much one request may ask for is bounded by :class:`Limits`
(400 beyond, naming the field).
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import attrs

from ..backends.base import Backend, GenerateRequest
from ..chat import Message, render_text
from ..constraints import Constraint, Grammar, JSONSchema, Regex
from ..errors import ConstraintError, UnsupportedFeature
from ..primitives import SELECT_METHODS
from ..sampling import SamplingParams
from ..tools.chat_stream import ChatPlan, needs_chat_layer, plan_chat
from .chat_options import ChatParsers, parse_chat_options
from .errors import ApiError
from .fields import bad, get
from .messages import parse_messages

__all__ = ["ChatParsers", "Limits", "Parsed", "parse_chat", "parse_completion", "parse_json",
           "parse_score"]

_CHAT_DEFAULT_MAX_TOKENS = 256
_COMPLETION_DEFAULT_MAX_TOKENS = 16   # the OpenAI default


def _positive_int(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name}: expected a positive int, got {value!r}")


@attrs.frozen(kw_only=True)
class Limits:
    """What one request may ask for; a request over a limit gets a 400 naming the field.

    ``max_json_depth``: nesting of the body (an object holding a list is depth 2);
    ``max_prompts``: prompts of one ``/v1/completions`` request; ``max_n``: ``n`` and
    ``best_of``; ``max_choices``: prompts x ``n`` (x ``best_of``); ``max_score_continuations``:
    continuations of one ``/v1/aiolm/score`` request.
    """

    max_json_depth: int = attrs.field(default=64, validator=_positive_int)
    max_prompts: int = attrs.field(default=64, validator=_positive_int)
    max_n: int = attrs.field(default=16, validator=_positive_int)
    max_choices: int = attrs.field(default=128, validator=_positive_int)
    max_score_continuations: int = attrs.field(default=64, validator=_positive_int)


_DEFAULT_LIMITS = Limits()


@attrs.frozen(kw_only=True)
class Parsed:
    """A validated request: one ``GenerateRequest`` per prompt, each run ``best_of`` times
    (``n`` unless given), of which the ``n`` with the highest mean token logprob answer."""

    kind: Literal["completion", "chat"]
    requests: tuple[GenerateRequest, ...]
    n: int = 1
    best_of: int | None = None
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    token_ids: bool = False                # extension ``return_token_ids``: ids in each choice
    prompt_offsets: tuple[int, ...] = ()   # completions: where each answer's text_offset starts
    echo: tuple[str, ...] = ()             # completions with ``echo``: each prompt's text
    plan: ChatPlan | None = None           # a chat with tools or reasoning, rendered for a
                                           # text backend (aiolm.tools.stream_plan)
    prompt_param: str = "prompt"           # the field an error about the prompt names
    constraint_param: str | None = None    # the field the constraint came from

    @property
    def candidates(self) -> int:
        """How many answers each prompt gets before the best ``n`` are chosen."""
        return self.best_of or self.n

    @property
    def size(self) -> int:
        """How many backend requests this request makes (prompts x ``best_of``)."""
        return len(self.requests) * self.candidates


def parse_json(raw: bytes, *, max_depth: int) -> dict[str, Any]:
    """The request body as a JSON object nested at most ``max_depth`` deep (400 otherwise).

    CPU-bound on a large body: call it off the event loop.
    """
    try:
        body = json.loads(raw)
    except RecursionError:  # the decoder recurses once per level: far past max_depth
        raise _too_deep(None, max_depth) from None
    except (UnicodeDecodeError, ValueError):
        raise ApiError(400, "We could not parse the JSON body of your request.",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    # NOTE: iterative on purpose: the check must not itself recurse once per level.
    stack: list[tuple[Any, int, str]] = [(v, 1, k) for k, v in body.items()]
    while stack:
        value, depth, field = stack.pop()
        if isinstance(value, str):
            _check_unicode(field, value)
            continue
        if not isinstance(value, dict | list):
            continue
        if depth + 1 > max_depth:
            raise _too_deep(field, max_depth)
        if isinstance(value, dict):
            for key in value:
                _check_unicode(field, key)
        items = value.values() if isinstance(value, dict) else value
        stack.extend((v, depth + 1, field) for v in items)
    return body


def _check_unicode(field: str, text: str) -> None:
    """JSON's ``\\ud800`` escapes decode to lone surrogates, which no tokenizer, regex
    engine or UTF-8 encoder takes: refuse them here, naming the field."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad(field, f"not valid Unicode: a lone surrogate (U+{ord(text[exc.start]):04X}) "
                          f"at character {exc.start}") from None


def _too_deep(param: str | None, max_depth: int) -> ApiError:
    where = f"{param} is" if param else "the body is"
    return ApiError(400, f"JSON nested too deeply: {where} nested over this server's limit of "
                         f"{max_depth} levels.", param=param, code="json_too_deep")


# OpenAI's API refuses temperatures above 2; clients rely on the same answer here.
_MAX_TEMPERATURE = 2


#: Fields of OpenAI's API that change nothing here: type-checked, then ignored.
_IGNORED = {"user": str, "store": bool, "metadata": dict, "service_tier": str}


def _ignored_fields(body: dict[str, Any]) -> None:
    for name, kind in _IGNORED.items():
        get(body, name, kind)


def _sampling(body: dict[str, Any], *, max_tokens: int | None, logprobs: bool, top_logprobs: int,
              sent_as: dict[str, str]) -> SamplingParams:
    """The sampling parameters; an error names the field the client sent (``sent_as`` maps
    a ``SamplingParams`` field to the body field it came from where the names differ)."""
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str | list):
        raise bad("stop", "expected a string or a list of strings")
    temperature = get(body, "temperature", (int, float), 1.0)
    if isinstance(temperature, int | float) and temperature > _MAX_TEMPERATURE:
        raise bad("temperature", f"must be at most {_MAX_TEMPERATURE} (as OpenAI's API), "
                                 f"got {temperature}")
    fields: dict[str, Any] = dict(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=get(body, "top_p", (int, float), 1.0),
        top_k=get(body, "top_k", int, 0),
        min_p=get(body, "min_p", (int, float), 0.0),
        frequency_penalty=get(body, "frequency_penalty", (int, float), 0.0),
        presence_penalty=get(body, "presence_penalty", (int, float), 0.0),
        ignore_eos=get(body, "ignore_eos", bool, False),
        skip_special_tokens=get(body, "skip_special_tokens", bool, True),
        min_tokens=get(body, "min_tokens", int, 0),
        stop=stop,
        stop_token_ids=get(body, "stop_token_ids", list, None),
        stop_regex=get(body, "stop_regex", str, None),
        seed=get(body, "seed", int, None),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )
    bias = _logit_bias(body)
    if bias:
        fields["logit_bias"] = bias
    try:
        return SamplingParams(**fields)
    except (TypeError, ValueError) as exc:
        message = str(exc)
        name = re.match(r"\w*", message).group()   # SamplingParams errors start with the field
        param = sent_as.get(name, name) if name in fields else None
        raise ApiError(400, message, param=param, code="invalid_value") from None


def _logit_bias(body: dict[str, Any]) -> dict[int, float]:
    """OpenAI's ``logit_bias``: an object of token ids (as strings) to biases."""
    bias = get(body, "logit_bias", dict, {})
    out: dict[int, float] = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()):
            raise bad("logit_bias", f"keys are token ids written as strings ('50256'), got {key!r}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad("logit_bias", f"the bias of token {key} must be a number, got "
                                    f"{type(value).__name__}")
        out[int(key)] = value
    return out


def _max_tokens(body: dict[str, Any], default: int) -> tuple[int, str]:
    """``max_completion_tokens`` (OpenAI's newer name) or ``max_tokens``, and which was sent."""
    param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return get(body, param, int, default), param


def _constraint(body: dict[str, Any]) -> tuple[Constraint | None, str | None]:
    """The request's constraint and the field it came from; errors name that field."""
    found: list[tuple[str, Constraint]] = []
    for param, build in (("regex", Regex), ("grammar", Grammar), ("response_format", _response_format)):
        value = body.get(param)
        if value is None:
            continue
        if param != "response_format" and not isinstance(value, str):
            raise bad(param, f"expected a string, got {type(value).__name__}")
        try:
            spec = build(value)
        except (ConstraintError, TypeError, ValueError) as exc:
            raise ApiError(400, str(exc), param=param, code="invalid_constraint") from None
        if spec is not None:
            found.append((param, spec))
    if len(found) > 1:
        names = ", ".join(n for n, _ in found)
        raise ApiError(400, f"give at most one of regex, grammar, response_format (got {names})",
                       param=found[1][0], code="invalid_value")
    if not found:
        return None, None
    param, constraint = found[0]
    try:
        constraint.validate()
    except ConstraintError as exc:
        raise ApiError(400, str(exc), param=param, code="invalid_constraint") from None
    return constraint, param


def _response_format(fmt: Any) -> Constraint | None:
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise ConstraintError("response_format: expected an object with a 'type'")
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return JSONSchema({"type": "object"})
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise ConstraintError("response_format: json_schema needs {'name': ..., 'schema': {...}}")
        return JSONSchema(spec["schema"])
    raise ConstraintError(f"response_format: unknown type {kind!r} (text, json_object, json_schema)")


def _choices(body: dict[str, Any], name: str, limits: Limits, prompts: int, default: int) -> int:
    """``n`` (or ``best_of``): within ``max_n``, and prompts x it within ``max_choices``."""
    count = get(body, name, int, default)
    if not 1 <= count <= limits.max_n:
        raise bad(name, f"must be between 1 and {limits.max_n}, got {count}")
    if prompts * count > limits.max_choices:
        raise bad(name, f"{prompts} prompts x {name}={count} is {prompts * count} choices, over "
                        f"this server's limit of {limits.max_choices} per request")
    return count


def _stream_options(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = get(body, "stream", bool, False)
    options = get(body, "stream_options", dict, None)
    if options is None:
        return stream, False
    if not stream:   # as OpenAI's API answers
        raise bad("stream_options", "only allowed when stream is true")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise bad("stream_options", "include_usage must be a boolean")
    return stream, include


def parse_completion(body: dict[str, Any], backend: Backend, limits: Limits = _DEFAULT_LIMITS) -> Parsed:
    """``POST /v1/completions``."""
    if backend.capabilities.chat_only:
        raise ApiError(400, f"{backend.model_name} is a chat model: use /v1/chat/completions",
                       param="model", code="chat_only")
    _ignored_fields(body)
    if get(body, "suffix", str, ""):
        raise bad("suffix", "not supported by this server")
    prompts = _prompts(body.get("prompt"))
    if len(prompts) > limits.max_prompts:
        raise bad("prompt", f"{len(prompts)} prompts is over this server's limit of "
                            f"{limits.max_prompts} per request")
    n = _choices(body, "n", limits, len(prompts), 1)
    best_of = _choices(body, "best_of", limits, len(prompts), n)
    if best_of < n:
        raise bad("best_of", f"must be at least n ({n}), got {best_of}")
    stream, include_usage = _stream_options(body)
    if stream and best_of > n:
        raise bad("best_of", "cannot be streamed: the best answers are known only at the end")
    k = get(body, "logprobs", int, None)
    if k is not None and not 0 <= k <= 20:
        raise bad("logprobs", f"must be between 0 and 20, got {k}")
    echo = get(body, "echo", bool, False)
    max_tokens, max_tokens_param = _max_tokens(body, _COMPLETION_DEFAULT_MAX_TOKENS)
    # best_of ranks the candidates by their mean token logprob: they need logprobs.
    sampling = _sampling(body, max_tokens=max_tokens, logprobs=k is not None or best_of > n,
                         top_logprobs=k or 0,
                         sent_as={"top_logprobs": "logprobs", "max_tokens": max_tokens_param})
    constraint, constraint_param = _constraint(body)
    requests = []
    for p in prompts:
        if isinstance(p, tuple) and not backend.capabilities.token_ids:
            raise bad("prompt", f"{backend.model_name} takes text prompts, not token ids")
        kw = {"prompt": p} if isinstance(p, str) else {"input_ids": p}
        requests.append(GenerateRequest(**kw, sampling=sampling, constraint=constraint,
                                        prompt_logprobs=echo and k is not None))
    echoed = tuple(_prompt_text(p, backend) for p in prompts) if echo else ()
    offsets = (tuple(len(t) for t in echoed) if echo
               else tuple(len(p) if isinstance(p, str) else 0 for p in prompts))
    return Parsed(kind="completion", requests=tuple(requests), n=n, best_of=best_of,
                  stream=stream, include_usage=include_usage, logprobs=k is not None,
                  token_ids=get(body, "return_token_ids", bool, False),
                  prompt_offsets=offsets, echo=echoed, constraint_param=constraint_param)


def _prompt_text(prompt: str | tuple[int, ...], backend: Backend) -> str:
    """The text ``echo`` puts before the answer: the prompt, or its token ids decoded."""
    if isinstance(prompt, str):
        return prompt
    # NOTE: the backend protocol has no decode; the engine exposes its tokenizer.
    tokenizer = getattr(backend, "tokenizer", None)
    if tokenizer is None:
        raise bad("echo", f"{backend.model_name} has no tokenizer to write a token-id prompt "
                          "back as text: send the prompt as text")
    return tokenizer.decode(list(prompt), skip_special_tokens=False)


def _prompts(prompt: Any) -> list[str | tuple[int, ...]]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(_is_ids(p) for p in prompt):
            return [tuple(p) for p in prompt]
        if _is_ids(prompt):
            return [tuple(prompt)]
    raise bad("prompt", "expected a string, a list of strings, or token ids")


def _is_ids(value: Any) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value))


def parse_chat(body: dict[str, Any], backend: Backend, limits: Limits = _DEFAULT_LIMITS, *,
               parsers: ChatParsers = ChatParsers()) -> Parsed:
    """``POST /v1/chat/completions``; ``parsers`` are the tool-call and thinking formats the
    server reads from its model."""
    _ignored_fields(body)
    if get(body, "functions", list, []):
        raise bad("functions", "not supported (the deprecated form of tools): send tools")
    if body.get("function_call") is not None:
        raise bad("function_call", "not supported (the deprecated form of tool_choice): send "
                                   "tool_choice")
    messages = parse_messages(body.get("messages"))
    continue_final = get(body, "continue_final_message", bool, False)
    if continue_final and messages[-1].role != "assistant":
        raise bad("continue_final_message", "the last message must be an assistant message")
    if not continue_final:
        messages.append(Message(role="assistant"))
    options = parse_chat_options(body, parsers)
    want_logprobs = get(body, "logprobs", bool, False)
    top = get(body, "top_logprobs", int, 0)
    if top and not want_logprobs:
        raise bad("top_logprobs", "needs logprobs: true")
    n = _choices(body, "n", limits, 1, 1)
    max_tokens, max_tokens_param = _max_tokens(body, _CHAT_DEFAULT_MAX_TOKENS)
    sampling = _sampling(body, max_tokens=max_tokens, logprobs=want_logprobs, top_logprobs=top,
                         sent_as={"max_tokens": max_tokens_param})
    constraint, constraint_param = _constraint(body)
    request = GenerateRequest(messages=tuple(messages), sampling=sampling, constraint=constraint,
                              tools=options.tools, tool_choice=options.tool_choice,
                              parallel_tool_calls=options.parallel_tool_calls,
                              reasoning=options.reasoning, template_kwargs=options.template_kwargs)
    layered = needs_chat_layer(request) or bool(options.template_kwargs)
    plan = None
    if not layered:
        request = _chat_request(messages, backend, sampling=sampling, constraint=constraint)
    elif any(m.images for m in messages) and not backend.capabilities.images:
        raise bad("messages", f"{backend.model_name} does not take images")
    elif not backend.capabilities.chat_only:
        # Rendered and its grammar checked here, on the parsing thread: a bad tool schema
        # is a 400 before anything is admitted.
        try:
            plan = plan_chat(backend, request, tool_parser=parsers.tool,
                             reasoning_parser=parsers.reasoning)
        except (ValueError, ConstraintError, UnsupportedFeature) as exc:
            from .errors import api_error_for

            raise api_error_for(exc, prompt_param="messages",
                                constraint_param=constraint_param or "tools") from None
    stream, include_usage = _stream_options(body)
    return Parsed(kind="chat", requests=(request,), n=n, stream=stream,
                  include_usage=include_usage, logprobs=want_logprobs,
                  token_ids=get(body, "return_token_ids", bool, False),
                  plan=plan, prompt_param="messages",
                  constraint_param=constraint_param or ("tools" if options.tools else None))


def _chat_request(messages: list[Message], backend: Backend, **kw: Any) -> GenerateRequest:
    """The request for ``messages`` whose last one is the open assistant turn."""
    images = tuple(img for m in messages for img in m.images)
    if images and not backend.capabilities.images:
        raise bad("messages", f"{backend.model_name} does not take images")
    if backend.capabilities.chat_only:
        return GenerateRequest(messages=tuple(messages), **kw)
    template = backend.chat_template
    if template is None:
        raise ApiError(400, f"{backend.model_name} has no chat template: use /v1/completions",
                       param="messages", code="no_chat_template")
    prompt = render_text(messages[:-1], template, open_role="assistant", open_text=messages[-1].content)
    return GenerateRequest(prompt=prompt, images=images, **kw)


def parse_score(body: dict[str, Any], backend: Backend,
                limits: Limits = _DEFAULT_LIMITS) -> tuple[GenerateRequest, tuple[str, ...], str]:
    """``POST /v1/aiolm/score``: (prefix request, continuations, method)."""
    continuations = body.get("continuations")
    if (not isinstance(continuations, list) or not continuations
            or not all(isinstance(c, str) for c in continuations)):
        raise bad("continuations", "expected a non-empty list of strings")
    if len(continuations) > limits.max_score_continuations:
        raise bad("continuations", f"{len(continuations)} continuations is over this server's "
                                   f"limit of {limits.max_score_continuations} per request")
    method = get(body, "method", str, "token_length_normalized")
    if method not in SELECT_METHODS:
        raise bad("method", f"expected one of {', '.join(SELECT_METHODS)}, got {method!r}")
    if "messages" in body:
        messages = parse_messages(body["messages"], tools=False)
        if messages[-1].role != "assistant":
            messages.append(Message(role="assistant"))
        prefix = _chat_request(messages, backend)
    else:
        prompt = get(body, "prompt", str, None)
        if prompt is None:
            raise bad("prompt", "give a prompt (text) or messages")
        if backend.capabilities.chat_only:
            raise bad("prompt", f"{backend.model_name} is a chat model: give messages")
        prefix = GenerateRequest(prompt=prompt)
    return prefix, tuple(continuations), method
