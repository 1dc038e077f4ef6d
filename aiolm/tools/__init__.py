"""Tool calling and reasoning for chat: tool specs, the parsers of each model family's
tool-call and thinking formats, the grammars that force valid calls, and
:func:`stream_chat`, which runs a chat request with tools or reasoning on any backend."""

from .parsers import TOOL_PARSERS as TOOL_PARSERS
from .parsers import ParsedOutput as ParsedOutput
from .parsers import StreamPiece as StreamPiece
from .parsers import ToolParser as ToolParser
from .parsers import ToolStreamer as ToolStreamer
from .parsers import detect_tool_parser as detect_tool_parser
from .parsers import get_tool_parser as get_tool_parser
from .reasoning import REASONING_PARSERS as REASONING_PARSERS
from .reasoning import ReasoningParser as ReasoningParser
from .reasoning import ReasoningStreamer as ReasoningStreamer
from .reasoning import detect_reasoning_parser as detect_reasoning_parser
from .reasoning import get_reasoning_parser as get_reasoning_parser
from .reasoning import template_has_thinking_switch as template_has_thinking_switch
from .spec import Tool as Tool
from .spec import ToolCall as ToolCall
from .spec import ToolCallDelta as ToolCallDelta
from .spec import as_tool as as_tool
from .spec import as_tools as as_tools
from .spec import assemble_tool_calls as assemble_tool_calls
from .spec import check_tool_choice as check_tool_choice
from .spec import new_call_id as new_call_id

__all__ = [
    "REASONING_PARSERS",
    "TOOL_PARSERS",
    "ParsedOutput",
    "ReasoningParser",
    "ReasoningStreamer",
    "StreamPiece",
    "needs_chat_layer",
    "plan_chat",
    "stream_chat",
    "Tool",
    "ToolCall",
    "ToolCallDelta",
    "ToolParser",
    "ToolStreamer",
    "as_tool",
    "as_tools",
    "assemble_tool_calls",
    "check_tool_choice",
    "detect_reasoning_parser",
    "detect_tool_parser",
    "get_reasoning_parser",
    "get_tool_parser",
    "new_call_id",
    "template_has_thinking_switch",
]


def __getattr__(name: str):  # the chat layer imports the backends: load it on first use
    if name in ("stream_chat", "plan_chat", "needs_chat_layer"):
        from . import chat_stream

        return getattr(chat_stream, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
