"""Tool-call parsers: how each model family writes tool calls, read whole or as it streams,
described to a model in a system prompt, and forced by a grammar.

Formats (``TOOL_PARSERS``):

- ``hermes`` (Hermes 2 Pro, Qwen2.5, Qwen3): ``<tool_call>\\n{"name": "f", "arguments":
  {...}}\\n</tool_call>``, one block per call; text outside the blocks is content.
- ``llama3_json`` (Llama 3.1 / 3.2 JSON tool calling): an optional ``<|python_tag|>``,
  then ``{"name": "f", "parameters": {...}}`` (or ``"arguments"``), several separated by
  ``;`` or newlines; the output is calls only (an output that does not open with ``{``
  is content).
- ``mistral``: ``[TOOL_CALLS] [{"name": "f", "arguments": {...}, "id": "..."}, ...]``
  after any content; a call's own ``id`` is kept.
- ``pythonic`` (Llama 3.2 / 4 pythonic tool calling): ``[f(a=1, b="x"), g()]``, the whole
  output; argument values are JSON or Python literals (never evaluated code).

One reader for both: :meth:`ToolParser.parse` runs the format's streamer over the whole
text, so an output streamed in any pieces gives the content and calls of the whole.
A call that is malformed (not JSON, arguments not an object, not a literal) is content.

:meth:`ToolParser.grammar` forces calls laid out as :meth:`ToolParser.format_calls` writes
them (pythonic values are written as JSON: ``true``, ``null``). Markers are grammar text;
when the tokenizer has a special token of the same text (Mistral's ``[TOOL_CALLS]``), the
forced tokens are that special token, which a detokenizer that skips special tokens drops:
such outputs must be decoded with special tokens kept.

NOTE: a streamer sends a call's name and argument fragments as they come, before the call
is complete; a call that then proves malformed has already sent them, and its text comes
back as content too. Only :meth:`ToolParser.parse` (and the ``calls`` a streamer commits)
are free of such calls.

Layout: :mod:`.base` (the parser and streamer bases, the shared grammar helpers),
:mod:`._json_calls` (reading JSON call objects as they stream), one module per format
(:mod:`.hermes`, :mod:`.llama3_json`, :mod:`.mistral`, :mod:`.pythonic`) and
:mod:`.registry` (the formats by name, and detection from a chat template).
"""

from .base import ParsedOutput as ParsedOutput
from .base import StreamPiece as StreamPiece
from .base import ToolParser as ToolParser
from .base import ToolStreamer as ToolStreamer
from .hermes import HermesParser as HermesParser
from .llama3_json import Llama3JsonParser as Llama3JsonParser
from .mistral import MistralParser as MistralParser
from .pythonic import PythonicParser as PythonicParser
from .registry import TOOL_PARSERS as TOOL_PARSERS
from .registry import detect_tool_parser as detect_tool_parser
from .registry import get_tool_parser as get_tool_parser

__all__ = [
    "TOOL_PARSERS",
    "ParsedOutput",
    "StreamPiece",
    "ToolParser",
    "ToolStreamer",
    "detect_tool_parser",
    "get_tool_parser",
]
