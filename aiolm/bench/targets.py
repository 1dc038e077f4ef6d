"""What a benchmark runs on: the engine, the scripted backend or the transformers peer.

A :class:`Target` opens a backend for one variant (engine settings differ per ablation),
says which ablations it can run, how its prompts tokenize (for the recorder) and how to
start a variant from a cold cache.
"""

from __future__ import annotations

import abc
import json
import random
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from ..backends.base import Backend
from .recording import WordTokenizer
from .synth import words

__all__ = ["EngineTarget", "HFTarget", "ScriptedTarget", "Target", "scripted_reply"]

#: Engine settings that switch each of the paper's ablations off.
ABLATION_ENGINE_KWARGS: dict[str, dict[str, Any]] = {
    "radix": {"enable_radix_cache": False},
    "schedule": {"schedule_policy": "fcfs"},
    "jump-forward": {"jump_forward": False},
    "overlap": {"overlap": False},
    "mix-decode": {"mix_decode": False},
    "extend-graphs": {"extend_graph_tokens": 0},
    # Meaningful only where the engine reads shared prefixes once: by default multi-head
    # models on CUDA, or any model with --shared-prefix-min-tokens N.
    "shared-prefix": {"shared_prefix_min_tokens": 0},
}


class Target(abc.ABC):
    """A way to get a backend for a benchmark variant."""

    #: The name recorded in results (``engine``, ``scripted``, ``hf``, ``openai``).
    kind: str

    def describe(self) -> dict[str, Any]:
        """What the results should say about this target (model, settings)."""
        return {"kind": self.kind}

    def supports(self, ablation: str) -> bool:
        """Whether ``ablation`` (a key of ``ABLATIONS``) means anything on this target."""
        return False

    @abc.abstractmethod
    def open(self, engine_kwargs: dict[str, Any]) -> Any:
        """An async context manager yielding a backend with ``engine_kwargs`` applied."""

    def tokenizer(self, backend: Backend) -> Callable[[str], Sequence[int]]:
        """How ``backend`` tokenizes a text prompt (for the request recorder)."""
        return WordTokenizer()

    async def reset(self, backend: Backend) -> None:
        """Empty ``backend``'s prefix cache (before a measured run). The default: nothing."""
        return None

    async def release(self) -> None:
        """Free the device memory of what is open (before another target runs)."""
        return None

    async def aclose(self) -> None:
        """Release everything the target keeps between variants."""
        await self.release()


def _schema_in(prompt: str) -> dict[str, Any] | None:
    marker = "schema: "
    at = prompt.rfind(marker)
    if at < 0:
        return None
    line = prompt[at + len(marker):].split("\n", 1)[0]
    try:
        schema = json.loads(line)
    except json.JSONDecodeError:
        return None
    return schema if isinstance(schema, dict) else None


def _instance(schema: dict[str, Any]) -> Any:
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object":
        return {key: _instance(sub) for key, sub in schema.get("properties", {}).items()}
    if kind == "boolean":
        return True
    if kind in ("integer", "number"):
        return 1
    return "x" * min(3, schema.get("maxLength", 3))


def scripted_reply(prompt: str) -> str:
    """The scripted model of the benchmarks, a few-shot copier.

    After a ``Record:`` prompt that states its schema (as the JSON workload's prompts do),
    a valid JSON instance. When the prompt's last line occurred earlier (a few-shot
    example's ``name: ``, ``Thought 1:``), what followed it there, up to a blank line.
    Otherwise deterministic words.
    """
    if prompt.endswith("Record: "):
        schema = _schema_in(prompt)
        if schema is not None:
            return json.dumps(_instance(schema))
    last = prompt.rsplit("\n", 1)[-1]
    if last.strip():
        at = prompt.rfind("\n" + last, 0, len(prompt) - len(last) - 1)
        if at >= 0:
            return prompt[at + 1 + len(last):].split("\n\n", 1)[0] + "\n"
    rng = random.Random(zlib.crc32(prompt[-256:].encode()))
    return " " + words(rng, 64)


class ScriptedTarget(Target):
    """The deterministic :class:`~aiolm.backends.ScriptedBackend` (no cache, no ablations)."""

    kind = "scripted"

    @asynccontextmanager
    async def open(self, engine_kwargs: dict[str, Any]) -> AsyncIterator[Backend]:
        from ..backends.scripted import ScriptedBackend

        yield ScriptedBackend(scripted_reply)


