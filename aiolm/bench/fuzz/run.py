"""The fuzzing run: :func:`fuzz_engine` starts rounds of random programs, then checks the
engine after each (idle, greedy outputs as alone, KV integrity); programs reach the engine
through a backend that counts their requests."""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

import anyio
import attrs

from ..._program.groups import leaf_errors
from ...backends.base import Backend, GenerateRequest
from ...errors import BackendUnavailable
from ._common import _Greedy, _greedy_sampling, _Limits, _Mismatch
from ._programs import _build
from .report import Fault, FuzzReport, first_greedy_mismatch, program_seed

if TYPE_CHECKING:
    from ...backends.base import Chunk, ScoreResult
    from ...backends.engine import Engine

__all__ = ["fuzz_engine", "wait_idle"]


async def fuzz_engine(engine: Engine, *, seed: int, programs: int | None = None,
                      duration_s: float | None = None, concurrency: int = 8,
                      round_size: int = 16, max_new_tokens: int = 16, margin: float = 1e-3,
                      stall_s: float = 60.0) -> FuzzReport:
    """Run random programs on the open ``engine`` and report what broke.

    Works in rounds: each starts ``round_size`` programs at once (at most ``concurrency``
    running), waits for all of them, waits (bounded) for the engine to go idle, re-runs the
    round's greedy requests alone and compares them (:func:`first_greedy_mismatch` with
    ``margin``), then calls ``engine.check_integrity()``. Stops after ``programs`` programs
    or, at a round boundary, after ``duration_s`` seconds, whichever comes first.
    ``max_new_tokens`` bounds every unconstrained generation. A program still running after
    ``stall_s`` seconds is cancelled and reported. The report's ``requests`` counts the
    fuzzer's own generate / stream / score calls (see :class:`FuzzReport`).

    One program's failure never stops the run: it becomes a :class:`Fault`. A broken engine
    does (an integrity fault, a request that never leaves, a dead engine loop): what follows
    would be its consequences, not new findings. Mutates the engine's cache and statistics
    only. Raises ``ValueError`` naming a bad argument (neither ``programs`` nor
    ``duration_s``, a bound below 1) and for an engine without a tokenizer.
    """
    if programs is None and duration_s is None:
        raise ValueError("programs, duration_s: give at least one (a count or a time budget)")
    for name, value in (("programs", programs), ("concurrency", concurrency),
                        ("round_size", round_size), ("max_new_tokens", max_new_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    for name, value in (("duration_s", duration_s), ("stall_s", stall_s)):
        if value is not None and not value > 0:
            raise ValueError(f"{name}: must be > 0 seconds, got {value!r}")
    if not margin >= 0:
        raise ValueError(f"margin: must be >= 0 nats, got {margin!r}")
    if engine.tokenizer is None:
        raise ValueError("engine: the fuzzer runs text programs and needs a tokenizer "
                         "(load dummy weights with aiolm.bench.models.load_for_bench)")
    run = _Run(engine=engine, seed=seed, limits=_Limits.of(engine, max_new_tokens),
               margin=margin, stall_s=stall_s, limiter=anyio.CapacityLimiter(concurrency))
    retractions = run.retractions()
    start = time.monotonic()
    done = 0
    while (programs is None or done < programs) and (
            duration_s is None or time.monotonic() - start < duration_s):
        size = round_size if programs is None else min(round_size, programs - done)
        async with anyio.create_task_group() as tg:
            for index in range(done, done + size):
                tg.start_soon(run.one, index)
        done += size
        if not await run.after_round(done - size, done):
            break
    return FuzzReport(
        seed=seed, programs=done, requests=run.requests, cancelled=run.cancelled,
        dropped_streams=run.dropped_streams, retractions=run.retractions() - retractions,
        integrity_checks=run.integrity_checks, wall_s=time.monotonic() - start,
        faults=tuple(run.faults),
    )


@attrs.define(eq=False, kw_only=True)
class _Run:
    """One fuzzing run's engine, counters and findings."""

    engine: Engine
    seed: int
    limits: _Limits
    margin: float
    stall_s: float
    limiter: anyio.CapacityLimiter
    backend: Backend = attrs.field(init=False)
    requests: int = 0
    cancelled: int = 0
    dropped_streams: int = 0
    integrity_checks: int = 0
    faults: list[Fault] = attrs.field(factory=list)
    greedy: list[_Greedy] = attrs.field(factory=list)
    _last_retractions: int = attrs.field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        self.backend = _Counting(self)

    def retractions(self) -> int:
        """The engine's retractions so far (its last snapshot's, if its loop has died)."""
        with contextlib.suppress(BackendUnavailable):
            self._last_retractions = self.engine.statistics().retractions
        return self._last_retractions

    def fault(self, index: int, kind: str, message: str) -> None:
        self.faults.append(Fault(seed=program_seed(self.seed, index), program=index, kind=kind,
                                 message=message))

    async def one(self, index: int) -> None:
        """Build and run program ``index``; record what went wrong, never raise."""
        prog = _build(random.Random(program_seed(self.seed, index)), self.limits)
        async with self.limiter:
            with anyio.move_on_after(self.stall_s) as scope:
                try:
                    await prog.body(self, index)
                except Exception as exc:  # every failure is a finding, none stops the run
                    kind, what = _describe_error(exc)
                    self.fault(index, kind, f"{prog.label}: {what}")
            if scope.cancelled_caught:
                self.fault(index, "stall", f"{prog.label}: still running after {self.stall_s} s")

    async def after_round(self, first: int, end: int) -> bool:
        """Check the engine after programs ``first..end-1``; False when it is broken."""
        greedy, self.greedy = self.greedy, []
        self.retractions()
        where = f"after programs {first}..{end - 1}"
        try:
            with anyio.fail_after(self.stall_s):
                if await wait_idle(self.engine):
                    for g in sorted(greedy, key=lambda g: g.index):
                        await self._compare_alone(g)
                self.integrity_checks += 1
                report = await self.engine.check_integrity()
        except RuntimeError as exc:  # BackendUnavailable is an AiolmError, not one of these
            self.fault(first, "integrity", f"{where}: {exc}")
            return False
        except TimeoutError:
            self.fault(first, "stall", f"{where}: the engine did not answer within {self.stall_s} s")
            return False
        except BackendUnavailable as exc:
            self.fault(first, "error", f"{where}: the engine is gone: {exc}")
            return False
        if not report.idle:
            self.fault(first, "not-idle", f"{where}: every program ended, yet the engine still "
                       f"has {report.running_requests} running and {report.waiting_requests} "
                       "waiting requests")
            return False
        return True

    async def _compare_alone(self, g: _Greedy) -> None:
        try:
            self.requests += 1
            alone = await self.engine.generate(input_ids=g.input_ids, **_greedy_sampling(g.max_tokens))
        except Exception as exc:
            kind, what = _describe_error(exc)
            self.fault(g.index, kind, f"greedy re-run alone: {what}")
            return
        problem = first_greedy_mismatch(alone, g.completion, self.margin)
        if problem is not None:
            self.fault(g.index, "mismatch", f"greedy in the mix vs alone: {problem}")


async def wait_idle(engine: Engine, timeout: float = 10.0) -> bool:
    """Wait until ``engine`` has no running or queued request (polling its statistics);
    False if it is still busy after ``timeout`` seconds."""
    with anyio.move_on_after(timeout):
        while True:
            stats = engine.statistics()
            if stats.running_requests == 0 and stats.queued_requests == 0:
                return True
            await anyio.sleep(0.005)
    return False


def _describe_error(exc: BaseException) -> tuple[str, str]:
    """The fault kind and message of a program's exception (groups: their leaves)."""
    leaves = list(leaf_errors(exc))
    kind = "mismatch" if any(isinstance(e, _Mismatch) for e in leaves) else "error"
    return kind, "; ".join(str(e) if isinstance(e, _Mismatch) else f"{type(e).__name__}: {e}"
                           for e in leaves)


class _Counting(Backend):
    """The engine as the programs' backend, counting the generate and score calls."""

    def __init__(self, run: _Run) -> None:
        self._run = run
        self._engine = run.engine
        self.capabilities = run.engine.capabilities

    @property
    def chat_template(self) -> Any:
        return self._engine.chat_template

    @property
    def model_name(self) -> str:
        return self._engine.model_name

    def stream(self, request: GenerateRequest) -> AbstractAsyncContextManager[AsyncIterator[Chunk]]:
        self._run.requests += 1
        return self._engine.stream(request)

    async def score(self, prefix: GenerateRequest, continuations: Sequence[str],
                    method: str = "token_length_normalized") -> ScoreResult:
        self._run.requests += 1
        return await self._engine.score(prefix, continuations, method)

    async def prefill(self, prefix: GenerateRequest) -> None:
        await self._engine.prefill(prefix)
