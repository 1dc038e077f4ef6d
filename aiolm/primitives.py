"""The primitives a program appends to its state: text, ``gen``, ``select``, ``image``, roles,
``tool_result``.

All of them are frozen data (no I/O): building one validates its arguments and raises
``ValueError`` / ``TypeError`` naming the bad argument; running one is the program
state's job (``aiolm.program``). Exprs compose with ``+`` into a :class:`Concat`::

    s += "Q: " + question + "\\nA:" + gen("answer", stop="\\n")
    s += user("Describe " + image("cat.png")) + assistant(gen("caption"))
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import attrs

from .backends.base import SELECT_METHODS, Reasoning, SelectMethod
from .constraints.base import Constraint
from .constraints.choices import Choices
from .constraints.grammar import Grammar
from .constraints.json_schema import JSONSchema
from .constraints.regex import Regex
from .sampling import SamplingParams, normalize_stop
from .tools.spec import Tool, ToolCall, as_tools, check_tool_choice

__all__ = [
    "Concat",
    "Expr",
    "Gen",
    "Image",
    "Role",
    "Select",
    "Text",
    "ToolResult",
    "Video",
    "assistant",
    "gen",
    "image",
    "select",
    "system",
    "tool_result",
    "user",
    "video",
    "as_expr",
    "DTYPE_REGEX",
    "parse_dtype",
]

RoleName = Literal["system", "user", "assistant"]

#: The regex a ``dtype`` becomes, and hence what the model may write for it.
DTYPE_REGEX: dict[type, str] = {
    int: r"-?(0|[1-9][0-9]{0,17})",
    float: r"-?(0|[1-9][0-9]{0,15})(\.[0-9]{1,10})?",
    bool: r"(True|False)",
}


def parse_dtype(dtype: type | None, text: str) -> Any:
    """Convert generated ``text`` to ``dtype`` (``str``/None returns it unchanged).

    Raises ``ValueError`` naming the dtype when the text is not a valid literal.
    """
    if dtype is None or dtype is str:
        return text
    stripped = text.strip()
    if dtype is bool:
        low = stripped.lower()
        if low in ("true", "yes", "1"):
            return True
        if low in ("false", "no", "0"):
            return False
        raise ValueError(f"dtype=bool: cannot parse {text!r} as a bool")
    try:
        return dtype(stripped)
    except ValueError:
        raise ValueError(f"dtype={dtype.__name__}: cannot parse {text!r}") from None


class Expr:
    """Base of everything that can be appended to a program state."""

    __slots__ = ()

    def __add__(self, other: object) -> Concat:
        return Concat(parts=(*_flatten(self), *_flatten(as_expr(other))))

    def __radd__(self, other: object) -> Concat:
        return Concat(parts=(*_flatten(as_expr(other)), *_flatten(self)))


def _flatten(expr: Expr) -> tuple[Expr, ...]:
    return expr.parts if isinstance(expr, Concat) else (expr,)


def as_expr(value: object) -> Expr:
    """Turn a ``str`` (or an ``Expr``) into an ``Expr``; anything else is a TypeError."""
    if isinstance(value, Expr):
        return value
    if isinstance(value, str):
        return Text(text=value)
    raise TypeError(
        f"cannot append a {type(value).__name__} to a program state; "
        "use text (str), gen, select, image or a role (format plain values into an f-string)"
    )


@attrs.frozen(kw_only=True)
class Text(Expr):
    """Literal prompt text."""

    text: str


@attrs.frozen(kw_only=True)
class Concat(Expr):
    """A sequence of exprs, appended in order."""

    parts: tuple[Expr, ...]


def _check_name(name: object, *, required: bool) -> None:
    if name is None:
        if required:
            raise ValueError("name: select needs a variable name")
        return
    if not isinstance(name, str) or not name:
        raise TypeError(f"name: expected a non-empty str, got {name!r}")


_SAMPLING_FIELDS = (
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "frequency_penalty",
    "presence_penalty", "ignore_eos", "min_tokens", "stop", "stop_token_ids", "stop_regex",
    "seed",
)


@attrs.frozen(kw_only=True)
class Gen(Expr):
    """Generate text into variable ``name``. ``None`` fields inherit the run's defaults.

    A gen with ``tools`` or ``reasoning`` is a chat request (:attr:`chat`): it runs through
    :func:`aiolm.tools.stream_chat` inside an assistant turn.
    """

    name: str | None
    sampling: dict[str, Any] = attrs.field(factory=dict, hash=False)
    constraint: Constraint | None = None
    dtype: type | None = None
    return_logprobs: bool = False
    top_logprobs: int = 0
    tools: tuple[Tool, ...] = ()
    tool_choice: str = "auto"
    parallel_tool_calls: bool = True
    reasoning: Reasoning | None = None

    @property
    def chat(self) -> bool:
        """Whether this gen needs the chat layer (tools or reasoning)."""
        return bool(self.tools) or self.reasoning is not None

    def sampling_params(self, defaults: dict[str, Any] | None = None) -> SamplingParams:
        """Merge run-level ``defaults`` under this gen's own settings."""
        merged = dict(defaults or {})
        merged.update(self.sampling)
        merged["logprobs"] = self.return_logprobs or self.top_logprobs > 0
        merged["top_logprobs"] = self.top_logprobs
        return SamplingParams(**merged)


