"""CUDA graphs for decode: capture one forward pass per batch-size bucket, replay it.

A decode step launches a few hundred small kernels; replaying a captured graph removes the
launch gaps between them. :class:`CudaGraphRunner` captures the model's decode forward once
per bucket (1, 2, 4, 8, 16, 24, 32, then every 16 up to ``max_running_requests``), largest
first, all in one shared memory pool. The captured graphs read their inputs from static
buffers; :meth:`CudaGraphRunner.replay` copies a batch into them, pads it to the bucket
(padding rows write their K/V to the reserved slot 0 and see a sequence of length 1), lets
the attention backend update its own buffers (``init_forward_for_replay``), replays, and
returns the logits of the real rows. Sampling stays outside the graph, on the device.
Every copy into the static buffers is device to device and queued on the stream, so a batch
whose input ids the overlapped loop took from the previous step's sampled ids (on the
device, not yet known to the host) replays like any other, after that step.

Shared-prefix decode (``shared_prefix_min_tokens``, :mod:`aiolm.engine.shared_prefix`):
every bucket of two or more requests is captured a second time with static group buffers
(each request's shared length, each group's members and length; at most one group for two
requests). A batch with groups replays that graph: its groups are copied in, the unused
groups are emptied (length 0: their programs return at once) and the requests in no group
get a shared length of 0.

Small extend passes (``extend_graph_tokens``, default 512): an extend pass is captured once
per token bucket (32, 64, 128, ... up to the limit), for as many requests as the bucket has
tokens (at most ``max_running_requests``). The passes jump-forward makes — a few forced
tokens for some requests, one token for each decode request riding along — launch as many
kernels as a decode step and, eager, cost the host several times the device's time. A
batch replays the smallest bucket its tokens fit when it has no images and wants the last
logits only, and no request brings more than :data:`EXTEND_GRAPH_MAX_NEW` tokens (the
captured grid's bound). Padding tokens write their K/V to slot 0 and belong to no request;
padding requests have no new tokens (their attention programs return at once) and their
logits rows are dropped. Attention is Triton's extend kernel (the hybrid backend's
flashinfer plans on the host, which a graph cannot replay). Not under tensor parallelism.

Tensor parallelism: every rank builds its own runner, which captures the same buckets in
the same order, so the warm-up passes' collectives pair up and the all-reduces and the
all-gather of the sharded layers are captured inside the graphs (NCCL supports capture);
every rank then replays the same bucket for a pass. Capture is then thread-local: NCCL's
watchdog thread queries events while the engine captures, which a process-wide capture
would forbid.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Any

import torch

from .forward_batch import ForwardBatch, ForwardMode
from .shared_prefix import PrefixGroups

if TYPE_CHECKING:
    from .runner import ModelRunner

__all__ = ["EXTEND_GRAPH_MAX_NEW", "CudaGraphRunner", "extend_token_buckets", "graph_batch_sizes"]

#: The most new tokens one request may bring to an extend pass replayed from a graph.
EXTEND_GRAPH_MAX_NEW = 64


def extend_token_buckets(max_tokens: int) -> list[int]:
    """The token counts extend passes are captured at: 32, 64, 128, ... (doubling) up to
    and including ``max_tokens`` (none when it is below 32)."""
    sizes = []
    size = 32
    while size < max_tokens:
        sizes.append(size)
        size *= 2
    if max_tokens >= 32:
        sizes.append(max_tokens)
    return sizes


def _place(buffer: torch.Tensor, values: torch.Tensor, end: int, pad: int = 0) -> None:
    """A replay's inputs into a graph's static ``buffer``: ``values`` in its first rows, and
    ``pad`` in the rows after them up to ``end`` (the captured size)."""
    n = values.shape[0]
    buffer[:n].copy_(values)
    if end > n:
        buffer[n:end].fill_(pad)


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """The captured batch sizes: 1, 2, 4, 8, 16, 24, 32, 48, 64, ... up to and including
    ``max_batch_size``."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size: must be >= 1, got {max_batch_size}")
    sizes = [1, 2, 4, 8, 16, 24, 32, *range(48, max_batch_size + 1, 16)]
    sizes = [s for s in sizes if s < max_batch_size]
    return [*sizes, max_batch_size]


