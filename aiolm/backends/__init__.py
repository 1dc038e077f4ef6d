"""Backends: the one async interface (:class:`Backend`) and its implementations.

``ScriptedBackend`` is imported eagerly (it is light); ``Engine`` (torch) and ``OpenAI``
(the openai SDK) are imported on first use, so importing this package stays light.
"""

from typing import TYPE_CHECKING, Any

from .base import Backend as Backend
from .base import Capabilities as Capabilities
from .base import Chunk as Chunk
from .base import Completion as Completion
from .base import GenerateRequest as GenerateRequest
from .base import ImageData as ImageData
from .base import ScoreResult as ScoreResult
from .base import TokenLogprob as TokenLogprob
from .base import Usage as Usage
from .scripted import ScriptedBackend as ScriptedBackend

if TYPE_CHECKING:
    from .engine import Engine as Engine
    from .openai import OpenAI as OpenAI

__all__ = [
    "Backend",
    "Capabilities",
    "Chunk",
    "Completion",
    "Engine",
    "GenerateRequest",
    "ImageData",
    "OpenAI",
    "ScoreResult",
    "ScriptedBackend",
    "TokenLogprob",
    "Usage",
]

#: Public names whose modules import heavy dependencies: name -> module.
LAZY = {"Engine": "aiolm.backends.engine", "OpenAI": "aiolm.backends.openai"}


def __getattr__(name: str) -> Any:
    module = LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