def gen(
    name: str | None = None,
    *,
    max_tokens: int | None = None,
    stop: str | Sequence[str] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    stop_regex: str | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    min_tokens: int | None = None,
    seed: int | None = None,
    regex: str | None = None,
    json_schema: Any = None,
    grammar: str | None = None,
    choices: Sequence[str] | None = None,
    dtype: type | None = None,
    constraint: Constraint | None = None,
    return_logprobs: bool = False,
    top_logprobs: int = 0,
    tools: Sequence[Any] | None = None,
    tool_choice: str | dict[str, Any] = "auto",
    parallel_tool_calls: bool = True,
    reasoning: bool = False,
    max_thinking_tokens: int | None = None,
    reasoning_effort: str | None = None,
) -> Gen:
    """Generate into variable ``name`` (unnamed gens only extend the text).

    At most one of ``regex``, ``json_schema``, ``grammar``, ``choices``, ``dtype``
    (other than ``str``) and ``constraint`` may be given. ``json_schema`` takes a dict,
    a JSON string, or a pydantic model class. ``dtype`` is ``int``, ``float``, ``bool``
    or ``str``; the variable is parsed into that type.

    ``tools`` (functions, pydantic model classes or JSON-schema tool dicts) lets the model
    call them: the variable is then a list of :class:`aiolm.ToolCall` when it did, its text
    when it answered. ``tool_choice`` is ``"auto"``, ``"none"``, ``"required"`` or a tool's
    name; ``parallel_tool_calls=False`` asks for one call at most. ``reasoning=True`` lets a
    reasoning model think first: the answer goes in the variable, the thinking in
    ``s.meta(name).reasoning``; ``max_thinking_tokens`` bounds the thinking (then the
    answer's own constraint applies), ``reasoning_effort`` (``"low"``, ``"medium"``,
    ``"high"``) is passed to APIs that take it. Gens with tools or reasoning go inside an
    assistant turn of a state made of turns.
    """
    _check_name(name, required=False)
    sampling = {
        k: v
        for k, v in dict(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            min_p=min_p, frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
            ignore_eos=ignore_eos, min_tokens=min_tokens, stop=stop,
            stop_token_ids=stop_token_ids, stop_regex=stop_regex, seed=seed,
        ).items()
        if v is not None
    }
    if "stop" in sampling:
        sampling["stop"] = normalize_stop(sampling["stop"])
    # Validate now, so the error points at the gen() call: unset fields take harmless values.
    probe = dict(sampling)
    probe.setdefault("max_tokens", max(probe.get("min_tokens", 0), 1))
    SamplingParams(**probe)
    if isinstance(return_logprobs, int) and not isinstance(return_logprobs, bool):
        raise TypeError("return_logprobs: expected a bool")
    if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or not 0 <= top_logprobs <= 20:
        raise ValueError(f"top_logprobs: expected an int in [0, 20], got {top_logprobs!r}")

    if dtype is not None and dtype not in (int, float, bool, str):
        raise ValueError(f"dtype: expected int, float, bool or str, got {dtype!r}")
    given = [
        k for k, v in (("regex", regex), ("json_schema", json_schema), ("grammar", grammar),
                       ("choices", choices), ("constraint", constraint),
                       ("dtype", dtype if dtype is not str else None))
        if v is not None
    ]
    if len(given) > 1:
        raise ValueError(f"gen: give at most one of {', '.join(given)} (they all constrain the output)")
    spec: Constraint | None = None
    if regex is not None:
        spec = Regex(regex)
    elif json_schema is not None:
        spec = JSONSchema(json_schema)
    elif grammar is not None:
        spec = Grammar(grammar)
    elif choices is not None:
        spec = Choices(choices)
    elif constraint is not None:
        if not isinstance(constraint, Constraint):
            raise TypeError(
                f"constraint: expected an aiolm.constraints.Constraint, got {type(constraint).__name__}"
            )
        spec = constraint
    elif dtype in DTYPE_REGEX:
        spec = Regex(DTYPE_REGEX[dtype])
    tool_specs, choice = _check_tools(tools, tool_choice, parallel_tool_calls, given)
    return Gen(
        name=name, sampling=sampling, constraint=spec, dtype=dtype,
        return_logprobs=bool(return_logprobs), top_logprobs=top_logprobs,
        tools=tool_specs, tool_choice=choice, parallel_tool_calls=parallel_tool_calls,
        reasoning=_reasoning(reasoning, max_thinking_tokens, reasoning_effort),
    )


