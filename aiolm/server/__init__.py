"""An OpenAI-compatible HTTP server over any aiolm backend (``aiolm serve``).

``create_app(backend)`` returns an ASGI app (Starlette): mount it, or run it with uvicorn.
See ``docs/serving.md``.
"""

from .app import create_app as create_app

__all__ = ["create_app"]
