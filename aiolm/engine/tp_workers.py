"""Rank 0's side of tensor parallelism: start the worker processes, send them each step,
notice when one dies, and stop them all.

:func:`start_tensor_parallel` starts ranks ``1..N-1`` (:func:`aiolm.engine.tp_worker.worker_main`
in ``torch.multiprocessing``'s spawn context, rank ``r`` on ``cuda:<rank 0's index + r>`` or
the CPU), joins them in one ``torch.distributed`` group (NCCL on CUDA, gloo on the CPU;
the rendezvous on a free TCP port of 127.0.0.1) and loads rank 0's shard. The engine's
runner then owns the returned :class:`TPWorkers`: it sends each pass
(:meth:`TPWorkers.send_step`), waits for the device through :meth:`TPWorkers.wait_event`
(which notices a dead worker where a collective would wait for it forever), and
:meth:`TPWorkers.close` stops every worker when the engine loop ends.

A worker that dies fails the step with :class:`~aiolm.errors.BackendUnavailable` naming its
rank (the engine loop then fails every open request with it); a collective that cannot
complete fails after :data:`~aiolm.engine.tp_worker.COLLECTIVE_TIMEOUT`.
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import os
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import BackendUnavailable
from .parallel import TPGroup
from .tp_worker import COLLECTIVE_TIMEOUT, STOP, encode_step, leave_group, worker_main

if TYPE_CHECKING:
    from .config import EngineConfig
    from .forward_batch import ForwardBatch
    from .loaded import LoadedModel

__all__ = ["TPWorkers", "start_tensor_parallel"]

_log = logging.getLogger("aiolm.engine")

#: How long a worker may take to stop when asked, and to exit when terminated.
_STOP_TIMEOUT = 5.0
#: How long a failed collective waits for the worker whose death it probably saw to exit.
_DEATH_GRACE = 2.0


def start_tensor_parallel(config: EngineConfig) -> tuple[LoadedModel, TPWorkers]:
    """Start ``config.tp_size - 1`` workers, join them, load rank 0's shard (blocking).

    Returns rank 0's :class:`~aiolm.engine.loaded.LoadedModel` and the workers, which the
    caller must :meth:`~TPWorkers.close` (the engine's runner does once it owns them).
    Raises ``ValueError`` for a machine or model that cannot run ``tp_size`` ranks,
    ``RuntimeError`` with a worker's traceback when one fails to start or load.
    """
    import torch.distributed as dist

    from .config import resolve_device
    from .default_model import default_model_path
    from .loaded import LoadedModel
    from .loader import read_model_config
    from .parallel import check_tensor_parallel

    device = resolve_device(config.device)
    size = config.tp_size
    source = config.model if config.model is not None else default_model_path()
    check_tensor_parallel(read_model_config(source, config.load_format), size)
    if device.type == "cuda":
        first = device.index if device.index is not None else torch.cuda.current_device()
        if first + size > torch.cuda.device_count():
            raise ValueError(f"tp_size: {size} ranks from cuda:{first} need "
                             f"{first + size} GPUs, this machine has {torch.cuda.device_count()}")
        device = torch.device("cuda", first)
        devices = [f"cuda:{first + r}" for r in range(size)]
    else:
        devices = ["cpu"] * size
    if dist.is_initialized():
        raise ValueError("tp_size: torch.distributed is already initialized in this process "
                         "(another tensor-parallel Engine is open?); close it first")
    if device.type == "cuda":
        # A collective past its timeout aborts the communicator (the step fails with its
        # error) instead of killing the process, which is the user's, not ours.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, timeout=COLLECTIVE_TIMEOUT,
                          wait_for_workers=False)
    workers = TPWorkers(config, devices, store.port)
    try:
        workers.wait_for("hello")
        workers.join_group(store, device)
        loaded = LoadedModel.load(config.model, dtype=config.dtype, device=str(device),
                                  load_format=config.load_format, seed=config.seed,
                                  quantization=None, tp=workers.group)
        workers.wait_for("loaded")
    except BaseException:
        workers.close()
        raise
    return loaded, workers


class TPWorkers:
    """Rank 0's handle on the worker processes (used by the engine thread only, but for
    :meth:`close`, which any thread may call once the loop is done).

    Starting it spawns the workers and returns at once; :func:`start_tensor_parallel` is
    the way in.
    """

    def __init__(self, config: EngineConfig, devices: list[str], port: int) -> None:
        ctx = torch.multiprocessing.get_context("spawn")
        self.group = TPGroup(rank=0, size=len(devices))
        self._joined = False
        self._device: torch.device | None = None
        self._procs: list[Any] = []
        self._conns: list[multiprocessing.connection.Connection] = []
        self._closed = False
        try:
            for rank in range(1, len(devices)):
                mine, theirs = ctx.Pipe()
                proc = ctx.Process(target=worker_main, name=f"aiolm-tp-rank{rank}",
                                   daemon=True, args=(rank, len(devices), port, config,
                                                      devices[rank], theirs))
                proc.start()
                theirs.close()  # the worker's end lives in the worker only: EOF when it dies
                self._procs.append(proc)
                self._conns.append(mine)
        except BaseException:
            self.close()
            raise

    def join_group(self, store: Any, device: torch.device) -> None:
        """Join the workers in the default process group as rank 0 (NCCL on CUDA, gloo on
        the CPU), through ``store``; waits for every worker to join."""
        import torch.distributed as dist

        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=0,
                                world_size=self.group.size, timeout=COLLECTIVE_TIMEOUT,
                                device_id=device if cuda else None)
        self._device = device
        self._joined = True

    # ---------------------------------------------------------------- startup
    def wait_for(self, stage: str) -> None:
        """Wait until every worker reports ``stage``; raises ``RuntimeError`` with the
        worker's traceback when one reports an error or dies first."""
        for rank, (proc, conn) in enumerate(zip(self._procs, self._conns, strict=True), 1):
            while True:
                ready = multiprocessing.connection.wait([conn, proc.sentinel])
                if conn in ready:
                    try:
                        kind, detail = conn.recv()
                    except EOFError:
                        kind, detail = "died", None
                else:
                    kind, detail = "died", None
                if kind == stage:
                    break
                if kind == "error":
                    raise RuntimeError(f"tensor-parallel rank {rank} failed to start:\n{detail}")
                proc.join(_DEATH_GRACE)
                raise RuntimeError(f"tensor-parallel rank {rank} (pid {proc.pid}) exited while "
                                   f"starting ({_exit_text(proc.exitcode)})")

    # ----------------------------------------------------------------- a step
    def send_step(self, fb: ForwardBatch, table: torch.Tensor) -> None:
        """Send pass ``fb`` to every worker (the header through the pipes, the device data
        by one broadcast). Raises :class:`BackendUnavailable` naming a dead worker."""
        header, data = encode_step(fb, table)
        for conn in self._conns:
            try:
                conn.send_bytes(header)
            except OSError as exc:
                raise self.lost(exc) from exc
        self.group.broadcast(data)

    def wait_event(self, event: Any) -> None:
        """Wait for CUDA ``event`` like ``event.synchronize()``, checking the workers while
        it waits: a dead worker leaves rank 0's collectives waiting forever on the device,
        so that raises :class:`BackendUnavailable` instead."""
        checked = time.monotonic()
        while not event.query():
            now = time.monotonic()
            if now - checked > 0.001:
                dead = self.dead()
                if dead:
                    raise BackendUnavailable(self._death_text(dead))
                checked = now
            time.sleep(0)  # let the event loop's thread have the GIL

    def pids(self) -> list[int]:
        """The workers' process ids, rank 1 first."""
        return [proc.pid for proc in self._procs]

    def dead(self) -> list[int]:
        """The ranks whose process has ended."""
        return [rank for rank, proc in enumerate(self._procs, 1) if not proc.is_alive()]

    def lost(self, exc: BaseException) -> BaseException:
        """The error a failed step raises: :class:`BackendUnavailable` naming the dead
        worker(s) when ``exc`` came from one dying (its end shows within a grace period),
        else ``exc`` itself."""
        deadline = time.monotonic() + _DEATH_GRACE
        while not (dead := self.dead()) and time.monotonic() < deadline:
            time.sleep(0.01)
        return BackendUnavailable(self._death_text(dead)) if dead else exc

    def startup_failure(self, exc: BaseException) -> BaseException:
        """The error a failed start raises: a dead worker's own traceback (``RuntimeError``)
        when ``exc`` came from one failing, else ``exc``."""
        error = self.lost(exc)
        if error is exc:
            return exc
        for rank, conn in enumerate(self._conns, 1):
            try:
                while conn.poll():
                    kind, detail = conn.recv()
                    if kind == "error":
                        return RuntimeError(f"tensor-parallel rank {rank} failed to start:\n"
                                            f"{detail}")
            except (EOFError, OSError):
                continue
        return error

    def _death_text(self, dead: list[int]) -> str:
        parts = [f"rank {r} (pid {self._procs[r - 1].pid}, "
                 f"{_exit_text(self._procs[r - 1].exitcode)})" for r in dead]
        return (f"tensor-parallel worker {', '.join(parts)} died; this engine cannot run "
                "any more requests (open a new Engine)")

    # --------------------------------------------------------------- shutdown
    def close(self) -> None:
        """Stop every worker and leave the process group (idempotent). Each worker is
        asked to stop, given :data:`_STOP_TIMEOUT` seconds, then terminated, then killed:
        no worker outlives this call."""
        if self._closed:
            return
        self._closed = True
        stop = np.asarray([STOP], dtype=np.int64).tobytes()
        for conn in self._conns:
            try:
                conn.send_bytes(stop)
            except OSError:
                pass
        _log.debug("tensor-parallel close: stop sent to %d workers", len(self._conns))
        # Leave the group while the workers leave it (each rank, once its device has run
        # every pass: NCCL's teardown waits for the other ranks' — see leave_group).
        leaving = None
        died = any(p.exitcode not in (0, None) for p in self._procs)
        if self._joined and not died:
            self._joined = False
            leaving = threading.Thread(target=_leave_quietly, args=(self._device,),
                                       name="aiolm-tp-leave", daemon=True)
            leaving.start()
        deadline = time.monotonic() + _STOP_TIMEOUT
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        _log.debug("tensor-parallel close: workers %s", [_exit_text(p.exitcode) for p in self._procs])
        for proc in self._procs:
            if proc.is_alive():
                _log.warning("tensor-parallel worker %s did not stop; terminating it", proc.name)
                proc.terminate()
                proc.join(_STOP_TIMEOUT)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()
        if leaving is not None:
            leaving.join(_STOP_TIMEOUT)
            import torch.distributed as dist

            joined = dist.is_initialized()
            _log.debug("tensor-parallel close: leaving thread alive=%s, group joined=%s",
                       leaving.is_alive(), joined)
            if leaving.is_alive() or joined:
                # Not left cleanly (a worker hung in a collective): abort it, so that this
                # process can open another tensor-parallel engine.
                leave_group(died=True)
        elif self._joined:  # a worker had died: only an abort ends rank 0's collectives
            self._joined = False
            leave_group(died=True)


def _leave_quietly(device: torch.device | None) -> None:
    try:
        leave_group(died=False, device=device)
    except Exception:  # noqa: BLE001 - the caller aborts the group if it is still there
        _log.warning("leaving the tensor-parallel group failed", exc_info=True)


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"
