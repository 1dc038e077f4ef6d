"""A backend served by aiolm's OpenAI-compatible server and used through ``aiolm.OpenAI``.

The server app (``aiolm.server.create_app``) and the real ``openai`` client talk over
``httpx``'s in-process ASGI transport: no socket, no thread, the same event loop (asyncio or
trio), and every call still goes through the HTTP routes, their JSON and the client's
parsing. The transport hands a response over once the app has sent all of it, so streamed
answers arrive whole: times to first token measured this way are not streaming latencies.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..backends.base import Backend
    from ..backends.openai import OpenAI
    from .workload import RunOptions

__all__ = ["MODEL_NAME", "served_as_openai", "served_if"]

#: The model id the bench server answers to.
MODEL_NAME = "aiolm-bench"


@asynccontextmanager
async def served_as_openai(backend: Backend, *, spec_tokens: int | None = None,
                           chat: bool = False) -> AsyncIterator[OpenAI]:
    """``aiolm.OpenAI`` (a completion model unless ``chat``) talking to a server over ``backend``.

    ``spec_tokens`` turns API speculative execution on. Chat roles render with
    ``backend``'s own template, so the served model sees the prompts it would see directly.
    """
    import httpx
    import openai

    from ..backends.openai import OpenAI
    from ..server import create_app

    app = create_app(backend, model_name=MODEL_NAME, allowed_hosts=["aiolm.bench"])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://aiolm.bench") as http:
        client = openai.AsyncOpenAI(base_url="http://aiolm.bench/v1", api_key="bench", http_client=http)
        api = OpenAI(MODEL_NAME, client=client, chat=chat, spec_tokens=spec_tokens, aiolm_server=True,
                     chat_template=backend.chat_template)
        try:
            yield api
        finally:
            await api.aclose()


@asynccontextmanager
async def served_if(backend: Backend, options: RunOptions) -> AsyncIterator[Backend]:
    """``backend`` itself, or (``options.via_openai``) ``aiolm.OpenAI`` served over it."""
    if not options.via_openai:
        yield backend
        return
    async with served_as_openai(backend, spec_tokens=options.spec_tokens) as api:
        yield api
