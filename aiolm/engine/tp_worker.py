"""The tensor-parallel worker processes: what a step sends them, and the loop they run.

Rank 0 is the engine itself (its loop thread keeps the scheduler, the radix cache, the
constraints and the sampling); ranks ``1..N-1`` are processes started by
:class:`~aiolm.engine.tp_workers.TPWorkers` (``torch.multiprocessing``, spawn context), each
holding its shard of the weights and of every KV buffer (the same slots, its own heads) on
its own device (``cuda:r``, or the CPU). Each step rank 0 sends every worker:

1. a header through the worker's pipe (host ints: the pass's mode and sizes, and the
   host-side lengths the attention backend reads) — a pipe, not a collective, so that a
   worker can prepare its pass while the device still computes the previous one, and an
   idle engine keeps no collective waiting (a pipe has no timeout to run out);
2. one broadcast of a packed int64 device tensor: the pass's input ids (placeholders of a
   pass in flight already resolved on rank 0's device, from its sampled ids: no host
   sync), positions, KV slots, request-table rows, and the rows of the request → slots
   table of each request in the pass (``req_to_token[row, :longest]``): the workers' tables
   are thus rank 0's for every row a pass reads (slot allocation stays on rank 0).

Then every rank runs its shard (the collectives of the sharded layers pair up, CUDA graphs
replayed alike on every rank); the workers drop their copy of the logits.

A worker exits when told to, when its pipe closes, or when its parent dies (a thread waits
on the parent's sentinel), so no worker outlives the engine.
"""

from __future__ import annotations

import faulthandler
import logging
import multiprocessing.connection
import os
import signal
import threading
import traceback
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .forward_batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from .config import EngineConfig
    from .runner import ModelRunner

__all__ = ["COLLECTIVE_TIMEOUT", "STEP", "STOP", "decode_step", "encode_step", "leave_group",
           "worker_main"]

_log = logging.getLogger("aiolm.engine")

#: Op codes, the first int of every message on a worker's pipe.
STOP, STEP = 0, 1
#: How long one collective may wait for the other ranks before it fails.
COLLECTIVE_TIMEOUT = timedelta(seconds=300)
_HEAD = 6  # op, mode, batch size, tokens, longest sequence, all logits


def encode_step(fb: ForwardBatch, table: torch.Tensor) -> tuple[bytes, torch.Tensor]:
    """The header (bytes, for the pipes) and the packed int64 device tensor (for the
    broadcast) that let a worker rebuild ``fb``; ``table``: rank 0's request → slots table.
    Queues device work only (no host sync). Raises ``ValueError`` for a multimodal pass
    (tensor parallelism runs the text-only Llama family)."""
    if fb.mm_embeds is not None or fb.mrope_positions is not None:
        raise ValueError("tp_size: a pass with images cannot run tensor-parallel")
    bs, n = fb.batch_size, fb.num_tokens
    longest = max(fb.seq_lens_cpu)
    extend = not fb.is_decode
    head = [STEP, int(fb.is_decode), bs, n, longest, int(fb.return_logits == "all"),
            *fb.seq_lens_cpu,
            *(fb.extend_prefix_lens_cpu if extend else ()),
            *(fb.extend_seq_lens_cpu if extend else ())]
    rows = table.index_select(0, fb.req_pool_indices)[:, :longest]
    data = torch.cat([fb.input_ids, fb.positions, fb.out_cache_loc.to(torch.int64),
                      fb.req_pool_indices, rows.reshape(-1).to(torch.int64)])
    return np.asarray(head, dtype=np.int64).tobytes(), data


def decode_step(header: np.ndarray, runner: ModelRunner) -> ForwardBatch:
    """Receive the broadcast ``header`` announces and rebuild rank 0's pass on this rank:
    writes the pass's request-table rows into this rank's table, returns its
    :class:`ForwardBatch` (over this rank's KV pool)."""
    _op, decode, bs, n, longest, all_logits = (int(v) for v in header[:_HEAD])
    lens = header[_HEAD:].tolist()
    seq_lens = lens[:bs]
    prefix, extend = (lens[bs:2 * bs], lens[2 * bs:3 * bs]) if not decode else ([], [])
    dev = runner.device
    data = torch.empty(3 * n + bs + bs * longest, dtype=torch.int64, device=dev)
    runner.tp.broadcast(data)
    input_ids, positions, out_cache_loc, req_pool_indices, rows = data.split(
        [n, n, n, bs, bs * longest])
    table = runner.req_to_token_pool.req_to_token
    table[req_pool_indices, :longest] = rows.view(bs, longest).to(torch.int32)

    def on_device(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32).to(dev, non_blocking=True)

    return ForwardBatch(
        mode=ForwardMode.DECODE if decode else ForwardMode.EXTEND, batch_size=bs,
        input_ids=input_ids, positions=positions, out_cache_loc=out_cache_loc,
        req_pool_indices=req_pool_indices, seq_lens=on_device(seq_lens),
        extend_prefix_lens=None if decode else on_device(prefix),
        extend_seq_lens=None if decode else on_device(extend),
        seq_lens_cpu=seq_lens, extend_prefix_lens_cpu=prefix, extend_seq_lens_cpu=extend,
        return_logits="all" if all_logits else "last",
        kv_pool=runner.kv_pool, req_to_token_pool=runner.req_to_token_pool,
    )


