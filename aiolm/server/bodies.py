"""The request bodies of the server's POST routes as pydantic models, one per route:
:class:`CompletionBody` (``/v1/completions``), :class:`ChatBody` (``/v1/chat/completions``)
and :class:`ScoreBody` (``/v1/aiolm/score``).

The models check what a field is (its JSON type, its shape, values fixed by the API such
as a role or a tool type); :mod:`.protocol` then checks what depends on the server (its
limits, its backend) and builds the requests. Validation is strict: JSON types as sent
(``"5"`` is no number, ``true`` no integer). Fields nobody defines are ignored, as OpenAI's
own API does; fields OpenAI defines that change nothing here (``user``, ``store``,
``metadata``, ``service_tier``) are type-checked and ignored.

:func:`validate` turns the first problem into a 400 whose message names the exact place
(``tools[0].type: Input should be 'function' (got 'retrieval')``) and whose ``param`` is the
field the client sent (for a message, the message's field: ``messages[1].tool_call_id``).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from ..primitives import SELECT_METHODS
from .errors import ApiError, json_type

__all__ = ["ChatBody", "CompletionBody", "MessageBody", "ScoreBody", "validate"]

Body = TypeVar("Body", bound=BaseModel)


def validate(model: type[Body], body: dict[str, Any]) -> Body:
    """``body`` (a parsed JSON object) as ``model``; ``ApiError`` 400 naming the first bad field."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _api_error(exc.errors(include_url=False)[0]) from None


def _api_error(error: ErrorDetails) -> ApiError:
    loc = error["loc"]
    # Union members appear in a location under their tags ("<list>"), which are not field
    # names: the place a client knows leaves them out. (So no union here is a plain
    # ``str | dict``, whose tags would be "str" and "dict[str,any]": see _by_json_type.)
    parts = [p for p in loc if isinstance(p, int) or p.isidentifier()]
    where = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p)
                    for i, p in enumerate(parts))
    param = where if parts[0] == "messages" else str(parts[0])
    message = error["msg"]
    given = error.get("input")
    if error["type"].endswith("_type"):
        message += f" (got {json_type(given)})"
    elif error["type"] == "literal_error":
        message += f" (got {given!r:.60})"
    return ApiError(400, f"{where}: {message}", param=param, code="invalid_value")


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_left_out(cls, data: Any) -> Any:
        """A field sent as ``null`` takes its default, as if it were left out (OpenAI
        clients send nulls for what they do not set)."""
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


_JSON_KINDS = {str: "<string>", list: "<list>", dict: "<object>"}


def _by_json_type(expected: str, **members: Any) -> Any:
    """A union that picks its member by the value's JSON type (``string=``, ``list=``,
    ``object=``); any other value is the error ``expected ...``."""
    tags = {f"<{kind}>" for kind in members}

    def kind(value: Any) -> str | None:
        tag = _JSON_KINDS.get(type(value))
        return tag if tag in tags else None

    tagged = tuple(Annotated[t, Tag(f"<{kind}>")] for kind, t in members.items())
    return Annotated[Union[tagged],  # noqa: UP007  (a tuple of members: only Union takes it)
                     Discriminator(kind, custom_error_type="wrong_type",
                                   custom_error_message=f"expected {expected}")]


TokenId = Annotated[int, Field(ge=0)]
Stop = _by_json_type("a string or a list of strings", string=str, list=list[str])


def _prompt_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "<text>"
    if not isinstance(value, list) or not value:
        return None
    first = value[0]
    if isinstance(first, str):
        return "<texts>"
    if isinstance(first, int) and not isinstance(first, bool):
        return "<ids>"
    return "<id lists>" if isinstance(first, list) else None


#: A completion prompt: text, texts, token ids, or lists of token ids.
Prompt = Annotated[
    Union[Annotated[str, Tag("<text>")],  # noqa: UP007  (tagged members)
          Annotated[list[str], Tag("<texts>")],
          Annotated[list[TokenId], Tag("<ids>")],
          Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Tag("<id lists>")]],
    Discriminator(_prompt_kind, custom_error_type="wrong_type",
                  custom_error_message="expected a string, a list of strings, or token ids"),
]


# ------------------------------------------------------------------------ messages


class TextPartBody(_Strict):
    type: Literal["text"]
    text: str


class ImageUrlBody(_Strict):
    url: str
    detail: str | None = None   # accepted; images are given to the model as they are


class ImagePartBody(_Strict):
    type: Literal["image_url"]
    image_url: _by_json_type("a URL or {'url': ...}", string=str, object=ImageUrlBody)  # type: ignore[valid-type]

    @property
    def url(self) -> str:
        spec = self.image_url
        return spec if isinstance(spec, str) else spec.url


