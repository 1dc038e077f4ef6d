"""The model runner: a scheduled batch in, sampled tokens (and scores) out.

:class:`ModelRunner` owns the device side of an engine: the model, the KV memory (slot
allocator, K/V buffers, request → slots table), the attention backend and the sampler.
:meth:`ModelRunner.run` turns the scheduler's :class:`ScheduleBatch` into a
:class:`~aiolm.engine.forward_batch.ForwardBatch` (the missing tokens of each request,
their positions and slots), runs the model under ``torch.inference_mode``, samples the
requests the batch marks, and fetches everything the host needs with one device → host
copy per step. It is :meth:`ModelRunner.launch` (queue the pass, the sampling and the
copy; on CUDA nothing waits for the device) then :meth:`ModelRunner.fetch` (wait for the
copy, unpack): the overlapped engine loop calls them a step apart, and the next pass's
inputs take the tokens the previous one sampled from the device (placeholders in
``Req.all_ids``, see :mod:`aiolm.engine.request`).

CUDA graphs: when enabled on CUDA with a backend that supports them, decode batches go
through ``aiolm.engine.cuda_graph.CudaGraphRunner(runner)``, which offers
``can_run(batch) -> bool`` and ``replay(batch) -> logits``; everything else runs eagerly.

A step's inputs and the unpacking of its results are :mod:`aiolm.engine.step_io`; what a
step produces is :mod:`aiolm.engine.step_output`.

Tensor parallelism: a runner built with ``tp`` (a :class:`~aiolm.engine.parallel.TPGroup`)
runs one rank's shard: its attention and KV pool hold the rank's heads, and the KV pool's
size is the smallest any rank can hold (every rank has the same slots). Rank 0's runner
also gets the ``workers`` (:class:`~aiolm.engine.tp_workers.TPWorkers`): each pass is sent
to them before it runs, and :meth:`ModelRunner.close` stops them. A worker's runner is
driven by :mod:`aiolm.engine.tp_worker`, through :meth:`ModelRunner.forward` only.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..cache.pool import KVPool, ReqToTokenPool, TokenSlotAllocator, kv_bytes_per_token
from .attention import create as create_attention
from .debug_checks import check_forward_batch, debug_checks_enabled
from .forward_batch import ForwardBatch, ForwardMode
from .knobs import env_flag
from .sampler import Sampler, token_logprobs, top_token_logprobs
from .shared_prefix import auto_min_tokens, max_members
from .step_io import StepIO
from .step_output import LaunchedStep, SampledToken, ScoredTokens, StepOutput

if TYPE_CHECKING:
    from torch import nn

    from .config import EngineConfig
    from .model_config import ModelConfig
    from .parallel import TPGroup
    from .scheduler import ScheduleBatch
    from .tp_workers import TPWorkers

__all__ = [
    "LaunchedStep",
    "ModelRunner",
    "SampledToken",
    "ScoredTokens",
    "StepOutput",
    "choose_attention_backend",
    "choose_num_threads",
]

_log = logging.getLogger("aiolm.engine")

# The default CPU KV pool: room for this many full-context requests (at least
# _CPU_MIN_TOKENS slots), within this share of available RAM. Two: one request may use
# the whole context while another's prefix stays cached, or the CPU's 64 running requests
# get 256 tokens each at SmolLM2's 8k context. A CPU computes a few hundred to a few
# thousand tokens a second, so a larger pool would rarely fill, while it would hold RAM.
_CPU_FULL_CONTEXTS = 2
_CPU_MIN_TOKENS = 4096
_CPU_RAM_SHARE = 0.10


def choose_num_threads(requested: int | None, device: torch.device, *,
                       ranks: int = 1) -> int | None:
    """The intra-op thread count the engine gives torch: ``requested`` when set; else, on
    the CPU, the usable cores minus one (at least 1), which leaves the event loop a core,
    shared by the ``ranks`` processes of a tensor-parallel engine; else (CUDA) None,
    keeping torch's own setting.

    Tiny decode operations slow down many times over when one of their threads waits for a
    core another process holds, so the engine never asks for every core by default.
    """
    if requested is not None:
        return requested
    if device.type != "cpu":
        return None
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, (cores - 1) // ranks)


#: The most requests decoding together by default on CUDA, and the KV slots the default
#: leaves each of them at least (a pool too small for that many gets fewer); the CPU's.
CUDA_MAX_RUNNING_REQUESTS = 512
CUDA_SLOTS_PER_RUNNING_REQUEST = 512
CPU_MAX_RUNNING_REQUESTS = 64


def default_max_running_requests(kv_slots: int, cuda: bool) -> int:
    """``max_running_requests`` when it is not given: on CUDA 512, or one request per 512 KV
    slots of a smaller pool (at least 64); 64 on the CPU.

    Measured on nvidia-h200 (Llama-3-8B shape, the suite's 500-request throughput workload,
    two runs each, alternating): 512 gave 6,573 and 6,532 out tok/s, 256 (the default
    before) 5,927 and 5,857: a decode pass of a larger batch reads the weights once for
    more tokens (with 512, the workload's 500 requests all decode together;
    docs/benchmarks.md, wave 8)."""
    if not cuda:
        return CPU_MAX_RUNNING_REQUESTS
    return min(CUDA_MAX_RUNNING_REQUESTS,
               max(CPU_MAX_RUNNING_REQUESTS, kv_slots // CUDA_SLOTS_PER_RUNNING_REQUEST))


#: ``AIOLM_HYBRID_EXTEND_SETTLES=1``: the hybrid backend's extend passes wait for the pass in
#: flight to be processed before they launch (the behaviour before their plans were
#: double-buffered; an experiment's knob, see ``ModelRunner.queues_behind``).
HYBRID_EXTEND_SETTLES = env_flag("AIOLM_HYBRID_EXTEND_SETTLES", default=False)

#: The dtypes and head dimensions flashinfer's kernels take (``flashinfer``, ``hybrid``).
FLASHINFER_DTYPES = ("float16", "bfloat16")
FLASHINFER_HEAD_DIMS = (64, 128, 256)


def choose_attention_backend(device: torch.device, dtype: torch.dtype | None = None,
                             head_dim: int | None = None) -> str:
    """The attention backend ``"auto"`` means on ``device`` for a model of ``dtype`` and
    ``head_dim``.

    The CPU uses the exact torch backend. CUDA uses ``"hybrid"`` (flashinfer's prefill for
    extend passes, our triton decode) when flashinfer imports and the model is float16 or
    bfloat16 with heads of 64, 128 or 256 (flashinfer has no float32 kernels, and its
    Hopper prefill no other head size), else our triton kernels.
    """
    if device.type != "cuda":
        return "torch"
    if flashinfer_refusal(dtype, head_dim) is not None:
        return "triton"
    from .attention.flashinfer import flashinfer_available

    return "hybrid" if flashinfer_available() else "triton"


def flashinfer_refusal(dtype: torch.dtype | None, head_dim: int | None) -> str | None:
    """Why flashinfer's kernels cannot run a model of ``dtype`` and ``head_dim`` (None:
    they can; an unknown dtype or head size is not held against it)."""
    name = str(dtype).removeprefix("torch.")
    if dtype is not None and name not in FLASHINFER_DTYPES:
        return f"runs float16 or bfloat16 models (flashinfer has no {name} kernels)"
    if head_dim is not None and head_dim not in FLASHINFER_HEAD_DIMS:
        return f"runs heads of 64, 128 or 256 (this model's are {head_dim})"
    return None


def _available_ram() -> int:
    """Bytes of RAM available now: Linux's MemAvailable (free plus reclaimable cache), else
    the free pages ``sysconf`` reports, else a guess of 8 GiB."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return 8 * 1024**3