class EngineTarget(Target):
    """The in-process engine. The weights load once (:func:`~aiolm.bench.models.load_for_bench`)
    and every variant opens an engine over them; an engine stays open while consecutive
    variants ask for the same settings, and its cache is flushed before each measured run."""

    kind = "engine"

    def __init__(self, model: Any = None, *, load_format: str = "auto", seed: int = 0,
                 device: str = "auto", dtype: str = "auto", **engine_kwargs: Any) -> None:
        from ..backends.engine import LoadedModel

        # ``model`` may be weights loaded already (by load_for_bench): shared, never reloaded.
        self._loaded: Any = model if isinstance(model, LoadedModel) else None
        self._keep_loaded = self._loaded is not None
        self.model = model.source if isinstance(model, LoadedModel) else model
        self.load_format = load_format
        self.seed = seed
        self.device = device
        self.dtype = dtype
        self.base_kwargs = engine_kwargs
        self._open: tuple[str, Backend, AsyncExitStack] | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model": self.model if self.model is not None else "SmolLM2-135M-Instruct (embedded)",
            "load_format": self.load_format,
            "seed": self.seed,
            "device": self.device,
            "dtype": self.dtype,
            **self.base_kwargs,
        }

    def supports(self, ablation: str) -> bool:
        if ablation in ("overlap", "extend-graphs"):  # CUDA only: moot on the CPU
            return self._on_cuda()
        if ablation == "shared-prefix":
            if "shared_prefix_min_tokens" in self.base_kwargs:   # the run said
                return self.base_kwargs["shared_prefix_min_tokens"] > 0
            # The engine decides: on for multi-head models on CUDA (auto_min_tokens).
            return self._on_cuda()
        return ablation in ABLATION_ENGINE_KWARGS

    def _on_cuda(self) -> bool:
        import torch

        return self.device.startswith("cuda") or (self.device == "auto"
                                                  and torch.cuda.is_available())

    async def loaded(self) -> Any:
        """The loaded weights and tokenizer (a ``LoadedModel``), loaded on first use."""
        if self._loaded is None:
            import functools

            import anyio.to_thread

            from .models import load_for_bench

            self._loaded = await anyio.to_thread.run_sync(functools.partial(
                load_for_bench, self.model, load_format=self.load_format, seed=self.seed,
                device=self.device, dtype=self.dtype))
        return self._loaded

    @asynccontextmanager
    async def open(self, engine_kwargs: dict[str, Any]) -> AsyncIterator[Backend]:
        kwargs = {**self.base_kwargs, **engine_kwargs}
        key = json.dumps(kwargs, sort_keys=True)
        if self._open is None or self._open[0] != key:
            await self.release()
            from ..backends.engine import Engine

            stack = AsyncExitStack()
            engine = await stack.enter_async_context(
                Engine(await self.loaded(), device=self.device, seed=self.seed, **kwargs))
            self._open = (key, engine, stack)
        yield self._open[1]

    async def release(self) -> None:
        """Close the open engine (its KV memory), keeping the weights loaded."""
        if self._open is not None:
            _, _, stack = self._open
            self._open = None
            await stack.aclose()

    def tokenizer(self, backend: Backend) -> Callable[[str], Sequence[int]]:
        return backend.tokenizer.encode  # type: ignore[attr-defined]

    async def reset(self, backend: Backend) -> None:
        await backend.flush_cache()  # type: ignore[attr-defined]

    async def aclose(self) -> None:
        await self.release()
        if not self._keep_loaded:
            self._loaded = None


class HFTarget(Target):
    """The transformers peer (:class:`~aiolm.bench.hf_backend.HFBackend`) over the very
    weights and tokenizer ``source`` loaded for the engine."""

    kind = "hf"

    def __init__(self, source: EngineTarget) -> None:
        self.source = source
        self._backend: Backend | None = None

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "weights": "shared with the engine", "calls": "one at a time, batch 1"}

    @asynccontextmanager
    async def open(self, engine_kwargs: dict[str, Any]) -> AsyncIterator[Backend]:
        if self._backend is None:
            import anyio.to_thread

            from .hf_backend import HFBackend

            loaded = await self.source.loaded()
            self._backend = await anyio.to_thread.run_sync(HFBackend, loaded)
        yield self._backend

    def tokenizer(self, backend: Backend) -> Callable[[str], Sequence[int]]:
        return backend.tokenizer.encode  # type: ignore[attr-defined]

    async def release(self) -> None:
        # The model's weights are the engine's; only the allocator's cached blocks are ours.
        if self._backend is not None and self._backend.loaded.device.type == "cuda":  # type: ignore[attr-defined]
            import torch

            torch.cuda.empty_cache()

    async def aclose(self) -> None:
        await self.release()
        self._backend = None