class CudaGraphRunner:
    """Decode forward passes replayed from CUDA graphs (one per batch-size bucket).

    Built by the :class:`~aiolm.engine.runner.ModelRunner` when ``cuda_graphs=True`` on
    CUDA with a backend that supports graphs; captures every bucket at construction.
    """

    def __init__(self, runner: ModelRunner, *, max_batch_size: int | None = None) -> None:
        self.model = runner.model
        self.attn = runner.attn
        self.kv_pool = runner.kv_pool
        self.req_to_token_pool = runner.req_to_token_pool
        self.device = runner.device
        self.max_batch_size = max_batch_size or runner.max_running_requests
        self.context_len = runner.context_len
        self.batch_sizes = graph_batch_sizes(self.max_batch_size)
        n = self.max_batch_size
        dev = self.device
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.out_cache_loc = torch.zeros(n, dtype=torch.int64, device=dev)
        self.req_pool_indices = torch.zeros(n, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        # Shared-prefix decode: each request's shared length, each group's members and
        # length (a group has two members at least: n // 2 groups at most).
        self.members = runner.shared_prefix_members if runner.shared_prefix_min_tokens else 0
        self.prefix_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.group_rows = torch.full((max(1, n // 2), max(1, self.members)), -1,
                                     dtype=torch.int32, device=dev)
        self.group_lens = torch.zeros(max(1, n // 2), dtype=torch.int32, device=dev)
        # Keyed by (bucket, grouped).
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.batches: dict[tuple[int, bool], ForwardBatch] = {}
        self.outputs: dict[tuple[int, bool], torch.Tensor] = {}
        tp = runner.tp
        self.capture_error_mode = ("thread_local" if tp is not None and tp.size > 1
                                   else "global")
        # Small extend passes, keyed by their token bucket (its batch: as many requests).
        single = tp is None or tp.size == 1
        wanted = runner.config.extend_graph_tokens if single else 0
        self.extend_buckets = (extend_token_buckets(wanted)
                               if self.attn.supports_extend_graph else [])
        tokens = self.extend_buckets[-1] if self.extend_buckets else 1
        reqs = min(tokens, n)
        self.ext_input_ids = torch.zeros(tokens, dtype=torch.int64, device=dev)
        self.ext_positions = torch.zeros(tokens, dtype=torch.int64, device=dev)
        self.ext_out_cache_loc = torch.zeros(tokens, dtype=torch.int64, device=dev)
        self.ext_req_pool_indices = torch.zeros(reqs, dtype=torch.int64, device=dev)
        self.ext_seq_lens = torch.ones(reqs, dtype=torch.int32, device=dev)
        self.ext_prefix_lens = torch.zeros(reqs, dtype=torch.int32, device=dev)
        self.ext_lens = torch.zeros(reqs, dtype=torch.int32, device=dev)
        self.extend_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.extend_batches: dict[int, ForwardBatch] = {}
        self.extend_outputs: dict[int, torch.Tensor] = {}
        self.extend_replays = 0
        self.attn.init_cuda_graph_state(n, runner.context_len)
        self._capture_all()

    def _static_batch(self, bs: int, grouped: bool) -> ForwardBatch:
        groups = None
        if grouped:
            g = bs // 2
            groups = PrefixGroups(prefix_lens=self.prefix_lens[:bs], rows=self.group_rows[:g],
                                  lens=self.group_lens[:g], max_len=0, max_suffix=0)
        return ForwardBatch(
            mode=ForwardMode.DECODE, batch_size=bs,
            input_ids=self.input_ids[:bs], positions=self.positions[:bs],
            out_cache_loc=self.out_cache_loc[:bs], req_pool_indices=self.req_pool_indices[:bs],
            seq_lens=self.seq_lens[:bs], seq_lens_cpu=[1] * bs,
            kv_pool=self.kv_pool, req_to_token_pool=self.req_to_token_pool,
            prefix_groups=groups,
        )

    def _extend_batch(self, tokens: int, first: int) -> ForwardBatch:
        """The static batch of the ``tokens`` bucket: as many requests (fewer when
        ``max_running_requests`` is lower). For the warm-up and the capture the buffers say
        that request 0 brings ``first`` tokens at position 0 of row 0 and the others none;
        the host lengths size the grid for :data:`EXTEND_GRAPH_MAX_NEW` new tokens."""
        bs = min(tokens, self.max_batch_size)
        return ForwardBatch(
            mode=ForwardMode.EXTEND, batch_size=bs,
            input_ids=self.ext_input_ids[:tokens], positions=self.ext_positions[:tokens],
            out_cache_loc=self.ext_out_cache_loc[:tokens],
            req_pool_indices=self.ext_req_pool_indices[:bs], seq_lens=self.ext_seq_lens[:bs],
            extend_prefix_lens=self.ext_prefix_lens[:bs], extend_seq_lens=self.ext_lens[:bs],
            seq_lens_cpu=[first] + [1] * (bs - 1), extend_prefix_lens_cpu=[0] * bs,
            extend_seq_lens_cpu=[EXTEND_GRAPH_MAX_NEW] + [0] * (bs - 1),
            kv_pool=self.kv_pool, req_to_token_pool=self.req_to_token_pool,
        )

    def _variants(self) -> list[tuple[int, bool]]:
        """What is captured, largest first (the pool fits all later ones)."""
        out = []
        for bs in reversed(self.batch_sizes):
            out.append((bs, False))
            if self.members and bs >= 2:
                out.append((bs, True))
        return out

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool: Any = None
        stream = torch.cuda.Stream(self.device)
        captures: list[tuple[str, Any, ForwardBatch]] = []
        if self.extend_buckets:
            # Every bucket's warm-up: request 0 brings the smallest bucket's tokens (within
            # row 0's slots), the others none.
            first = min(self.extend_buckets[0], EXTEND_GRAPH_MAX_NEW, self.context_len)
            self.ext_lens.zero_()
            self.ext_lens[0] = first
            self.ext_seq_lens.fill_(1)
            self.ext_seq_lens[0] = first
            # The largest first: its activations are the largest, the pool fits the rest.
            captures = [("extend", tokens, self._extend_batch(tokens, first))
                        for tokens in reversed(self.extend_buckets)]
        captures += [("decode", key, self._static_batch(*key)) for key in self._variants()]
        for kind, key, batch in captures:
            self.attn.init_forward_for_capture(batch)
            # Warm up on the capture stream: Triton/flashinfer compile, cuBLAS picks kernels.
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.model(batch)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream,
                                  capture_error_mode=self.capture_error_mode):
                out = self.model(batch)
            if pool is None:
                pool = graph.pool()
            if kind == "extend":
                self.extend_graphs[key] = graph
                self.extend_batches[key] = batch
                self.extend_outputs[key] = out
            else:
                self.graphs[key] = graph
                self.batches[key] = batch
                self.outputs[key] = out
        torch.cuda.synchronize(self.device)

    def release(self) -> None:
        """Destroy every captured graph (decode and extend); no replay after this."""
        for graph in (*self.graphs.values(), *self.extend_graphs.values()):
            graph.reset()
        self.graphs.clear()
        self.extend_graphs.clear()

    def can_run(self, batch: ForwardBatch) -> bool:
        """Whether ``batch`` is a decode batch no larger than the largest bucket (with
        shared-prefix groups: only if they were captured, at the captured width)."""
        if not batch.is_decode:
            return False
        groups = batch.prefix_groups
        if groups is not None and (not self.members or groups.rows.shape[1] != self.members):
            return False
        return 0 < batch.batch_size <= self.max_batch_size and batch.return_logits == "last"

    def can_run_extend(self, batch: ForwardBatch) -> bool:
        """Whether ``batch`` is an extend pass a captured bucket takes: text only, the last
        logits, its tokens within the largest bucket, no request over
        :data:`EXTEND_GRAPH_MAX_NEW` new tokens."""
        if not self.extend_buckets or batch.is_decode or batch.return_logits != "last":
            return False
        if (batch.mm_embeds is not None or batch.mrope_positions is not None
                or batch.prefix_groups is not None):
            return False
        tokens = batch.num_tokens
        return (0 < tokens <= self.extend_buckets[-1]
                and batch.batch_size <= min(tokens, self.max_batch_size)
                and max(batch.extend_seq_lens_cpu) <= EXTEND_GRAPH_MAX_NEW)

    def replay_extend(self, batch: ForwardBatch) -> torch.Tensor:
        """Run the extend ``batch`` through its token bucket's graph; returns the logits of
        its requests' last tokens ``[bs, vocab]``."""
        tokens, bs = batch.num_tokens, batch.batch_size
        padded = self.extend_buckets[bisect.bisect_left(self.extend_buckets, tokens)]
        static = self.extend_batches[padded]
        reqs = static.batch_size
        if batch.extend_seq_lens is None or batch.extend_prefix_lens is None:
            raise RuntimeError("ForwardBatch: an extend batch needs extend_seq_lens/prefix_lens")
        # Padding tokens: token 0 at position 0, K/V to slot 0, in no request.
        _place(self.ext_input_ids, batch.input_ids, padded)
        _place(self.ext_positions, batch.positions, padded)
        _place(self.ext_out_cache_loc, batch.out_cache_loc, padded)
        # Padding requests: no new tokens (their logits rows are dropped).
        _place(self.ext_req_pool_indices, batch.req_pool_indices, reqs)
        _place(self.ext_seq_lens, batch.seq_lens, reqs, pad=1)
        _place(self.ext_prefix_lens, batch.extend_prefix_lens, reqs)
        _place(self.ext_lens, batch.extend_seq_lens, reqs)
        self.attn.init_forward_for_replay(static)
        self.extend_graphs[padded].replay()
        self.extend_replays += 1
        return self.extend_outputs[padded][:bs]

    def bucket(self, batch_size: int) -> int:
        """The captured batch size ``batch_size`` is padded to."""
        return self.batch_sizes[bisect.bisect_left(self.batch_sizes, batch_size)]

    def replay(self, batch: ForwardBatch) -> torch.Tensor:
        """Run ``batch`` through its bucket's graph; returns logits ``[bs, vocab]``."""
        bs = batch.batch_size
        padded = self.bucket(bs)
        # Padding rows: token 0 at position 0, K/V to slot 0, a sequence of one token.
        _place(self.input_ids, batch.input_ids, padded)
        _place(self.positions, batch.positions, padded)
        _place(self.out_cache_loc, batch.out_cache_loc, padded)
        _place(self.req_pool_indices, batch.req_pool_indices, padded)
        _place(self.seq_lens, batch.seq_lens, padded, pad=1)
        groups = batch.prefix_groups
        if groups is not None:
            # Padding rows share nothing; unused groups are empty (no members, length 0).
            cap = padded // 2
            _place(self.prefix_lens, groups.prefix_lens, padded)
            _place(self.group_rows, groups.rows, cap, pad=-1)
            _place(self.group_lens, groups.lens, cap)
        key = (padded, groups is not None)
        static = self.batches[key]
        static.seq_lens_cpu = [*batch.seq_lens_cpu, *([1] * (padded - bs))]
        self.attn.init_forward_for_replay(static)
        self.graphs[key].replay()
        return self.outputs[key][:bs]
