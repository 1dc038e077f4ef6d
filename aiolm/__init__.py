"""aiolm: async-first structured language-model programs.

The public API lives here; implementation modules are private to it. ``import aiolm``
imports neither torch nor openai: ``aiolm.Engine`` and ``aiolm.OpenAI`` load their
modules on first use.
"""

from typing import TYPE_CHECKING, Any

from . import backends as backends
from . import constraints as constraints
from . import errors as errors
from .chat import Message as Message
from .errors import AiolmError as AiolmError
from .errors import BackendError as BackendError
from .errors import BackendTimeout as BackendTimeout
from .errors import BackendUnavailable as BackendUnavailable
from .errors import ConstraintError as ConstraintError
from .errors import ContextLengthExceeded as ContextLengthExceeded
from .errors import EngineError as EngineError
from .errors import OutOfMemory as OutOfMemory
from .errors import ProgramError as ProgramError
from .errors import RateLimited as RateLimited
from .errors import UnknownVariable as UnknownVariable
from .errors import UnsupportedFeature as UnsupportedFeature
from .errors import VariableNotReady as VariableNotReady
from .primitives import assistant as assistant
from .primitives import gen as gen
from .primitives import image as image
from .primitives import select as select
from .primitives import system as system
from .primitives import tool_result as tool_result
from .primitives import user as user
from .primitives import video as video
from .program import ForkGroup as ForkGroup
from .program import GenerationMeta as GenerationMeta
from .program import Program as Program
from .program import ProgramState as ProgramState
from .program import StreamEvent as StreamEvent
from .program import program as program
from .program import use_backend as use_backend
from .sampling import SamplingParams as SamplingParams
from .tools.spec import Tool as Tool
from .tools.spec import ToolCall as ToolCall

if TYPE_CHECKING:
    from .backends.engine import Engine as Engine
    from .backends.openai import OpenAI as OpenAI

__all__ = [
    "AiolmError",
    "BackendError",
    "BackendTimeout",
    "BackendUnavailable",
    "ConstraintError",
    "ContextLengthExceeded",
    "Engine",
    "EngineError",
    "ForkGroup",
    "GenerationMeta",
    "Message",
    "OpenAI",
    "OutOfMemory",
    "Program",
    "ProgramError",
    "ProgramState",
    "RateLimited",
    "SamplingParams",
    "StreamEvent",
    "Tool",
    "ToolCall",
    "UnknownVariable",
    "UnsupportedFeature",
    "VariableNotReady",
    "assistant",
    "backends",
    "constraints",
    "errors",
    "gen",
    "image",
    "program",
    "select",
    "system",
    "tool_result",
    "use_backend",
    "user",
    "video",
]


def __getattr__(name: str) -> Any:
    if name in backends.LAZY:
        return getattr(backends, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