def _check_tools(tools: Any, tool_choice: Any, parallel_tool_calls: Any,
                 constrained: list[str]) -> tuple[tuple[Tool, ...], str]:
    if not isinstance(parallel_tool_calls, bool):
        raise TypeError(f"parallel_tool_calls: expected a bool, got {type(parallel_tool_calls).__name__}")
    specs = as_tools(tools) if tools is not None else ()
    if not specs and tool_choice in ("auto", "none"):
        return (), "auto"
    if not specs:
        raise ValueError(f"tool_choice: {tool_choice!r} needs tools=[...]")
    choice = check_tool_choice(tool_choice, specs)
    if choice != "none" and constrained:
        raise ValueError(f"tools: a gen that may call tools cannot also take {constrained[0]} "
                         "(the answer is free text or a call); use tool_choice='none' or "
                         f"drop {constrained[0]}")
    return specs, choice


def _reasoning(reasoning: Any, max_thinking_tokens: Any, effort: Any) -> Reasoning | None:
    if not isinstance(reasoning, bool):
        raise TypeError(f"reasoning: expected a bool, got {type(reasoning).__name__}")
    if not reasoning:
        for arg, value in (("max_thinking_tokens", max_thinking_tokens),
                           ("reasoning_effort", effort)):
            if value is not None:
                raise ValueError(f"{arg}: needs reasoning=True")
        return None
    return Reasoning(enabled=True, max_thinking_tokens=max_thinking_tokens, effort=effort)


@attrs.frozen(kw_only=True)
class ToolResult(Expr):
    """A ``tool`` turn: the answer to the tool call ``call_id``."""

    call_id: str
    content: str


def tool_result(call_id: str | ToolCall, content: Any) -> ToolResult:
    """The result of tool call ``call_id`` (or the :class:`aiolm.ToolCall` itself), as a
    ``tool`` turn for the model to read.

    ``content`` is a string, or any JSON-able value (it is sent as its JSON text). Append
    it outside any turn, after the assistant turn that made the call::

        for call in await s.get("calls"):
            s += tool_result(call, tools[call.name](**call.arguments))

    Raises ``TypeError`` / ``ValueError`` naming the argument.
    """
    if isinstance(call_id, ToolCall):
        call_id = call_id.id
    if not isinstance(call_id, str) or not call_id:
        raise TypeError(f"call_id: expected a tool call's id (a non-empty str) or the "
                        f"ToolCall, got {call_id!r}")
    if not isinstance(content, str):
        try:
            content = json.dumps(content, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"content: expected a str or a JSON-able value ({exc})") from None
    return ToolResult(call_id=call_id, content=content)


@attrs.frozen(kw_only=True)
class Select(Expr):
    """Pick one of ``choices`` by scoring each continuation (no sampling)."""

    name: str
    choices: tuple[str, ...]
    method: SelectMethod = "token_length_normalized"


def select(
    name: str,
    choices: Iterable[str] | None = None,
    *,
    method: SelectMethod = "token_length_normalized",
) -> Select:
    """Choose the continuation the model finds most likely among ``choices``.

    ``method``: ``"token_length_normalized"`` (mean token logprob, the default),
    ``"greedy"`` (the choice greedy decoding follows longest), or
    ``"unconditional_normalized"`` (logprob given the prompt minus logprob without it).
    """
    _check_name(name, required=True)
    if choices is None or isinstance(choices, str):
        raise TypeError("choices: expected a list of strings")
    items = tuple(choices)
    if not items:
        raise ValueError("choices: must not be empty")
    for c in items:
        if not isinstance(c, str):
            raise TypeError(f"choices: expected strings, got {type(c).__name__}")
    if len(set(items)) != len(items):
        raise ValueError("choices: contains duplicates")
    if method not in SELECT_METHODS:
        raise ValueError(f"method: expected one of {', '.join(SELECT_METHODS)}, got {method!r}")
    return Select(name=name, choices=items, method=method)