def _part_kind(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else None
    return {"text": "<text part>", "image_url": "<image part>"}.get(kind)


Part = Annotated[
    Union[Annotated[TextPartBody, Tag("<text part>")],  # noqa: UP007  (tagged members)
          Annotated[ImagePartBody, Tag("<image part>")]],
    Discriminator(_part_kind, custom_error_type="wrong_part",
                  custom_error_message="content parts must be {'type': 'text', 'text': ...} or "
                                       "{'type': 'image_url', 'image_url': ...}"),
]
Content = _by_json_type("a string or a list of content parts", string=str, list=list[Part])


class FunctionCallBody(_Strict):
    name: str = Field(min_length=1)
    arguments: _by_json_type("a JSON object, as a string", string=str,  # type: ignore[valid-type]
                             object=dict[str, Any]) = "{}"

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str | dict[str, Any]) -> dict[str, Any]:
        if isinstance(value, str):
            try:
                value = json.loads(value or "{}")
            except ValueError:
                raise PydanticCustomError("invalid_json", "not valid JSON") from None
        if not isinstance(value, dict):
            raise PydanticCustomError("not_object", "expected a JSON object (as a string)")
        return value


class ToolCallBody(_Strict):
    """A call an earlier assistant message made."""

    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCallBody


class MessageBody(_Strict):
    """One chat message: ``developer`` is the newer name of ``system``; ``tool`` answers the
    call ``tool_call_id``; ``tool_calls`` are read on assistant messages."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content | None = None  # type: ignore[valid-type]
    tool_calls: list[ToolCallBody] | None = None
    tool_call_id: str | None = None


Messages = Annotated[list[MessageBody], Field(min_length=1)]


# ------------------------------------------------------------------------ the routes


class StreamOptions(_Strict):
    include_usage: bool = False


class JSONSchemaSpec(_Strict):
    name: str | None = None
    schema_: Any = Field(alias="schema")   # a schema: the constraint compiler judges it
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise PydanticCustomError("missing", "json_schema needs {'name': ..., 'schema': {...}}")
        return self


class _Generation(_Strict):
    """The fields both generation routes take (sampling, stops, constraints, streaming)."""

    model: str = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    stop: Stop | None = None  # type: ignore[valid-type]
    stop_token_ids: list[int] | None = None
    stop_regex: str | None = None
    logit_bias: dict[str, Any] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool = False
    regex: str | None = None
    grammar: str | None = None
    response_format: ResponseFormat | None = None
    # OpenAI's, changing nothing here
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_biases(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        for key, bias in (value or {}).items():
            if not (key.isascii() and key.isdigit()):
                raise PydanticCustomError(
                    "bad_key", "keys are token ids written as strings ('50256'), got {key}",
                    {"key": repr(key)})
            if isinstance(bias, bool) or not isinstance(bias, int | float):
                raise PydanticCustomError(
                    "bad_bias", "the bias of token {key} must be a number, got {kind}",
                    {"key": key, "kind": json_type(bias)})
        return value


class CompletionBody(_Generation):
    """``POST /v1/completions``."""

    prompt: Prompt
    suffix: str = ""
    best_of: int | None = None
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False


class ToolBody(_Strict):
    type: Literal["function"]
    function: dict[str, Any]


_RESERVED_TEMPLATE_KWARGS = frozenset({
    "messages", "tools", "documents", "add_generation_prompt", "continue_final_message",
    "tokenize", "return_dict", "chat_template", "tool_choice",
})


class ChatBody(_Generation):
    """``POST /v1/chat/completions``."""

    messages: Messages
    continue_final_message: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    tools: list[ToolBody] = []
    tool_choice: _by_json_type(  # type: ignore[valid-type]
        "'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
        string=str, object=dict[str, Any]) | None = None
    parallel_tool_calls: bool = True
    reasoning_effort: str | None = None
    # aiolm's
    chat_template_kwargs: dict[str, Any] = {}
    max_thinking_tokens: int | None = None
    # OpenAI's deprecated forms of tools, refused with a pointer to the new ones
    functions: list[Any] = []
    function_call: Any = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_variables(cls, value: dict[str, Any]) -> dict[str, Any]:
        # The chat layer passes these variables itself: a client may not set them.
        for key in value:
            if not key.isidentifier() or key in _RESERVED_TEMPLATE_KWARGS:
                raise PydanticCustomError(
                    "reserved", "{key} cannot be set (template variables are identifiers other "
                                "than messages, tools, ...)", {"key": repr(key)})
        thinking = value.get("enable_thinking")
        if thinking is not None and not isinstance(thinking, bool):
            raise PydanticCustomError("not_bool", "enable_thinking must be a boolean")
        return value


class ScoreBody(_Strict):
    """``POST /v1/aiolm/score`` (``select`` for remote programs): a prefix as ``prompt``
    text or ``messages``, and the continuations to score after it."""

    model: str = Field(min_length=1)
    continuations: Annotated[list[str], Field(min_length=1)]
    method: Literal[SELECT_METHODS] = "token_length_normalized"  # type: ignore[valid-type]
    prompt: str | None = None
    messages: Messages | None = None
