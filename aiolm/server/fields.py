"""Reading typed fields out of a JSON request body: a wrong type is a 400 naming the field."""

from __future__ import annotations

from typing import Any

from .errors import ApiError

__all__ = ["bad", "get"]


def bad(param: str, message: str) -> ApiError:
    """The 400 for field ``param``; the message starts with the field's name."""
    return ApiError(400, f"{param}: {message}", param=param, code="invalid_value")


def get(body: dict[str, Any], name: str, types: type | tuple[type, ...], default: Any = None,
        *, param: str | None = None) -> Any:
    """``body[name]`` when it is one of ``types`` (``default`` when missing or null).

    A boolean is refused where ``bool`` is not among ``types`` (JSON ``true`` is no number
    here). The error names ``param`` (default ``name``).
    """
    value = body.get(name)
    if value is None:
        return default
    allowed = types if isinstance(types, tuple) else (types,)
    where = param or name
    if isinstance(value, bool) and bool not in allowed:
        raise bad(where, f"expected {_type_names(allowed)}, got a boolean")
    if not isinstance(value, allowed):
        raise bad(where, f"expected {_type_names(allowed)}, got {_json_type(value)}")
    return value


def _type_names(types: tuple[type, ...]) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "a list", dict: "an object"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _json_type(value: Any) -> str:
    """The JSON name of ``value``'s type, as the client wrote it."""
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"),
                       (str, "a string"), (list, "a list"), (dict, "an object")):
        if isinstance(value, kind):
            return name
    return type(value).__name__
