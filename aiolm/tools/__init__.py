"""Tool calling and reasoning for chat: tool specs, the parsers of each model family's
tool-call and thinking formats, the grammars that force valid calls, and
:func:`stream_chat`, which runs a chat request with tools or reasoning on any backend."""

from .spec import Tool as Tool
from .spec import ToolCall as ToolCall
from .spec import ToolCallDelta as ToolCallDelta
from .spec import as_tool as as_tool
from .spec import as_tools as as_tools
from .spec import assemble_tool_calls as assemble_tool_calls
from .spec import check_tool_choice as check_tool_choice
from .spec import new_call_id as new_call_id

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
