"""How often the vision tower runs during a multimodal workload, and for how long.

The engine runs it through its model's ``embed_multimodal_many`` (once per pass over the
images or clips the pass needs and no request holds yet, shared by the requests of the pass
that carry the same content: see :func:`aiolm.engine.multimodal.pass_embeddings`); the
transformers peer through its model's ``get_image_features`` / ``get_video_features``
(once per ``generate`` call with images). :class:`VisionTimer` wraps those methods on the
model instance for one run and times each call: wall-clock on the CPU, CUDA events on a
GPU, read once the run is over, so timing adds no synchronisation to the engine's loop.

:func:`vision_runner` is the workloads' runner: the program under ``run_batch``, with the
vision figures added to the record (``vision_calls``, ``vision_images``, ``vision_s``,
``vision_ms_per_call``, ``vision_ms_per_image``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..backends.base import Backend
    from .workload import Runner, RunOptions

__all__ = ["VisionTimer", "vision_runner"]

#: The peer's (transformers') methods that run its vision tower.
_HF_VISION_METHODS = ("get_image_features", "get_video_features")


def _vision_methods(backend: Backend) -> tuple[Any, tuple[str, ...]]:
    """The object whose methods run ``backend``'s vision tower and their names; ``(None,
    ())`` for a backend without one (a text model, the scripted backend)."""
    from ..engine.multimodal import is_multimodal
    from .hf_backend import HFBackend
    from .recording import RecordingBackend

    while isinstance(backend, RecordingBackend):
        backend = backend.inner
    if isinstance(backend, HFBackend):
        owner = getattr(backend.model, "model", backend.model)  # the body that calls them
        return owner, tuple(n for n in _HF_VISION_METHODS if hasattr(owner, n))
    # NOTE: aiolm.Engine keeps its LoadedModel private; the benchmark reads it to wrap the
    # model's embed_multimodal_many for the length of a run (nothing else is touched).
    loaded = getattr(backend, "_loaded", None)
    if loaded is not None and is_multimodal(loaded.model):
        return loaded.model, ("embed_multimodal_many",)
    return None, ()


class VisionTimer:
    """A context manager timing every vision-tower call of ``backend`` while it is open.

    Entering wraps the methods (instance attributes over the class's); exiting removes the
    wrappers. :meth:`figures` (after exiting) waits for the timed GPU work, if any.
    """

    def __init__(self, backend: Backend) -> None:
        self._owner, self._names = _vision_methods(backend)
        self._cuda = False
        if self._owner is not None:
            first = next(self._owner.parameters(), None)
            self._cuda = first is not None and first.device.type == "cuda"
        #: One entry per call: (seconds (CPU) or a ``(start, end)`` pair of CUDA events,
        #: how many images or clips it embedded).
        self._calls: list[tuple[Any, int]] = []
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> VisionTimer:
        # An instance attribute already there (another wrapper) is wrapped, then put back.
        self._saved = {name: vars(self._owner).get(name) for name in self._names}
        for name in self._names:
            setattr(self._owner, name, self._timed(getattr(self._owner, name)))
        return self

    def __exit__(self, *exc_info: object) -> None:
        for name, previous in self._saved.items():
            if previous is None:
                delattr(self._owner, name)
            else:
                setattr(self._owner, name, previous)

    def _timed(self, method: Callable[..., Any]) -> Callable[..., Any]:
        calls = self._calls  # appended to from the engine's (or the peer's) worker thread

        if self._cuda:
            import torch

            @functools.wraps(method)
            def on_gpu(*args: Any, **kwargs: Any) -> Any:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                try:
                    return method(*args, **kwargs)
                finally:
                    end.record()
                    calls.append(((start, end), _items(args, kwargs)))

            return on_gpu

        @functools.wraps(method)
        def on_cpu(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                calls.append((time.perf_counter() - began, _items(args, kwargs)))

        return on_cpu

    def figures(self) -> dict[str, float]:
        """``vision_calls``, ``vision_images`` (the images and clips they embedded),
        ``vision_s`` (their total time), ``vision_ms_per_call`` and ``vision_ms_per_image``;
        nothing for a backend without a vision tower. Waits for timed GPU work to end."""
        if self._owner is None:
            return {}
        seconds = 0.0
        for timing, _ in self._calls:
            if isinstance(timing, tuple):
                timing[1].synchronize()
                seconds += timing[0].elapsed_time(timing[1]) / 1000.0
            else:
                seconds += timing
        count = len(self._calls)
        images = sum(n for _, n in self._calls)
        return {"vision_calls": count, "vision_images": images, "vision_s": seconds,
                "vision_ms_per_call": 1000.0 * seconds / count if count else 0.0,
                "vision_ms_per_image": 1000.0 * seconds / images if images else 0.0}


def _items(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """How many images or clips a timed call embedded: the length of
    ``embed_multimodal_many``'s list, else one (``embed_multimodal``, the peer's calls)."""
    first = args[0] if args else next(iter(kwargs.values()), None)
    return len(first) if isinstance(first, (list, tuple)) else 1


def vision_runner(program: Any) -> Runner:
    """A workload runner: ``program`` over the inputs with ``run_batch`` (on the backend, or
    on ``aiolm.OpenAI`` served over it), the vision tower timed. Raises the first failed
    program's error."""

    async def run(backend: Backend, inputs: Sequence[dict[str, Any]],
                  options: RunOptions) -> dict[str, float]:
        from .openai_bridge import served_if

        with VisionTimer(backend) as timer:
            async with served_if(backend, options) as programs_backend:
                states = await program.run_batch(list(inputs), backend=programs_backend,
                                                 max_concurrency=options.max_concurrency)
        failed = [st.error for st in states if st.error is not None]
        if failed:
            raise failed[0]
        return timer.figures()

    return run
