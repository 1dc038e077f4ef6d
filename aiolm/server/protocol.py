"""Parsing OpenAI request bodies into aiolm ``GenerateRequest``\\ s (400 on anything wrong).

Besides the OpenAI fields, both endpoints take aiolm's extensions: ``regex``, ``grammar``,
``top_k``, ``min_p``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``, ``stop_regex``,
``return_token_ids`` (each choice and chunk also carries its ``token_ids``);
``/v1/completions`` also takes ``response_format``; ``/v1/chat/completions`` takes
``continue_final_message`` (the last assistant message is continued, not closed).

How much one request may ask for is bounded by :class:`Limits` (400 beyond, naming the field).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any, Literal

import attrs

from ..backends.base import Backend, GenerateRequest, ImageData
from ..chat import ImagePart, Message, TextPart, render_text
from ..constraints import Constraint, Grammar, JSONSchema, Regex
from ..errors import ConstraintError
from ..primitives import SELECT_METHODS
from ..sampling import SamplingParams
from .errors import ApiError

__all__ = ["Limits", "Parsed", "parse_chat", "parse_completion", "parse_json", "parse_score"]

_CHAT_DEFAULT_MAX_TOKENS = 256
_COMPLETION_DEFAULT_MAX_TOKENS = 16   # the OpenAI default


def _positive_int(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name}: expected a positive int, got {value!r}")


@attrs.frozen(kw_only=True)
class Limits:
    """What one request may ask for; a request over a limit gets a 400 naming the field.

    ``max_json_depth``: nesting of the body (an object holding a list is depth 2);
    ``max_prompts``: prompts of one ``/v1/completions`` request; ``max_n``: ``n``;
    ``max_choices``: prompts x ``n``; ``max_score_continuations``: continuations of one
    ``/v1/aiolm/score`` request.
    """

    max_json_depth: int = attrs.field(default=64, validator=_positive_int)
    max_prompts: int = attrs.field(default=64, validator=_positive_int)
    max_n: int = attrs.field(default=16, validator=_positive_int)
    max_choices: int = attrs.field(default=128, validator=_positive_int)
    max_score_continuations: int = attrs.field(default=64, validator=_positive_int)


_DEFAULT_LIMITS = Limits()


@attrs.frozen(kw_only=True)
class Parsed:
    """A validated request: one ``GenerateRequest`` per prompt (each run ``n`` times)."""

    kind: Literal["completion", "chat"]
    requests: tuple[GenerateRequest, ...]
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    token_ids: bool = False                # extension ``return_token_ids``: ids in each choice
    prompt_offsets: tuple[int, ...] = ()   # completions: where each answer's text_offset starts
    prompt_param: str = "prompt"           # the field an error about the prompt names
    constraint_param: str | None = None    # the field the constraint came from

    @property
    def size(self) -> int:
        """How many backend requests this request makes (prompts x ``n``)."""
        return len(self.requests) * self.n


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
        raise _bad(field, f"not valid Unicode: a lone surrogate (U+{ord(text[exc.start]):04X}) "
                          f"at character {exc.start}") from None


def _too_deep(param: str | None, max_depth: int) -> ApiError:
    where = f"{param} is" if param else "the body is"
    return ApiError(400, f"JSON nested too deeply: {where} nested over this server's limit of "
                         f"{max_depth} levels.", param=param, code="json_too_deep")


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code="invalid_value")


def _get(body: dict[str, Any], name: str, types: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise _bad(name, f"expected {_type_names(types)}, got a boolean")
    if not isinstance(value, types):
        raise _bad(name, f"expected {_type_names(types)}, got {type(value).__name__}")
    return value


def _type_names(types: type | tuple[type, ...]) -> str:
    items = types if isinstance(types, tuple) else (types,)
    return " or ".join(t.__name__ for t in items)


# OpenAI's API refuses temperatures above 2; clients rely on the same answer here.
_MAX_TEMPERATURE = 2


def _sampling(body: dict[str, Any], *, max_tokens: int | None, logprobs: bool, top_logprobs: int,
              sent_as: dict[str, str]) -> SamplingParams:
    """The sampling parameters; an error names the field the client sent (``sent_as`` maps
    a ``SamplingParams`` field to the body field it came from where the names differ)."""
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str | list):
        raise _bad("stop", "expected a string or a list of strings")
    temperature = _get(body, "temperature", (int, float), 1.0)
    if isinstance(temperature, int | float) and temperature > _MAX_TEMPERATURE:
        raise _bad("temperature", f"must be at most {_MAX_TEMPERATURE} (as OpenAI's API), "
                                  f"got {temperature}")
    fields: dict[str, Any] = dict(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=_get(body, "top_p", (int, float), 1.0),
        top_k=_get(body, "top_k", int, 0),
        min_p=_get(body, "min_p", (int, float), 0.0),
        frequency_penalty=_get(body, "frequency_penalty", (int, float), 0.0),
        presence_penalty=_get(body, "presence_penalty", (int, float), 0.0),
        ignore_eos=_get(body, "ignore_eos", bool, False),
        min_tokens=_get(body, "min_tokens", int, 0),
        stop=stop,
        stop_token_ids=_get(body, "stop_token_ids", list, None),
        stop_regex=_get(body, "stop_regex", str, None),
        seed=_get(body, "seed", int, None),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )
    try:
        return SamplingParams(**fields)
    except (TypeError, ValueError) as exc:
        message = str(exc)
        name = re.match(r"\w*", message).group()   # SamplingParams errors start with the field
        param = sent_as.get(name, name) if name in fields else None
        raise ApiError(400, message, param=param, code="invalid_value") from None


def _constraint(body: dict[str, Any]) -> tuple[Constraint | None, str | None]:
    """The request's constraint and the field it came from; errors name that field."""
    found: list[tuple[str, Constraint]] = []
    for param, build in (("regex", Regex), ("grammar", Grammar), ("response_format", _response_format)):
        value = body.get(param)
        if value is None:
            continue
        if param != "response_format" and not isinstance(value, str):
            raise _bad(param, f"expected a string, got {type(value).__name__}")
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


