"""Tools a model may call, the calls it makes, and how a caller says which calls it wants.

A :class:`Tool` is a function's name, description and JSON schema of its arguments;
:func:`as_tool` makes one from a Python callable (its signature and type hints), a pydantic
model class (its fields are the arguments), an OpenAI tool dict (``{"type": "function",
"function": {...}}``) or a plain ``{"name": ..., "parameters": ...}`` dict. A
:class:`ToolCall` is one call the model made (arguments parsed into a dict);
:class:`ToolCallDelta` is a streamed piece of one.
"""

from __future__ import annotations

import inspect
import json
import secrets
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import attrs

__all__ = [
    "Tool",
    "ToolCall",
    "ToolCallDelta",
    "as_tool",
    "as_tools",
    "assemble_tool_calls",
    "check_tool_choice",
    "new_call_id",
]

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")
_MAX_NAME = 64   # OpenAI's bound on a function name


def new_call_id() -> str:
    """A fresh tool-call id in OpenAI's shape (``call_`` and 24 random characters)."""
    return "call_" + secrets.token_hex(12)


def _check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what}: a tool needs a non-empty string name, got {name!r}")
    if len(name) > _MAX_NAME or not set(name) <= _NAME_CHARS:
        raise ValueError(f"{what}: tool name {name!r} must be 1-{_MAX_NAME} characters of "
                         "a-z, A-Z, 0-9, '_', '-' or '.'")
    return name


@attrs.frozen(kw_only=True)
class Tool:
    """A function the model may call: ``parameters`` is the JSON schema of its arguments
    (an object schema). ``strict``: the arguments must validate against it exactly (sent
    on to chat APIs that take it; on a text backend a forced call — ``tool_choice``
    ``"required"`` or the tool's name — is enforced by a grammar, strict or not, and an
    ``"auto"`` call is the model's own)."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = attrs.field(factory=lambda: {"type": "object", "properties": {}},
                                                hash=False)
    strict: bool = False

    def __attrs_post_init__(self) -> None:
        _check_name(self.name, "tools")
        if not isinstance(self.parameters, Mapping):
            raise ValueError(f"tools: {self.name}: parameters must be a JSON schema object, "
                             f"got {type(self.parameters).__name__}")
        kind = self.parameters.get("type", "object")
        if kind != "object":
            raise ValueError(f"tools: {self.name}: parameters must be an object schema "
                             f"(type 'object'), got type {kind!r}")

    def to_openai(self) -> dict[str, Any]:
        """The tool as OpenAI's API and chat templates take it."""
        function: dict[str, Any] = {"name": self.name, "parameters": dict(self.parameters)}
        if self.description:
            function["description"] = self.description
        if self.strict:
            function["strict"] = True
        return {"type": "function", "function": function}


@attrs.frozen(kw_only=True)
class ToolCall:
    """One call the model made: ``arguments`` parsed from the JSON it wrote."""

    id: str
    name: str
    arguments: Mapping[str, Any] = attrs.field(factory=dict, hash=False)

    def to_openai(self) -> dict[str, Any]:
        """The call as OpenAI's ``tool_calls`` entries carry it (arguments as JSON text)."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name,
                             "arguments": json.dumps(dict(self.arguments), ensure_ascii=False)}}


@attrs.frozen(kw_only=True)
class ToolCallDelta:
    """A streamed piece of tool call ``index``: its ``id`` and ``name`` come once (first
    piece), then ``arguments`` text fragments that concatenate to the arguments' JSON."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


ToolChoice = Literal["none", "auto", "required"] | str


def check_tool_choice(choice: Any, tools: Sequence[Tool], *, param: str = "tool_choice") -> str:
    """``choice`` as ``"none" | "auto" | "required"`` or the name of one of ``tools``.

    Takes OpenAI's object form too (``{"type": "function", "function": {"name": ...}}``).
    Raises ``ValueError`` naming ``param`` for anything else, and for a named tool that is
    not among ``tools``.
    """
    if isinstance(choice, Mapping):
        function = choice.get("function")
        if choice.get("type") != "function" or not isinstance(function, Mapping):
            raise ValueError(f"{param}: expected 'none', 'auto', 'required' or "
                             "{'type': 'function', 'function': {'name': ...}}")
        choice = function.get("name")
        if not isinstance(choice, str):
            raise ValueError(f"{param}: function.name must be a string")
        named = True
    elif isinstance(choice, str):
        named = choice not in ("none", "auto", "required")
    else:
        raise ValueError(f"{param}: expected a string or an object, got {type(choice).__name__}")
    if named:
        names = [t.name for t in tools]
        if choice not in names:
            known = ", ".join(repr(n) for n in names) or "none given"
            raise ValueError(f"{param}: no tool named {choice!r} (tools: {known})")
    elif choice == "required" and not tools:
        raise ValueError(f"{param}: 'required' needs at least one tool")
    return choice


def as_tools(items: Any, *, param: str = "tools") -> tuple[Tool, ...]:
    """Each item of ``items`` through :func:`as_tool`; names must be unique."""
    if isinstance(items, str | bytes | Mapping) or not isinstance(items, Sequence):
        raise TypeError(f"{param}: expected a list of tools, got {type(items).__name__}")
    out = tuple(as_tool(t, param=f"{param}[{i}]") for i, t in enumerate(items))
    seen: set[str] = set()
    for t in out:
        if t.name in seen:
            raise ValueError(f"{param}: two tools are named {t.name!r}")
        seen.add(t.name)
    return out