class ModelRunner(StepIO):
    """Runs scheduled batches on one device (used by the engine thread only).

    ``model`` / ``model_config`` are the loaded weights (see :mod:`aiolm.engine.loader`);
    ``eos_token_ids`` (default: the model config's) are banned before ``min_tokens``.
    Sizes the KV pool from ``config`` and creates the attention backend and the sampler.
    ``tp`` / ``workers``: this rank's place in a tensor-parallel engine, and (rank 0) the
    worker processes, which the runner then owns (see the module docstring; a failed
    construction closes them). Raises ``ValueError`` for an unknown attention backend or a
    pool too small for one request of a single token.
    """

    def __init__(self, config: EngineConfig, *, model: nn.Module, model_config: ModelConfig,
                 device: torch.device, eos_token_ids: Sequence[int] | None = None,
                 tp: TPGroup | None = None, workers: TPWorkers | None = None) -> None:
        self.workers = workers
        try:
            self._setup(config, model, model_config, device, eos_token_ids, tp)
            if workers is not None:
                workers.wait_for("ready")
        except BaseException as exc:
            if workers is not None:
                failure = workers.startup_failure(exc)
                workers.close()
                if failure is not exc:
                    raise failure from exc
            raise

    def _setup(self, config: EngineConfig, model: nn.Module, model_config: ModelConfig,
               device: torch.device, eos_token_ids: Sequence[int] | None,
               tp: TPGroup | None) -> None:
        self.config = config
        self.model = model
        self.model_config = model_config
        self.device = device
        self.tp = tp
        ranks = tp.size if tp is not None else 1
        if ranks > 1:
            from .parallel import local_heads

            q_heads, kv_heads = local_heads(model_config.num_heads, model_config.num_kv_heads,
                                            ranks)
        else:
            q_heads, kv_heads = model_config.num_heads, model_config.num_kv_heads
        self.num_kv_heads = kv_heads
        self.context_len = model_config.context_len
        cuda = device.type == "cuda"
        self.chunked_prefill_size = config.chunked_prefill_size or (8192 if cuda else 2048)

        backend = config.attention_backend
        if backend == "auto":
            backend = choose_attention_backend(device, model_config.torch_dtype,
                                               model_config.head_dim)
        elif backend in ("flashinfer", "hybrid") and device.type == "cuda":
            refusal = flashinfer_refusal(model_config.torch_dtype, model_config.head_dim)
            if refusal is not None:
                raise ValueError(f"attention_backend: {backend!r} {refusal}; use 'triton' or "
                                 "'auto'")
        self.attention_backend = backend
        self.attn = create_attention(
            backend, num_q_heads=q_heads, num_kv_heads=kv_heads,
            head_dim=model_config.head_dim, scale=model_config.head_dim ** -0.5, device=device,
        )
        self.model.set_attention(self.attn)

        size = self._kv_size()
        if tp is not None:
            size = tp.min_int(size, device)   # every rank holds the same slots
        self.allocator = TokenSlotAllocator(size, device)
        self.max_running_requests = (config.max_running_requests
                                     or default_max_running_requests(size, cuda))
        self.kv_pool = KVPool(model_config.num_layers, kv_heads,
                              model_config.head_dim, size, model_config.torch_dtype, device)
        self.req_to_token_pool = ReqToTokenPool(self.max_running_requests, self.context_len,
                                                device)
        self.sampler = Sampler(
            vocab_size=model_config.vocab_size, device=device, seed=config.seed,
            eos_token_ids=model_config.eos_token_ids if eos_token_ids is None else eos_token_ids,
        )
        self.num_threads = choose_num_threads(config.num_threads, device, ranks=ranks)
        if self.num_threads is not None:
            # NOTE: process-wide in effect: threads that start torch work later inherit it.
            torch.set_num_threads(self.num_threads)
            _log.info("engine: %d torch CPU thread(s)%s", self.num_threads,
                      "" if config.num_threads is not None else " (usable cores minus one)")
        self.forward_passes = 0
        # AIOLM_DEBUG_CHECKS=1: every index is checked on the host before it reaches a kernel.
        self.debug_checks = debug_checks_enabled()
        self.compiled_decode: Any = None
        if config.compile and device.type == "cpu":
            self.attn.compiled = True
            self.compiled_decode = torch.compile(self.model.forward, dynamic=True)
            self._warm_compiled_decode()
        # Shared-prefix decode (aiolm/engine/shared_prefix.py): not with tensor parallelism
        # (the workers rebuild each pass from rank 0's header, which does not carry groups).
        # None: on for multi-head models on CUDA (shared_prefix.auto_min_tokens).
        min_tokens = config.shared_prefix_min_tokens
        if min_tokens is None:
            min_tokens = auto_min_tokens(q_heads, kv_heads, device.type)
        self.shared_prefix_min_tokens = (min_tokens
                                         if self.attn.supports_shared_prefix and tp is None
                                         else 0)
        self.shared_prefix_members = max_members(q_heads, kv_heads)
        self.graph_runner: Any = None
        if config.cuda_graphs and cuda and self.attn.supports_cuda_graph:
            from .cuda_graph import CudaGraphRunner

            self.graph_runner = CudaGraphRunner(self)
        if self.shared_prefix_min_tokens and cuda:
            self._warm_shared_prefix_decode()

    @torch.inference_mode()
    def _warm_shared_prefix_decode(self) -> None:
        """Compile the shared-prefix decode kernels now, not in the first pass that groups
        requests (seconds of Triton compiling in the middle of serving): one decode pass of
        two requests sharing one token (see :meth:`_padding_decode_batch`)."""
        from .shared_prefix import prefix_groups

        self.model(self._padding_decode_batch(2, prefix_groups=prefix_groups(
            [(1, [0, 1])], [2, 2], self.device, width=self.shared_prefix_members)))
        torch.cuda.synchronize(self.device)
        self._zero_padding_slot()

    @torch.inference_mode()
    def _warm_compiled_decode(self) -> None:
        """Compile the CPU decode step now (inductor caches it on disk for the next start):
        decode batches of 1 and 3 requests (torch specializes sizes of 1)."""
        for bs in (1, 3):
            self.compiled_decode(self._padding_decode_batch(bs))
        self._zero_padding_slot()

    def _padding_decode_batch(self, bs: int, **fields: Any) -> ForwardBatch:
        """A warm-up decode pass of ``bs`` requests of 2 tokens over row 0 of the request
        table, whose slots are the padding slot 0 (:meth:`_zero_padding_slot` after)."""
        if self.req_to_token_pool.req_to_token[0, :2].any():
            raise RuntimeError("the request table must be unused while the engine warms up")
        dev = self.device
        return ForwardBatch(
            mode=ForwardMode.DECODE, batch_size=bs,
            input_ids=torch.zeros(bs, dtype=torch.int64, device=dev),
            positions=torch.ones(bs, dtype=torch.int64, device=dev),
            out_cache_loc=torch.zeros(bs, dtype=torch.int64, device=dev),
            req_pool_indices=torch.zeros(bs, dtype=torch.int64, device=dev),
            seq_lens=torch.full((bs,), 2, dtype=torch.int32, device=dev), seq_lens_cpu=[2] * bs,
            kv_pool=self.kv_pool, req_to_token_pool=self.req_to_token_pool, **fields)

    def _zero_padding_slot(self) -> None:
        for buf in (*self.kv_pool.k_buffers, *self.kv_pool.v_buffers):
            buf[0].zero_()

    def _kv_size(self) -> int:
        """KV slots: ``max_total_tokens``, or what memory holds, within what the kernels can
        address (raises ``ValueError`` for a ``max_total_tokens`` past that limit)."""
        cfg = self.model_config
        limit = self.attn.max_kv_slots(self.num_kv_heads, cfg.head_dim)
        if self.config.max_total_tokens is not None:
            if self.config.max_total_tokens > limit:
                raise ValueError(
                    f"max_total_tokens: {self.config.max_total_tokens} KV slots are more than "
                    f"{self.attention_backend} attention can address ({limit} for "
                    f"{self.num_kv_heads} KV heads of dimension {cfg.head_dim})")
            return self.config.max_total_tokens
        per_token = kv_bytes_per_token(cfg.num_layers, self.num_kv_heads, cfg.head_dim,
                                       cfg.torch_dtype)
        if self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            size = int(free * self.config.mem_fraction) // per_token
        else:
            wanted = max(_CPU_FULL_CONTEXTS * cfg.context_len, _CPU_MIN_TOKENS)
            size = min(wanted, int(_available_ram() * _CPU_RAM_SHARE) // per_token)
        if size < 2:
            raise ValueError(
                f"max_total_tokens: not enough memory for a KV pool ({per_token} bytes per token)"
            )
        return min(size, limit)

    # ---------------------------------------------------------------- the step
    def run(self, batch: ScheduleBatch, bitmask_fn: Any = None) -> StepOutput:
        """Compute ``batch`` and sample the requests of its ``sample_mask``: :meth:`launch`
        then :meth:`fetch` (waits for the device)."""
        return self.fetch(self.launch(batch, bitmask_fn))

    @torch.inference_mode()
    def launch(self, batch: ScheduleBatch, bitmask_fn: Any = None, *,
               previous: LaunchedStep | None = None) -> LaunchedStep:
        """Queue ``batch``'s pass, its sampling and the copy of the results to the host.

        ``bitmask_fn(reqs) -> int32 tensor | None`` fills the constraint bitmask of the
        rows about to be sampled; it runs on the host while the device computes the
        forward pass. Prefill-only requests (``max_tokens == 0``) are never sampled. Scoring
        requests (``return_all_logits``) get the raw logprobs of their known tokens (and
        their ``top_logprobs`` alternatives) in ``StepOutput.scored``, and are sampled like
        any other when ``max_tokens > 0``. A request whose sampling cannot be prepared is
        left out of the sampling and reported in ``StepOutput.failed``; the others are
        sampled. ``previous``: the pass still in flight whose sampled ids the placeholders
        of ``batch``'s requests stand for (they are read on the device).
        Mutates nothing but the KV pool; on CUDA never waits for the device (but with
        ``AIOLM_DEBUG_CHECKS=1``, which copies the batch to the host and raises
        :class:`~aiolm.engine.debug_checks.DebugCheckError` before the pass for a bad
        index: see :mod:`aiolm.engine.debug_checks`).
        """
        if self.num_threads is not None and torch.get_num_threads() != self.num_threads:
            torch.set_num_threads(self.num_threads)  # the count is per thread: set it on ours
        reqs = batch.reqs
        fb = self._forward_batch(batch, previous)
        if self.debug_checks:
            check_forward_batch(fb, allocator=self.allocator,
                                req_to_token_pool=self.req_to_token_pool,
                                vocab_size=self.model_config.vocab_size)
        if self.workers is None:
            logits = self.forward(fb)
        else:
            try:
                self.workers.send_step(fb, self.req_to_token_pool.req_to_token)
                logits = self.forward(fb)
            except Exception as exc:
                raise self.workers.lost(exc) from exc
        self.forward_passes += 1

        if fb.return_logits == "all":
            last_rows = [end - 1 for end in itertools.accumulate(batch.extend_lens)]
        else:
            last_rows = list(range(len(reqs)))
        sample_rows = [i for i, r in enumerate(reqs)
                       if batch.sample_mask[i] and r.sampling.max_tokens > 0]
        score_rows = [i for i, r in enumerate(reqs) if r.return_all_logits]

        fetch: list[torch.Tensor] = []
        sample_out = None
        failed: dict[int, Exception] = {}
        if sample_rows:
            info, failed = self._prepare_sampling(reqs, sample_rows)
            sample_rows = [i for i in sample_rows if i not in failed]
        if sample_rows:
            sample_reqs = [reqs[i] for i in sample_rows]
            bitmask = bitmask_fn(sample_reqs) if bitmask_fn is not None else None
            rows = [last_rows[i] for i in sample_rows]
            if len(rows) == logits.shape[0] and rows == list(range(len(rows))):
                chosen = logits   # every row, in order (a decode step): nothing to gather
            else:
                chosen = logits.index_select(0, self._h2d(rows))
            sample_out = self.sampler.sample(chosen, info, bitmask)
            fetch.append(sample_out.next_ids)
            if sample_out.logprobs is not None:
                fetch.append(sample_out.logprobs)
            if sample_out.top_ids is not None:
                fetch += [sample_out.top_ids, sample_out.top_logprobs]
        score_spans = self._score_spans(batch, score_rows)
        score_top = max((reqs[i].sampling.top_logprobs for i, *_ in score_spans), default=0)
        if score_spans:
            rows_t = self._h2d([r for _, a, b, _ in score_spans for r in range(a, b)])
            targets = self._h2d([t for *_, ts in score_spans for t in ts])
            scored = logits.index_select(0, rows_t)[:, : self.model_config.vocab_size]
            fetch += token_logprobs(scored, targets)
            if score_top:
                fetch += top_token_logprobs(scored, score_top)
        host, ready = self._start_copy(fetch)
        return LaunchedStep(batch=batch, sample_rows=sample_rows,
                            next_ids=sample_out.next_ids if sample_out is not None else None,
                            sample_out=sample_out, score_spans=score_spans,
                            score_top=score_top, failed=failed, host=host, ready=ready)

    def forward(self, fb: ForwardBatch) -> torch.Tensor:
        """The model's logits for ``fb``: replayed from a CUDA graph, compiled, or eager."""
        graphs = self.graph_runner
        if graphs is not None:   # each check tests the pass's mode first
            if graphs.can_run(fb):
                return graphs.replay(fb)
            if graphs.can_run_extend(fb):
                return graphs.replay_extend(fb)
        if fb.prefix_groups is not None:
            return self.model(fb)   # eager: the compiled CPU step does not take groups
        if fb.is_decode and self.compiled_decode is not None:
            return self.compiled_decode(fb)
        return self.model(fb)

    def fetch(self, step: LaunchedStep) -> StepOutput:
        """Wait for ``step``'s results to reach the host and unpack them (with workers:
        raises :class:`~aiolm.errors.BackendUnavailable` when one dies meanwhile)."""
        if step.ready is not None and self.workers is not None:
            self.workers.wait_event(step.ready)
        elif step.ready is not None:
            step.ready.synchronize()
        out = self._unpack(step.host, step.sample_rows, step.sample_out, step.score_spans,
                           step.score_top, step.batch)
        out.failed = step.failed
        return out

    def close(self) -> None:
        """Destroy the CUDA graphs and stop the tensor-parallel workers this runner owns;
        idempotent. The engine loop calls it when it ends."""
        self.release_graphs()
        if self.model.attn is self.attn:
            # The model outlives the engine (a LoadedModel opens engine after engine) and
            # would keep this attention alive, and with it what it holds of the last pass:
            # its batch, so the KV pool. The next engine would then size its pool while
            # this one's is still allocated (measured: 31,210 slots instead of 218,904).
            self.model.set_attention(None)
        if self.workers is not None:
            self.workers.close()

    def release_graphs(self) -> None:
        """Destroy the captured CUDA graphs (no pass runs after this). A tensor-parallel
        rank does it before it leaves its NCCL group: the collectives captured in a graph
        hold the communicator's resources until the graph is destroyed, and NCCL's abort
        and destroy waited for them forever (nvidia-h200-x2)."""
        if self.graph_runner is None:
            return
        graphs, self.graph_runner = self.graph_runner, None
        graphs.release()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def queues_behind(self, mode: ForwardMode) -> bool:
        """Whether a pass of ``mode`` may be queued while another is in flight.

        Not on the ``flashinfer`` backend: its decode plans write a wrapper's page-locked
        host buffer that the device copies from asynchronously, so a second plan could
        overwrite the first's before the device read it. ``hybrid``'s extends are planned
        by flashinfer too, but on two prefill wrappers taken in turn
        (``FlashInferAttention.init_forward``): a plan never writes the buffer of the pass
        in flight. ``AIOLM_HYBRID_EXTEND_SETTLES=1`` makes hybrid's extends wait for the
        pass in flight to be processed as they did before (an experiment's knob).
        """
        if self.device.type != "cuda":
            return True
        if self.attention_backend == "hybrid" and mode is ForwardMode.EXTEND:
            return not HYBRID_EXTEND_SETTLES
        return self.attention_backend != "flashinfer"
