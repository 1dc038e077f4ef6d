"""The engine replica: one :class:`aiolm.Engine` in a Ray Serve replica.

The ingress calls :meth:`EngineReplica.stream` (chunks streamed back), :meth:`score`,
:meth:`prefill` through a deployment handle whose router chose this replica. The replica
listens to its radix cache's block events and sends them, with its engine statistics, to
the application's cache index: before the last chunk of every request (so a client that
saw an answer finds its prefix indexed) and every ``flush_interval`` seconds (inserts of
unfinished requests, evictions). Serve calls :meth:`check_health`: a replica whose engine
died is unhealthy, and Serve replaces it. Stopping (draining) first takes the replica out
of the routers, then :meth:`__del__` drops its entries from the index and closes the engine.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import attrs

from ..backends.base import Chunk, ScoreResult
from ..backends.engine import Engine
from ..cache.block_events import DEFAULT_BLOCK_SIZE, CacheEventLog
from .router import cache_index
from .wire import ReplicaInfo, RoutedRequest

__all__ = ["EngineReplica", "load_factory"]

_log = logging.getLogger("aiolm.serve_ray")


def load_factory(path: str) -> Any:
    """The callable named ``"package.module:function"`` (it returns an Engine's ``model``
    argument, e.g. a :class:`~aiolm.backends.engine.LoadedModel`). Raises ``ValueError`` for a
    malformed path, ``ImportError`` / ``AttributeError`` naming what is missing."""
    module, sep, name = path.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"model_factory: expected 'package.module:function' (got {path!r})")
    return getattr(importlib.import_module(module), name)


class EngineReplica:
    """One engine per replica. ``engine_options`` are :class:`aiolm.Engine`'s keywords
    (``model`` among them); ``model_factory`` (``"module:function"``) builds the model
    instead of ``model`` (tests use it for a tiny model with its own tokenizer), called with
    ``model_factory_kwargs``."""

    async def __init__(self, engine_options: dict[str, Any], *, model_factory: str | None = None,
                       model_factory_kwargs: dict[str, Any] | None = None,
                       block_size: int = DEFAULT_BLOCK_SIZE, flush_interval: float = 0.05) -> None:
        from ray import serve

        options = dict(engine_options)
        model = options.pop("model", None)
        if model_factory is not None:
            model = load_factory(model_factory)(**(model_factory_kwargs or {}))
        self._engine = Engine(model, **options)
        await self._engine.start()
        self._log = CacheEventLog()
        # NOTE: the engine has no public handle on its radix cache; the listener is set once,
        # before any request, and only appends to a thread-safe queue on the loop thread.
        self._engine._core.cache.listen(self._log, block_size=block_size)
        context = serve.get_replica_context()
        self.replica_id: str = context.replica_id.unique_id
        self._index = cache_index(context.app_name)
        self._flush_lock = asyncio.Lock()
        self._flusher = asyncio.get_running_loop().create_task(self._flush_every(flush_interval))
        # Known to the index from the start: a replica that serves nothing still shows in
        # replica_statistics (with no requests) instead of being missing.
        await self._flush(statistics=True)

    # ------------------------------------------------------------------ requests
    async def stream(self, routed: RoutedRequest) -> AsyncIterator[Chunk]:
        """The chunks of ``routed.request`` (a Serve streaming method). Before the last one,
        the cache events it caused reach the index."""
        async with self._engine.stream(routed.request) as chunks:
            async for chunk in chunks:
                if chunk.finish_reason is not None:
                    await self._flush(statistics=True)
                yield chunk

    async def score(self, routed: RoutedRequest, continuations: Sequence[str],
                    method: str) -> ScoreResult:
        """:meth:`aiolm.Engine.score` of ``routed.request`` as the prefix."""
        result = await self._engine.score(routed.request, continuations, method)
        await self._flush(statistics=True)
        return result

    async def prefill(self, routed: RoutedRequest) -> None:
        """:meth:`aiolm.Engine.prefill` of ``routed.request``."""
        await self._engine.prefill(routed.request)
        await self._flush(statistics=True)

    # ------------------------------------------------------------------ state
    def info(self) -> ReplicaInfo:
        """The model's name, capabilities, chat template and tokenizer (for the ingress)."""
        engine = self._engine
        return ReplicaInfo(model_name=engine.model_name, capabilities=engine.capabilities,
                           chat_template=engine.chat_template,
                           chat_template_source=engine.chat_template_source,
                           tokenizer=engine.tokenizer,
                           escape_special_tokens=engine.config.escape_special_tokens)

    def statistics(self) -> dict[str, Any]:
        """This replica's id and its engine's statistics, as a dict."""
        return {"replica": self.replica_id, **attrs.asdict(self._engine.statistics())}

    def check_health(self) -> None:
        """Serve's health check: raises while the engine loop is dead (Serve then replaces
        the replica)."""
        failure = self._engine.failure
        if failure is not None:
            raise RuntimeError(f"the engine of replica {self.replica_id} failed: {failure!r}")

    async def _flush(self, *, statistics: bool = False) -> None:
        """Send the queued cache events, with the engine's statistics, to the index (when
        there are events, or ``statistics`` is set: a request finished)."""
        async with self._flush_lock:
            events = self._log.drain()
            if not events and not statistics:
                return
            try:
                await self._index.apply.remote(self.replica_id, events, self.statistics())
            except Exception as exc:  # the index restarts; routing falls back to load meanwhile
                _log.warning("replica %s could not reach the cache index: %r", self.replica_id, exc)

    async def _flush_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self._flush()

    async def __del__(self) -> None:
        """Serve's shutdown hook (after the replica left the routers and drained): forget
        this replica in the index and close the engine."""
        self._flusher.cancel()
        try:
            await self._index.drop.remote(self.replica_id)
        except Exception as exc:
            _log.warning("replica %s could not leave the cache index: %r", self.replica_id, exc)
        await self._engine.aclose()