def worker_main(rank: int, size: int, port: int, config: EngineConfig, device: str,
                conn: multiprocessing.connection.Connection) -> None:
    """Rank ``rank``'s process: join the group, load the shard, build the runner, then run
    the passes rank 0 sends until told to stop (or the pipe or the parent goes away).

    Reports on ``conn``: ``("hello", None)`` before joining the group, ``("loaded", None)``
    once the weights are in, ``("ready", None)`` once the runner (KV pool, CUDA graphs) is
    built, or ``("error", traceback text)`` and exits.
    """
    import torch.distributed as dist

    threading.Thread(target=_exit_with_parent, name="aiolm-tp-parent-watch",
                     daemon=True).start()
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    # A worker that does not stop is terminated (SIGTERM) by rank 0: say where it was.
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
    try:
        conn.send(("hello", None))
        store = dist.TCPStore("127.0.0.1", port, size, is_master=False,
                              timeout=COLLECTIVE_TIMEOUT)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", store=store,
                                rank=rank, world_size=size, timeout=COLLECTIVE_TIMEOUT,
                                device_id=dev if dev.type == "cuda" else None)
        runner = _build(rank, size, config, dev, conn)
    except (EOFError, BrokenPipeError):
        return   # rank 0 went away while this one started
    except BaseException:
        _send_quietly(conn, ("error", traceback.format_exc()))
        raise SystemExit(1) from None
    try:
        with torch.inference_mode():
            _serve(conn, runner)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass   # rank 0 closed the pipe: the engine is gone
    finally:
        runner.release_graphs()
        leave_group(died=False, device=dev)


def _build(rank: int, size: int, config: EngineConfig, dev: torch.device,
           conn: multiprocessing.connection.Connection) -> ModelRunner:
    from .default_model import default_model_path
    from .loader import load_model
    from .parallel import TPGroup
    from .runner import ModelRunner

    group = TPGroup(rank=rank, size=size)
    source = config.model if config.model is not None else default_model_path()
    model, model_config = load_model(source, load_format=config.load_format,
                                     dtype=config.dtype, device=dev, seed=config.seed,
                                     quantization=None, tp=group)
    conn.send(("loaded", None))
    runner = ModelRunner(config, model=model, model_config=model_config, device=dev, tp=group)
    conn.send(("ready", None))
    return runner


def _serve(conn: multiprocessing.connection.Connection, runner: ModelRunner) -> None:
    while True:
        header = np.frombuffer(conn.recv_bytes(), dtype=np.int64)
        if header[0] == STOP:
            _log.debug("tensor-parallel rank %d: stop received", runner.tp.rank)
            return
        runner.forward(decode_step(header, runner))


def _exit_with_parent() -> None:
    """Wait for the parent process to end, then end this one (a worker never outlives the
    engine's process, even when that one is killed)."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    if parent is None:
        return
    multiprocessing.connection.wait([parent.sentinel])
    os._exit(1)


def _send_quietly(conn: multiprocessing.connection.Connection, message: Any) -> None:
    try:
        conn.send(message)
    except OSError:
        pass


def leave_group(*, died: bool, device: torch.device | None = None) -> None:
    """Leave the default process group (rank 0's and the workers' way out).

    A gloo group is destroyed. An NCCL group is aborted, never destroyed: NCCL's destroy
    first flushes and then tears down the communicator collectively, and on
    nvidia-h200-x2 it hung (rank 0 and a worker both inside it, the group left
    registered). An abort ends the communicator without waiting; so that it cuts no pass
    short, a healthy rank first waits for its ``device`` to finish its queued work (the
    collectives in it complete because every rank queued the same passes). After a
    worker died, rank 0 aborts at once: its stream may wait in a collective the dead rank
    never joined.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if abort is None or dist.get_backend() != "nccl":
        dist.destroy_process_group()
        return
    if not died and device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        _log.debug("leaving the tensor-parallel group: %s is idle", device)
    abort()
    _log.debug("left the tensor-parallel group (aborted)")
    if dist.is_initialized():  # an abort that left the default group registered
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort after an abort
            _log.warning("destroying the aborted tensor-parallel group failed",
                         exc_info=True)