def _n(body: dict[str, Any], limits: Limits, prompts: int) -> int:
    n = _get(body, "n", int, 1)
    if not 1 <= n <= limits.max_n:
        raise _bad("n", f"must be between 1 and {limits.max_n}, got {n}")
    if prompts * n > limits.max_choices:
        raise _bad("n", f"{prompts} prompts x n={n} is {prompts * n} choices, over this server's "
                        f"limit of {limits.max_choices} per request")
    return n


def _stream_options(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = _get(body, "stream", bool, False)
    options = _get(body, "stream_options", dict, {})
    return stream, bool(stream and options.get("include_usage"))


def parse_completion(body: dict[str, Any], backend: Backend, limits: Limits = _DEFAULT_LIMITS) -> Parsed:
    """``POST /v1/completions``."""
    if backend.capabilities.chat_only:
        raise ApiError(400, f"{backend.model_name} is a chat model: use /v1/chat/completions",
                       param="model", code="chat_only")
    if _get(body, "suffix", str, ""):
        raise _bad("suffix", "not supported by this server")
    if _get(body, "logit_bias", dict, {}):
        raise _bad("logit_bias", "not supported by this server")
    if _get(body, "echo", bool, False):
        raise _bad("echo", "not supported by this server (use POST /v1/aiolm/score to score text)")
    best_of = _get(body, "best_of", int, None)
    if best_of not in (None, 1):
        raise _bad("best_of", "only 1 is supported")
    prompts = _prompts(body.get("prompt"))
    if len(prompts) > limits.max_prompts:
        raise _bad("prompt", f"{len(prompts)} prompts is over this server's limit of "
                             f"{limits.max_prompts} per request")
    n = _n(body, limits, len(prompts))
    k = _get(body, "logprobs", int, None)
    if k is not None and not 0 <= k <= 20:
        raise _bad("logprobs", f"must be between 0 and 20, got {k}")
    sampling = _sampling(body, max_tokens=_get(body, "max_tokens", int, _COMPLETION_DEFAULT_MAX_TOKENS),
                         logprobs=k is not None, top_logprobs=k or 0,
                         sent_as={"top_logprobs": "logprobs"})
    constraint, constraint_param = _constraint(body)
    requests = []
    for p in prompts:
        if isinstance(p, tuple) and not backend.capabilities.token_ids:
            raise _bad("prompt", f"{backend.model_name} takes text prompts, not token ids")
        kw = {"prompt": p} if isinstance(p, str) else {"input_ids": p}
        requests.append(GenerateRequest(**kw, sampling=sampling, constraint=constraint))
    stream, include_usage = _stream_options(body)
    return Parsed(kind="completion", requests=tuple(requests), n=n, stream=stream,
                  include_usage=include_usage, logprobs=k is not None,
                  token_ids=_get(body, "return_token_ids", bool, False),
                  prompt_offsets=tuple(len(p) if isinstance(p, str) else 0 for p in prompts),
                  constraint_param=constraint_param)


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
    raise _bad("prompt", "expected a string, a list of strings, or token ids")


def _is_ids(value: Any) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value))