@attrs.frozen(kw_only=True, eq=False)
class Image(Expr):
    """An image: a path, raw bytes, an http(s)/data URL, or a PIL image (loaded when run)."""

    source: Any

    @property
    def is_url(self) -> bool:
        return isinstance(self.source, str) and self.source.startswith(
            ("http://", "https://", "data:")
        )


def image(source: str | os.PathLike | bytes | Any) -> Image:
    """An image part of a (user) turn. Nothing is read until the program runs."""
    if isinstance(source, str | os.PathLike | bytes | bytearray):
        if isinstance(source, str | os.PathLike) and not str(source):
            raise ValueError("image: empty path")
        return Image(source=bytes(source) if isinstance(source, bytearray) else source)
    if hasattr(source, "save") and hasattr(source, "size"):  # a PIL image, duck-typed
        return Image(source=source)
    raise TypeError(f"image: expected a path, bytes, a URL or a PIL image, got {type(source).__name__}")


@attrs.frozen(kw_only=True, eq=False)
class Video(Expr):
    """A video: a path or the encoded bytes of a file (its frames sampled when run), or a
    sequence of frames (PIL images or ``H x W x 3`` uint8 arrays)."""

    source: Any
    num_frames: int | None = None


def video(source: str | os.PathLike | bytes | Sequence[Any], *,
          num_frames: int | None = None) -> Video:
    """A video part of a (user) turn, for video models (Qwen2.5-VL or LLaVA-NeXT-Video on :class:`aiolm.Engine`).

    ``source``: a path or a file's bytes (any format FFmpeg reads, through PyAV), whose
    frames are sampled when the program runs: ``num_frames`` of them, evenly spread from the
    first frame to the last (default 8, or every frame of a shorter clip); or the frames
    themselves, of which ``num_frames`` are taken the same way (default: all). Raises
    ``ValueError`` for no frames, an empty path or a ``num_frames`` below 1, and
    ``TypeError`` for anything else. An unreadable file fails when the program runs,
    before any token is generated.
    """
    if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, int)
                                   or num_frames < 1):
        raise ValueError(f"video: num_frames must be an int >= 1 or None, got {num_frames!r}")
    if isinstance(source, str | os.PathLike | bytes | bytearray):
        if isinstance(source, str | os.PathLike) and not str(source):
            raise ValueError("video: empty path")
        if isinstance(source, bytes | bytearray) and not source:
            raise ValueError("video: empty bytes")
        return Video(source=bytes(source) if isinstance(source, bytearray) else source,
                     num_frames=num_frames)
    if isinstance(source, Sequence):
        frames = tuple(source)
        if not frames:
            raise ValueError("video: no frames (an empty sequence)")
        for i, frame in enumerate(frames):
            if not (hasattr(frame, "save") and hasattr(frame, "size")) and not hasattr(
                    frame, "__array_interface__"):
                raise TypeError(f"video: frame {i} is a {type(frame).__name__}; frames must be "
                                "PIL images or H x W x 3 uint8 arrays")
        return Video(source=frames, num_frames=num_frames)
    raise TypeError(f"video: expected a path, bytes or a sequence of frames, "
                    f"got {type(source).__name__}")


@attrs.frozen(kw_only=True)
class Role(Expr):
    """A chat turn: ``role`` wraps ``body`` (``None`` body opens a ``with s.user():`` block)."""

    role: RoleName
    body: Expr


def _role(role: RoleName) -> Callable[[object], Role]:
    def make(expr: object = "") -> Role:
        body = as_expr(expr)
        if _contains_role(body):
            raise ValueError(f"{role}(): a chat turn cannot contain another turn")
        return Role(role=role, body=body)

    make.__name__ = role
    make.__doc__ = f"A {role} turn around ``expr`` (text, gen, select, image, or a ``+`` of them)."
    return make


def _contains_role(expr: Expr) -> bool:
    if isinstance(expr, Role):
        return True
    return isinstance(expr, Concat) and any(_contains_role(p) for p in expr.parts)


system = _role("system")
user = _role("user")
assistant = _role("assistant")
