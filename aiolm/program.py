"""Programs: ``@program``, ``Program.run`` / ``run_batch`` / ``stream``, and ``use_backend``.

A program is an ``async def`` whose first argument is a :class:`ProgramState`::

    @aiolm.program
    async def qa(s, question):
        s += "Q: " + question + "\\nA:" + aiolm.gen("answer", stop="\\n")

    state = await qa.run(question="...", backend=backend, temperature=0.7)

Keyword arguments of ``run`` / ``stream`` / ``run_batch`` named like sampling parameters
(:data:`SAMPLING_DEFAULTS`: ``temperature``, ``max_tokens``, ``top_p`` ...) are run-level
defaults for every ``gen`` of the run, not program arguments: a program may not take
parameters of those names (nor ``backend``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import math
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any

import anyio
import anyio.abc

from ._program.context import GenerationMeta, RunContext, StreamEvent
from ._program.fork import ForkGroup
from ._program.groups import program_error
from ._program.state import ProgramState
from .backends.base import Backend
from .primitives import _SAMPLING_FIELDS
from .sampling import SamplingParams

__all__ = [
    "SAMPLING_DEFAULTS",
    "ForkGroup",
    "GenerationMeta",
    "Program",
    "ProgramEvents",
    "ProgramState",
    "ProgramStream",
    "StreamEvent",
    "current_backend",
    "program",
    "use_backend",
]

#: Keyword names ``run`` & co. take as run-level sampling defaults (reserved in programs).
SAMPLING_DEFAULTS: frozenset[str] = frozenset(_SAMPLING_FIELDS)

_default_backend: contextvars.ContextVar[Backend | None] = contextvars.ContextVar(
    "aiolm_default_backend", default=None
)


@contextlib.contextmanager
def use_backend(backend: Backend) -> Iterator[Backend]:
    """Make ``backend`` the default for ``run`` & co. inside the block (task-local)."""
    if not isinstance(backend, Backend):
        raise TypeError(f"backend: expected an aiolm Backend, got {type(backend).__name__}")
    token = _default_backend.set(backend)
    try:
        yield backend
    finally:
        _default_backend.reset(token)


def current_backend() -> Backend | None:
    """The backend set by the innermost ``use_backend`` block of this task, if any."""
    return _default_backend.get()


def _resolve_backend(backend: Backend | None) -> Backend:
    if backend is None:
        backend = _default_backend.get()
        if backend is None:
            raise ValueError(
                "backend: no backend given; pass backend=... or use `with aiolm.use_backend(b):`"
            )
    elif not isinstance(backend, Backend):
        raise TypeError(f"backend: expected an aiolm Backend, got {type(backend).__name__}")
    return backend


def _split_kwargs(kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separate run-level sampling defaults from program arguments; validate the defaults."""
    program_kwargs: dict[str, Any] = {}
    defaults: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in SAMPLING_DEFAULTS:
            if value is not None:
                defaults[key] = value
        else:
            program_kwargs[key] = value
    if defaults:
        probe = dict(defaults)
        probe.setdefault("max_tokens", max(probe.get("min_tokens", 0), 128))
        SamplingParams(**probe)  # raises naming the bad argument
    return program_kwargs, defaults


#: Names SGLang users pass, and what aiolm calls them.
_SGLANG_NAMES = {
    "progress_bar": "progress=True", "num_threads": "max_concurrency=",
    "max_new_tokens": "max_tokens=", "stream": "program.stream(...)",
}


def _check_arguments(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any],
                     where: str) -> None:
    """Raise ``TypeError`` now, naming ``where``, if ``fn(s, *args, **kwargs)`` cannot bind."""
    try:
        inspect.signature(fn).bind(None, *args, **kwargs)
    except TypeError as exc:
        hints = [f"{k!r} is SGLang's name; aiolm's is {_SGLANG_NAMES[k]}"
                 for k in kwargs if k in _SGLANG_NAMES]
        hint = f" ({'; '.join(hints)}: see docs/coming-from-sglang.md)" if hints else ""
        raise TypeError(f"{where}: {fn.__name__}(s, ...) {exc}{hint}") from None