def parse_chat(body: dict[str, Any], backend: Backend, limits: Limits = _DEFAULT_LIMITS) -> Parsed:
    """``POST /v1/chat/completions``."""
    for name in ("tools", "functions"):
        if _get(body, name, list, []):
            raise _bad(name, "not supported by this server")
    if _get(body, "logit_bias", dict, {}):
        raise _bad("logit_bias", "not supported by this server")
    messages = _messages(body.get("messages"))
    continue_final = _get(body, "continue_final_message", bool, False)
    if continue_final and messages[-1].role != "assistant":
        raise _bad("continue_final_message", "the last message must be an assistant message")
    if not continue_final:
        messages.append(Message(role="assistant"))
    want_logprobs = _get(body, "logprobs", bool, False)
    top = _get(body, "top_logprobs", int, 0)
    if top and not want_logprobs:
        raise _bad("top_logprobs", "needs logprobs: true")
    n = _n(body, limits, 1)
    max_tokens_param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _get(body, max_tokens_param, int, _CHAT_DEFAULT_MAX_TOKENS)
    sampling = _sampling(body, max_tokens=max_tokens, logprobs=want_logprobs, top_logprobs=top,
                         sent_as={"max_tokens": max_tokens_param})
    constraint, constraint_param = _constraint(body)
    request = _chat_request(messages, backend, sampling=sampling, constraint=constraint)
    stream, include_usage = _stream_options(body)
    return Parsed(kind="chat", requests=(request,), n=n, stream=stream,
                  include_usage=include_usage, logprobs=want_logprobs,
                  token_ids=_get(body, "return_token_ids", bool, False),
                  prompt_param="messages", constraint_param=constraint_param)


def _chat_request(messages: list[Message], backend: Backend, **kw: Any) -> GenerateRequest:
    """The request for ``messages`` whose last one is the open assistant turn."""
    images = tuple(img for m in messages for img in m.images)
    if images and not backend.capabilities.images:
        raise _bad("messages", f"{backend.model_name} does not take images")
    if backend.capabilities.chat_only:
        return GenerateRequest(messages=tuple(messages), **kw)
    template = backend.chat_template
    if template is None:
        raise ApiError(400, f"{backend.model_name} has no chat template: use /v1/completions",
                       param="messages", code="no_chat_template")
    prompt = render_text(messages[:-1], template, open_role="assistant", open_text=messages[-1].content)
    return GenerateRequest(prompt=prompt, images=images, **kw)


def _messages(value: Any) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise _bad("messages", "expected a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", "expected an object")
        role = m.get("role")
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant"):
            raise _bad(f"messages[{i}].role", f"unsupported role {role!r} (system, user, assistant)")
        out.append(Message(role=role, parts=_parts(m.get("content"), f"messages[{i}].content")))
    return out


def _parts(content: Any, param: str) -> tuple[TextPart | ImagePart, ...]:
    if content is None:
        return ()
    if isinstance(content, str):
        return (TextPart(text=content),)
    if not isinstance(content, list):
        raise _bad(param, "expected a string or a list of content parts")
    parts: list[TextPart | ImagePart] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(TextPart(text=part["text"]))
        elif kind == "image_url" and isinstance(part.get("image_url"), dict | str):
            spec = part["image_url"]
            url = spec.get("url") if isinstance(spec, dict) else spec
            parts.append(ImagePart(image=_image(url, param)))
        else:
            raise _bad(param, "content parts must be {'type': 'text'} or {'type': 'image_url'}")
    return tuple(parts)


def _image(url: Any, param: str) -> ImageData:
    if not isinstance(url, str):
        raise _bad(param, "image_url.url must be a string")
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        if not header.endswith(";base64"):
            raise _bad(param, "image data URLs must be base64")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise _bad(param, "image data URL is not valid base64") from None
        return ImageData(data=raw, mime=header[5:-7] or "image/png")
    if url.startswith(("http://", "https://")):
        return ImageData(url=url)
    raise _bad(param, "image_url.url must be a data: or http(s) URL")


def parse_score(body: dict[str, Any], backend: Backend,
                limits: Limits = _DEFAULT_LIMITS) -> tuple[GenerateRequest, tuple[str, ...], str]:
    """``POST /v1/aiolm/score``: (prefix request, continuations, method)."""
    continuations = body.get("continuations")
    if (not isinstance(continuations, list) or not continuations
            or not all(isinstance(c, str) for c in continuations)):
        raise _bad("continuations", "expected a non-empty list of strings")
    if len(continuations) > limits.max_score_continuations:
        raise _bad("continuations", f"{len(continuations)} continuations is over this server's "
                                    f"limit of {limits.max_score_continuations} per request")
    method = _get(body, "method", str, "token_length_normalized")
    if method not in SELECT_METHODS:
        raise _bad("method", f"expected one of {', '.join(SELECT_METHODS)}, got {method!r}")
    if "messages" in body:
        messages = _messages(body["messages"])
        if messages[-1].role != "assistant":
            messages.append(Message(role="assistant"))
        prefix = _chat_request(messages, backend)
    else:
        prompt = _get(body, "prompt", str, None)
        if prompt is None:
            raise _bad("prompt", "give a prompt (text) or messages")
        if backend.capabilities.chat_only:
            raise _bad("prompt", f"{backend.model_name} is a chat model: give messages")
        prefix = GenerateRequest(prompt=prompt)
    return prefix, tuple(continuations), method