def as_tool(obj: Any, *, param: str = "tools") -> Tool:
    """A :class:`Tool` from a callable, a pydantic model class, or a tool dict.

    Raises ``TypeError`` / ``ValueError`` naming ``param`` when ``obj`` is none of these or
    its schema is not an object schema.
    """
    if isinstance(obj, Tool):
        return obj
    try:
        if isinstance(obj, Mapping):
            return _from_dict(obj)
        if isinstance(obj, type) and hasattr(obj, "model_json_schema"):
            schema = obj.model_json_schema()
            description = inspect.cleandoc(obj.__doc__ or "") if obj.__doc__ else ""
            schema.pop("title", None)
            schema.pop("description", None)
            return Tool(name=obj.__name__, description=description, parameters=schema)
        if callable(obj):
            return _from_callable(obj)
    except (TypeError, ValueError) as exc:
        message = str(exc)
        if message.startswith("tools"):
            message = message.partition(": ")[2] or message
        raise type(exc)(f"{param}: {message}") from None
    raise TypeError(f"{param}: expected a function, a pydantic model class or a tool dict, "
                    f"got {type(obj).__name__}")


def _from_dict(spec: Mapping[str, Any]) -> Tool:
    if spec.get("type") == "function" and isinstance(spec.get("function"), Mapping):
        spec = spec["function"]
    elif "type" in spec and "name" not in spec:
        raise ValueError(f"unsupported tool type {spec.get('type')!r} (only 'function')")
    name = spec.get("name")
    description = spec.get("description") or ""
    if not isinstance(description, str):
        raise ValueError(f"{name}: description must be a string")
    parameters = spec.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, Mapping):
        raise ValueError(f"{name}: parameters must be a JSON schema object")
    strict = spec.get("strict", False)
    if not isinstance(strict, bool):
        raise ValueError(f"{name}: strict must be a boolean")
    return Tool(name=_check_name(name, "tools"), description=description,
                parameters=dict(parameters), strict=strict)


_SIMPLE = {str: {"type": "string"}, int: {"type": "integer"}, float: {"type": "number"},
           bool: {"type": "boolean"}, type(None): {"type": "null"}}


def _from_callable(fn: Callable[..., Any]) -> Tool:
    name = getattr(fn, "__name__", None)
    if not isinstance(name, str) or name == "<lambda>":
        raise ValueError("a tool function needs a name (not a lambda)")
    doc = inspect.getdoc(fn) or ""
    hints = typing.get_type_hints(fn)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise ValueError(f"{name}: *args / **kwargs cannot be described as tool arguments")
        schema = _schema_of(hints.get(p.name, Any), f"{name}({p.name})")
        properties[p.name] = schema
        if p.default is p.empty:
            required.append(p.name)
        elif _jsonable(p.default):
            schema["default"] = p.default
    parameters: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    return Tool(name=_check_name(name, "tools"), description=doc.split("\n\n")[0].strip(),
                parameters=parameters)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _schema_of(hint: Any, where: str) -> dict[str, Any]:
    if hint is Any:
        return {}
    if hint in _SIMPLE:
        return dict(_SIMPLE[hint])
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_schema_of(a, where) for a in args]}
    if origin in (list, tuple, set, frozenset, Sequence) or hint in (list, tuple):
        return {"type": "array", "items": _schema_of(args[0] if args else Any, where)}
    if origin in (dict, Mapping) or hint is dict:
        return {"type": "object"}
    if isinstance(hint, type) and hasattr(hint, "model_json_schema"):
        schema = hint.model_json_schema()
        schema.pop("title", None)
        return schema
    raise TypeError(f"{where}: cannot describe type {hint!r} as JSON schema "
                    "(use str, int, float, bool, list, dict, Literal, a union or a pydantic model)")


def assemble_tool_calls(deltas: Sequence[ToolCallDelta], *, strict: bool = True) -> tuple[ToolCall, ...]:
    """The calls that streamed ``deltas`` make up, in index order.

    A call whose arguments are not a JSON object raises ``ValueError`` when ``strict``, and
    is left out otherwise (a call cut by ``max_tokens`` streams only part of its arguments).
    """
    parts: dict[int, dict[str, Any]] = {}
    for d in deltas:
        entry = parts.setdefault(d.index, {"id": None, "name": None, "arguments": []})
        entry["id"] = entry["id"] or d.id
        entry["name"] = entry["name"] or d.name
        entry["arguments"].append(d.arguments)
    out = []
    for index in sorted(parts):
        entry = parts[index]
        raw = "".join(entry["arguments"]) or "{}"
        try:
            arguments = json.loads(raw)
        except ValueError:
            if not strict:
                continue
            raise ValueError(f"tool call {index} ({entry['name']}): arguments are not JSON: "
                             f"{raw[:200]!r}") from None
        if not isinstance(arguments, dict):
            if not strict:
                continue
            raise ValueError(f"tool call {index} ({entry['name']}): arguments must be a JSON "
                             f"object, got {type(arguments).__name__}")
        out.append(ToolCall(id=entry["id"] or new_call_id(), name=entry["name"] or "",
                            arguments=arguments))
    return tuple(out)
