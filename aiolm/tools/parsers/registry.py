"""The tool-call formats by name (``TOOL_PARSERS``, :func:`get_tool_parser`) and which one a
chat template teaches (:func:`detect_tool_parser`)."""

from __future__ import annotations

from .base import ToolParser
from .hermes import HermesParser
from .llama3_json import Llama3JsonParser
from .mistral import MistralParser
from .pythonic import PythonicParser

__all__ = ["TOOL_PARSERS", "detect_tool_parser", "get_tool_parser"]

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesParser,
    "llama3_json": Llama3JsonParser,
    "mistral": MistralParser,
    "pythonic": PythonicParser,
}


def get_tool_parser(name: str) -> ToolParser:
    """The parser registered as ``name``; ``ValueError`` naming the known ones otherwise."""
    cls = TOOL_PARSERS.get(name) if isinstance(name, str) else None
    if cls is None:
        known = ", ".join(sorted(TOOL_PARSERS))
        raise ValueError(f"tool_parser: unknown tool-call format {name!r} (known: {known})")
    return cls()


# What a chat template writes when it teaches its model a format, most specific first.
_TEMPLATE_MARKS = (
    ("hermes", ("<tool_call>",)),
    ("mistral", ("[TOOL_CALLS]",)),
    ("pythonic", ("[func_name1(", "<|python_start|>")),
    ("llama3_json", ("<|python_tag|>", "ipython")),
)


def detect_tool_parser(template_source: str | None) -> str | None:
    """The tool-call format a Jinja chat template's text teaches, or None if unknown."""
    if not template_source:
        return None
    for name, marks in _TEMPLATE_MARKS:
        if any(mark in template_source for mark in marks):
            return name
    return None