class Program:
    """An ``async def`` program made runnable by :func:`program`.

    Calling it (``await sub(s, ...)``) runs its body on an existing state, so programs
    compose; ``run`` / ``run_batch`` / ``stream`` run it on a fresh state.
    """

    def __init__(self, fn: Callable[..., Awaitable[Any]]) -> None:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"program: expected an `async def` function, got {fn!r}")
        params = list(inspect.signature(fn).parameters)
        if not params:
            raise TypeError(f"program: {fn.__qualname__} must take the state as its first argument")
        reserved = sorted((SAMPLING_DEFAULTS | {"backend"}) & set(params[1:]))
        if reserved:
            raise TypeError(
                f"program: {fn.__qualname__} has parameter(s) {', '.join(reserved)}, which are "
                "reserved for run-level settings (run(..., temperature=...)); rename them"
            )
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __repr__(self) -> str:
        return f"<aiolm.Program {self.fn.__qualname__}>"

    async def __call__(self, s: ProgramState, *args: Any, **kwargs: Any) -> Any:
        """Run the body on state ``s`` (a sub-program)."""
        return await self.fn(s, *args, **kwargs)

    async def _drive(self, state: ProgramState, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Run the body on ``state`` in a task group that owns its stream; raise its error
        by the rule of :func:`~aiolm._program.groups.program_error`."""
        error: BaseException | None = None
        try:
            async with anyio.create_task_group() as tg:
                state._tg = tg
                await self.fn(state, *args, **kwargs)
                # leaving the group waits for the state's queued exprs
        except BaseExceptionGroup as group:
            error = program_error(group)
        finally:
            state._closed = True
        if error is not None:
            raise error

    async def run(self, *args: Any, backend: Backend | None = None, **kwargs: Any) -> ProgramState:
        """Run the program on ``backend`` (or the ``use_backend`` default) and return its state.

        Keyword arguments named like sampling parameters are defaults for every ``gen``.
        Waits for everything the program appended. Raises the program's error by aiolm's one
        rule (:mod:`aiolm._program.groups`, ``docs/language.md``): one failure as itself
        (also one backend failure that several fork branches saw, e.g. ``BackendUnavailable``
        when the engine dies); several independent failures at once as one flat
        ``ExceptionGroup`` of them. Cancelling the caller cancels the program's gens and forks.
        """
        program_kwargs, defaults = _split_kwargs(kwargs)
        _check_arguments(self.fn, args, program_kwargs, "run")
        return await self._run(args, backend, defaults, program_kwargs)

    async def _run(self, args: tuple[Any, ...], backend: Backend | None, defaults: dict[str, Any],
                   program_kwargs: dict[str, Any]) -> ProgramState:
        state = ProgramState(run=RunContext(_resolve_backend(backend), defaults, program=self.fn.__name__))
        await self._drive(state, args, program_kwargs)
        return state

    def run_sync(self, *args: Any, backend: Backend | None = None, **kwargs: Any) -> ProgramState:
        """:meth:`run` for scripts, without an event loop: runs the program in an event loop
        of its own (``anyio.run``, asyncio) and returns its state when it has finished.

        Each call is one event loop, and a backend holding connections or threads belongs
        to the loop that opened them. So a backend that is an async context manager (an
        :class:`aiolm.Engine`) is opened for the run and closed after it: pass an engine that
        is not started, and expect the model to load on every call. An :class:`aiolm.OpenAI`
        backend's HTTP connections stay with the first call's (closed) loop: give each call
        a new one. For several runs, write an ``async def main()`` that awaits :meth:`run`
        (inside ``async with aiolm.Engine() as engine:``) and call ``anyio.run(main)``. Arguments
        are checked, and the backend resolved (``use_backend`` applies), before the loop
        starts. Raises ``RuntimeError`` when called from a running event loop (a notebook
        cell, an ``async def``): use ``await program.run(...)`` there. Raises what
        :meth:`run` raises.
        """
        running = _running_event_loop()
        if running is not None:
            raise RuntimeError(
                f"run_sync: called from a running {running} event loop (a notebook cell or an "
                f"`async def`); there use `state = await {self.fn.__name__}.run(...)`"
            )
        program_kwargs, defaults = _split_kwargs(kwargs)
        _check_arguments(self.fn, args, program_kwargs, "run_sync")
        resolved = _resolve_backend(backend)

        async def main() -> ProgramState:
            async with contextlib.AsyncExitStack() as stack:
                if isinstance(resolved, contextlib.AbstractAsyncContextManager):
                    await stack.enter_async_context(resolved)
                return await self._run(args, resolved, defaults, program_kwargs)

        return anyio.run(main)

    async def run_batch(
        self,
        batch: Iterable[Mapping[str, Any]],
        *,
        backend: Backend | None = None,
        max_concurrency: int = 64,
        progress: bool = False,
        raise_errors: bool = False,
        on_done: Callable[[int, ProgramState], object] | None = None,
        **defaults: Any,
    ) -> list[ProgramState]:
        """Run the program once per keyword-argument mapping in ``batch``; states in order.

        At most ``max_concurrency`` programs run at once. ``defaults`` are merged under every
        mapping (sampling names become run-level sampling defaults). A failing program does
        not stop the others: its state has ``.error`` set (what :meth:`run` would raise),
        unless ``raise_errors=True``, which cancels the batch at the first failure and raises
        it by the same rule as :meth:`run` (programs that failed at once: their group).
        ``progress=True`` shows a tqdm bar.
        ``on_done(index, state)`` is called as each program finishes, failed ones included
        (``state.error`` set), in the order they finish: for a progress display of your own.
        """
        items = list(batch)
        for i, item in enumerate(items):
            if not isinstance(item, Mapping):
                raise TypeError(f"batch[{i}]: expected a mapping of keyword arguments, got {type(item).__name__}")
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int):
            raise TypeError(f"max_concurrency: expected an int, got {type(max_concurrency).__name__}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency: must be >= 1, got {max_concurrency}")
        backend = _resolve_backend(backend)
        base_kwargs, base_sampling = _split_kwargs(defaults)
        # Every program's arguments are checked before any runs: a wrong keyword is one
        # mistake, not a batch of failed states.
        for i, item in enumerate(items):
            program_kwargs, _ = _split_kwargs({**base_kwargs, **item})
            _check_arguments(self.fn, (), program_kwargs, f"run_batch: batch[{i}]")
        states: list[ProgramState | None] = [None] * len(items)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(items), desc=self.fn.__name__, unit="prog")
        indices = iter(range(len(items)))

        async def worker() -> None:
            # A fixed pool of workers pulling indices bounds concurrency without parking
            # one task per program.
            for i in indices:
                item = items[i]
                if item:
                    program_kwargs, sampling = _split_kwargs({**base_kwargs, **base_sampling, **item})
                else:
                    program_kwargs, sampling = dict(base_kwargs), base_sampling
                state = states[i] = ProgramState(run=RunContext(backend, sampling, program=self.fn.__name__))
                try:
                    await self._drive(state, (), program_kwargs)
                except Exception as exc:
                    if raise_errors:
                        raise
                    state.error = exc
                if bar is not None:
                    bar.update(1)
                if on_done is not None:
                    on_done(i, state)

        error: BaseException | None = None
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(min(max_concurrency, len(items))):
                    tg.start_soon(worker)
        except BaseExceptionGroup as group:
            error = program_error(group)
        finally:
            if bar is not None:
                bar.close()
        if error is not None:
            raise error
        return states  # type: ignore[return-value]

    def stream(self, *args: Any, backend: Backend | None = None, **kwargs: Any) -> ProgramStream:
        """Run the program and stream what it generates::

            async with qa.stream(question="...", backend=b) as events:
                async for ev in events:
                    print(ev.name, ev.text)
            events.state["answer"]

        Leaving the block before the program ends cancels it. The program's error is raised
        from the block.
        """
        program_kwargs, defaults = _split_kwargs(kwargs)
        _check_arguments(self.fn, args, program_kwargs, "stream")
        return ProgramStream(self, _resolve_backend(backend), defaults, args, program_kwargs)


def _running_event_loop() -> str | None:
    """The event loop running in this thread (``"asyncio"``, ``"trio"``), or None."""
    import asyncio

    try:
        asyncio.get_running_loop()
        return "asyncio"
    except RuntimeError:
        pass
    trio = sys.modules.get("trio")  # never imported here: only a running trio has it
    if trio is not None:
        try:
            trio.lowlevel.current_trio_token()
            return "trio"
        except RuntimeError:
            pass
    return None


def program(fn: Callable[..., Awaitable[Any]]) -> Program:
    """Decorate an ``async def fn(s, ...)`` as a :class:`Program`."""
    return Program(fn)


class ProgramEvents:
    """The async iterator of :class:`StreamEvent`\\ s a :class:`ProgramStream` yields.

    ``state`` is the program's state once the program has finished (None before).
    """

    def __init__(self, receive: anyio.abc.ObjectReceiveStream[StreamEvent]) -> None:
        self._receive = receive
        self.state: ProgramState | None = None

    def __aiter__(self) -> ProgramEvents:
        return self

    async def __anext__(self) -> StreamEvent:
        """The next event; ends when the program has finished."""
        return await self._receive.__anext__()


class ProgramStream:
    """``async with program.stream(...) as events`` — see :meth:`Program.stream`."""

    def __init__(
        self,
        prog: Program,
        backend: Backend,
        defaults: dict[str, Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self._program = prog
        self._backend = backend
        self._defaults = defaults
        self._args = args
        self._kwargs = kwargs
        self._tg: anyio.abc.TaskGroup | None = None
        self._events: ProgramEvents | None = None

    async def __aenter__(self) -> ProgramEvents:
        if self._tg is not None:
            raise RuntimeError("a program stream can be entered only once")
        # Unbounded: a slow reader never stalls the program (events are only its text).
        send, receive = anyio.create_memory_object_stream[StreamEvent](math.inf)
        events = self._events = ProgramEvents(receive)
        state = ProgramState(run=RunContext(self._backend, self._defaults, emit=send.send,
                                            program=self._program.fn.__name__))

        async def runner() -> None:
            async with send:
                await self._program._drive(state, self._args, self._kwargs)
                events.state = state  # before the reader can see the end of the stream

        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(runner)
        return events

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        assert self._tg is not None and self._events is not None
        # Leaving early (the program still running) cancels it; after the last event the
        # program has finished and this cancels nothing.
        if self._events.state is None:
            self._tg.cancel_scope.cancel()
        error: BaseException | None = None
        try:
            return bool(await self._tg.__aexit__(exc_type, exc, tb))
        except BaseExceptionGroup as group:
            error = program_error(group)
        finally:
            self._events._receive.close()
        raise error
