"""OpenAI request bodies (validated by the pydantic models of :mod:`.bodies`) as aiolm
``GenerateRequest``\\ s, with the checks that depend on the server (400 on anything wrong).

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
from ..sampling import SamplingParams
from ..tools.chat_stream import ChatPlan, needs_chat_layer, plan_chat
from .bodies import ChatBody, CompletionBody, ResponseFormat, ScoreBody, validate
from .chat_options import ChatParsers, parse_chat_options
from .errors import ApiError, bad
from .messages import to_messages

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


def _sampling(body: CompletionBody | ChatBody, *, max_tokens: int, logprobs: bool,
              top_logprobs: int, sent_as: dict[str, str]) -> SamplingParams:
    """The sampling parameters; an error names the field the client sent (``sent_as`` maps
    a ``SamplingParams`` field to the body field it came from where the names differ)."""
    temperature = body.temperature
    if temperature > _MAX_TEMPERATURE:
        raise bad("temperature", f"must be at most {_MAX_TEMPERATURE} (as OpenAI's API), "
                                 f"got {temperature:g}")
    fields: dict[str, Any] = dict(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        ignore_eos=body.ignore_eos,
        skip_special_tokens=body.skip_special_tokens,
        min_tokens=body.min_tokens,
        stop=body.stop,
        stop_token_ids=body.stop_token_ids,
        stop_regex=body.stop_regex,
        seed=body.seed,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )
    if body.logit_bias:   # token ids as strings, checked by the body model
        fields["logit_bias"] = {int(token): bias for token, bias in body.logit_bias.items()}
    try:
        return SamplingParams(**fields)
    except (TypeError, ValueError) as exc:
        message = str(exc)
        name = re.match(r"\w*", message).group()   # SamplingParams errors start with the field
        param = sent_as.get(name, name) if name in fields else None
        raise ApiError(400, message, param=param, code="invalid_value") from None


def _max_tokens(body: CompletionBody | ChatBody, default: int) -> tuple[int, str]:
    """``max_completion_tokens`` (OpenAI's newer name) or ``max_tokens``, and which was sent."""
    if body.max_completion_tokens is not None:
        return body.max_completion_tokens, "max_completion_tokens"
    return (default if body.max_tokens is None else body.max_tokens), "max_tokens"


def _constraint(body: CompletionBody | ChatBody) -> tuple[Constraint | None, str | None]:
    """The request's constraint and the field it came from; errors name that field."""
    found: list[tuple[str, Constraint]] = []
    for param, value, build in (("regex", body.regex, Regex), ("grammar", body.grammar, Grammar),
                                ("response_format", body.response_format, _response_format)):
        if value is None:
            continue
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


def _response_format(fmt: ResponseFormat) -> Constraint | None:
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return JSONSchema({"type": "object"})
    assert fmt.json_schema is not None   # the body model requires it for this type
    return JSONSchema(fmt.json_schema.schema_)


def _choices(name: str, count: int | None, limits: Limits, prompts: int, default: int) -> int:
    """``n`` (or ``best_of``): within ``max_n``, and prompts x it within ``max_choices``."""
    count = default if count is None else count
    if not 1 <= count <= limits.max_n:
        raise bad(name, f"must be between 1 and {limits.max_n}, got {count}")
    if prompts * count > limits.max_choices:
        raise bad(name, f"{prompts} prompts x {name}={count} is {prompts * count} choices, over "
                        f"this server's limit of {limits.max_choices} per request")
    return count


def _stream_options(body: CompletionBody | ChatBody) -> tuple[bool, bool]:
    if body.stream_options is None:
        return body.stream, False
    if not body.stream:   # as OpenAI's API answers
        raise bad("stream_options", "only allowed when stream is true")
    return True, body.stream_options.include_usage


def parse_completion(raw: dict[str, Any], backend: Backend,
                     limits: Limits = _DEFAULT_LIMITS) -> Parsed:
    """``POST /v1/completions``: ``raw`` (the JSON body) as a validated request."""
    if backend.capabilities.chat_only:
        raise ApiError(400, f"{backend.model_name} is a chat model: use /v1/chat/completions",
                       param="model", code="chat_only")
    body = validate(CompletionBody, raw)
    if body.suffix:
        raise bad("suffix", "not supported by this server")
    prompts = [tuple(p) if isinstance(p, list) else p for p in _prompts(body.prompt)]
    if len(prompts) > limits.max_prompts:
        raise bad("prompt", f"{len(prompts)} prompts is over this server's limit of "
                            f"{limits.max_prompts} per request")
    n = _choices("n", body.n, limits, len(prompts), 1)
    best_of = _choices("best_of", body.best_of, limits, len(prompts), n)
    if best_of < n:
        raise bad("best_of", f"must be at least n ({n}), got {best_of}")
    stream, include_usage = _stream_options(body)
    if stream and best_of > n:
        raise bad("best_of", "cannot be streamed: the best answers are known only at the end")
    k = body.logprobs
    echo = body.echo
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
                  token_ids=body.return_token_ids,
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


def _prompts(prompt: str | list[Any]) -> list[Any]:
    """The prompts of a validated ``prompt``: one text, texts, one id list, or id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


def parse_chat(raw: dict[str, Any], backend: Backend, limits: Limits = _DEFAULT_LIMITS, *,
               parsers: ChatParsers = ChatParsers()) -> Parsed:
    """``POST /v1/chat/completions``: ``raw`` (the JSON body) as a validated request;
    ``parsers`` are the tool-call and thinking formats the server reads from its model."""
    body = validate(ChatBody, raw)
    if body.functions:
        raise bad("functions", "not supported (the deprecated form of tools): send tools")
    if body.function_call is not None:
        raise bad("function_call", "not supported (the deprecated form of tool_choice): send "
                                   "tool_choice")
    messages = to_messages(body.messages)
    continue_final = body.continue_final_message
    if continue_final and messages[-1].role != "assistant":
        raise bad("continue_final_message", "the last message must be an assistant message")
    if not continue_final:
        messages.append(Message(role="assistant"))
    options = parse_chat_options(body, parsers)
    want_logprobs = body.logprobs
    top = body.top_logprobs
    if top and not want_logprobs:
        raise bad("top_logprobs", "needs logprobs: true")
    n = _choices("n", body.n, limits, 1, 1)
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
                  token_ids=body.return_token_ids,
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


def parse_score(raw: dict[str, Any], backend: Backend,
                limits: Limits = _DEFAULT_LIMITS) -> tuple[GenerateRequest, tuple[str, ...], str]:
    """``POST /v1/aiolm/score``: ``raw`` (the JSON body) as (prefix request, continuations,
    method)."""
    body = validate(ScoreBody, raw)
    continuations = body.continuations
    if len(continuations) > limits.max_score_continuations:
        raise bad("continuations", f"{len(continuations)} continuations is over this server's "
                                   f"limit of {limits.max_score_continuations} per request")
    if body.messages is not None:
        messages = to_messages(body.messages, tools=False)
        if messages[-1].role != "assistant":
            messages.append(Message(role="assistant"))
        prefix = _chat_request(messages, backend)
    else:
        if body.prompt is None:
            raise bad("prompt", "give a prompt (text) or messages")
        if backend.capabilities.chat_only:
            raise bad("prompt", f"{backend.model_name} is a chat model: give messages")
        prefix = GenerateRequest(prompt=body.prompt)
    return prefix, tuple(continuations), body.method
