"""The ``triton`` attention backend: our own kernels over the token-slot pool.

``init_forward`` prepares what every layer of one pass shares (the extend batch's query
offsets and grid size, or the decode batch's split plan and scratch buffers);
``forward`` stores the new K/V and runs the extend or decode kernel
(:mod:`.triton_kernels`). Decode can be captured in a CUDA graph: the kernels read
lengths and slots from device tensors only, the split count is fixed per captured batch
size, and the scratch buffers are allocated once in ``init_cuda_graph_state``.
"""

from __future__ import annotations

import functools
import weakref

import attrs
import torch

from ..forward_batch import ForwardBatch
from ..shared_prefix import PrefixGroups
from . import triton_kernels as tk
from .base import AttentionBackend, OneTokenTail, split_one_token_tail

__all__ = ["TritonAttention"]

# Most chunks a decode sequence is split into (the scratch buffers' third dimension).
MAX_DECODE_SPLITS = 32
#: The most chunks a shared prefix is split into (shared-prefix decode); a captured graph
#: takes this many and leaves the rest of the MAX_DECODE_SPLITS scratch entries to the
#: requests' own parts.
SHARED_SPLITS = 16


@attrs.frozen(kw_only=True)
class _ExtendMeta:
    q_start: torch.Tensor       # [bs] int32: first row of each request in q
    max_extend_len: int


@attrs.frozen(kw_only=True)
class _DecodeMeta:
    num_splits: int
    mid_o: torch.Tensor         # [>=bs, Hq, MAX_DECODE_SPLITS, D] float32
    mid_lse: torch.Tensor       # [>=bs, Hq, MAX_DECODE_SPLITS] float32
    # Shared-prefix decode: the batch's groups and the splits of their prefixes (the
    # scratch then holds num_splits + num_shared entries a request).
    groups: PrefixGroups | None = None
    num_shared: int = 0


class TritonAttention(AttentionBackend):
    """Extend and decode attention with Triton kernels (bf16 / fp16 / fp32 pools)."""

    name = "triton"
    supports_cuda_graph = True
    supports_extend_graph = True
    supports_shared_prefix = True

    def __init__(self, *, num_q_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 device: torch.device | str) -> None:
        super().__init__(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                         head_dim=head_dim, scale=scale, device=device)
        if num_q_heads % num_kv_heads:
            raise ValueError(
                f"num_kv_heads: {num_kv_heads} does not divide num_q_heads {num_q_heads}"
            )
        self._device = torch.device(device)
        self.cfg = tk.kernel_config(self._device, head_dim)
        self._fp32_cfg = tk.kernel_config(self._device, head_dim, torch.float32)
        # Decode programs a request gets per chunk (one per group of KV heads it reads).
        self._kv_programs = num_kv_heads // tk.decode_heads(self.cfg, num_kv_heads)
        if self._device.type == "cuda":
            props = torch.cuda.get_device_properties(self._device)
            self._num_sms = props.multi_processor_count
        else:
            self._num_sms = 4
        self._meta: _ExtendMeta | _DecodeMeta | None = None
        # An extend pass cut in two (init_forward): the parts and each one's metadata.
        self._split: tuple[OneTokenTail, _ExtendMeta | None, _DecodeMeta] | None = None
        # Decode metadata of the batches being captured, keyed by the (static) batch object:
        # the model calls init_forward inside the captured region, where nothing may change.
        self._graph_meta: weakref.WeakKeyDictionary[ForwardBatch, _DecodeMeta] = (
            weakref.WeakKeyDictionary()
        )
        self._graph_mid_o: torch.Tensor | None = None
        self._graph_mid_lse: torch.Tensor | None = None
        # Captured extend batches: their query offsets are computed inside the graph.
        self._graph_extends: weakref.WeakSet[ForwardBatch] = weakref.WeakSet()

    # ----------------------------------------------------------------- per pass

    def init_forward(self, batch: ForwardBatch) -> None:
        """Compute the per-pass metadata (no device → host synchronisation). An eager
        extend pass ending in requests of one new token each (``split_one_token_tail``)
        gets two: the extend kernel's for its head, the decode kernel's for that tail."""
        self._split = None
        if batch.is_decode:
            meta = self._graph_meta.get(batch)
            self._meta = meta if meta is not None else self._eager_decode_meta(batch)
            return
        if batch.extend_seq_lens is None or batch.extend_prefix_lens is None:
            raise RuntimeError("ForwardBatch: an extend batch needs extend_seq_lens/prefix_lens")
        split = None if batch in self._graph_extends else split_one_token_tail(batch)
        if split is not None:
            head = None if split.head is None else self._extend_meta(split.head)
            self._split = (split, head, self._eager_decode_meta(split.tail))
            self._meta = None
            return
        self._meta = self._extend_meta(batch)

    def _extend_meta(self, batch: ForwardBatch) -> _ExtendMeta:
        if batch.extend_seq_lens_cpu:
            max_extend_len = max(batch.extend_seq_lens_cpu)
        else:
            max_extend_len = int(batch.extend_seq_lens.max().item()) if batch.batch_size else 0
        lens = batch.extend_seq_lens.to(torch.int32)
        q_start = torch.cumsum(lens, 0, dtype=torch.int32) - lens
        return _ExtendMeta(q_start=q_start, max_extend_len=max_extend_len)

    def _eager_decode_meta(self, batch: ForwardBatch) -> _DecodeMeta:
        bs = batch.batch_size

        def plan(n: int, max_len: int | None) -> int:
            return tk.plan_decode_splits(max(n, 1), self._kv_programs, max_len, self._num_sms,
                                         MAX_DECODE_SPLITS, self.cfg.decode_min_chunk)

        groups = batch.prefix_groups
        if groups is None:
            splits, shared = plan(bs, max(batch.seq_lens_cpu, default=None)), 0
            entries = MAX_DECODE_SPLITS   # one scratch width: one compiled merge kernel
        else:
            # Each request's own part (past its shared prefix), and each group's prefix.
            splits = plan(bs, groups.max_suffix)
            shared = tk.plan_shared_splits(groups.count, self.num_kv_heads, groups.max_len,
                                           self._num_sms, SHARED_SPLITS,
                                           self.cfg.decode_min_chunk)
            entries = splits + shared
        mid_o = torch.empty((bs, self.num_q_heads, entries, self.head_dim),
                            dtype=torch.float32, device=self._device)
        mid_lse = torch.empty((bs, self.num_q_heads, entries), dtype=torch.float32,
                              device=self._device)
        return _DecodeMeta(num_splits=splits, mid_o=mid_o, mid_lse=mid_lse, groups=groups,
                           num_shared=shared)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                batch: ForwardBatch) -> torch.Tensor:
        """Store ``k``/``v`` at ``batch.out_cache_loc`` of layer ``layer_id``, then attend."""
        if batch.kv_pool is None or batch.req_to_token_pool is None:
            raise RuntimeError("ForwardBatch needs kv_pool and req_to_token_pool for attention")
        if self._split is not None:
            split, head_meta, tail_meta = self._split
            return split.attend(q, k, v, layer_id, functools.partial(self._attend, meta=head_meta),
                                functools.partial(self._attend, meta=tail_meta))
        return self._attend(q, k, v, layer_id, batch, self._meta)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                batch: ForwardBatch, meta: _ExtendMeta | _DecodeMeta | None) -> torch.Tensor:
        k_buf, v_buf = batch.kv_pool.get_kv(layer_id)
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        tk.store_kv(k, v, k_buf, v_buf, batch.out_cache_loc)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        req_to_token = batch.req_to_token_pool.req_to_token
        cfg = self._fp32_cfg if k_buf.dtype == torch.float32 else self.cfg
        if batch.is_decode:
            if not isinstance(meta, _DecodeMeta):
                raise RuntimeError("TritonAttention.init_forward was not called for this batch")
            if meta.groups is not None:
                g = meta.groups
                tk.decode_attention_shared(
                    q, out, k_buf, v_buf, req_to_token, batch.req_pool_indices,
                    batch.seq_lens, g.prefix_lens, g.rows, g.lens, meta.mid_o, meta.mid_lse,
                    meta.num_splits, meta.num_shared, self.scale, cfg)
            else:
                tk.decode_attention(q, out, k_buf, v_buf, req_to_token,
                                    batch.req_pool_indices, batch.seq_lens, meta.mid_o,
                                    meta.mid_lse, meta.num_splits, self.scale, cfg)
        else:
            if not isinstance(meta, _ExtendMeta):
                raise RuntimeError("TritonAttention.init_forward was not called for this batch")
            tk.extend_attention(q, out, k_buf, v_buf, req_to_token, batch.req_pool_indices,
                                batch.extend_prefix_lens, batch.extend_seq_lens, meta.q_start,
                                meta.max_extend_len, self.scale, cfg)
        return out

    # ----------------------------------------------------------------- CUDA graphs

    def init_cuda_graph_state(self, max_batch_size: int, max_context_len: int) -> None:
        """Allocate the decode scratch once, sized for the largest captured batch."""
        self._graph_mid_o = torch.empty(
            (max_batch_size, self.num_q_heads, MAX_DECODE_SPLITS, self.head_dim),
            dtype=torch.float32, device=self._device)
        self._graph_mid_lse = torch.empty(
            (max_batch_size, self.num_q_heads, MAX_DECODE_SPLITS),
            dtype=torch.float32, device=self._device)

    def init_forward_for_capture(self, batch: ForwardBatch) -> None:
        """Fix the split count for ``batch``'s size (any lengths may follow at replay)."""
        if self._graph_mid_o is None or self._graph_mid_lse is None:
            raise RuntimeError("call init_cuda_graph_state before capturing")
        if not batch.is_decode:
            # An extend pass: init_forward, inside the captured region, computes the query
            # offsets from the static lengths on the device; the grid is sized by the
            # batch's host lengths (their longest: the bound on any request's new tokens).
            self._graph_extends.add(batch)
            return
        splits = tk.plan_decode_splits(batch.batch_size, self._kv_programs, None,
                                       self._num_sms, MAX_DECODE_SPLITS,
                                       self.cfg.decode_min_chunk)
        groups, shared = batch.prefix_groups, 0
        if groups is not None:
            # Any prefixes may follow at replay: the most splits for them (chunks past a
            # shorter prefix return at once); the requests' own parts share the scratch.
            shared = tk.plan_shared_splits(groups.count, self.num_kv_heads, None,
                                           self._num_sms, SHARED_SPLITS,
                                           self.cfg.decode_min_chunk)
            splits = min(splits, MAX_DECODE_SPLITS - shared)
        self._graph_meta[batch] = _DecodeMeta(num_splits=splits, mid_o=self._graph_mid_o,
                                              mid_lse=self._graph_mid_lse, groups=groups,
                                              num_shared=shared)

    def captured_extend(self, batch: ForwardBatch) -> bool:
        """Whether ``batch`` is an extend batch captured in a CUDA graph."""
        return batch in self._graph_extends

    def init_forward_for_replay(self, batch: ForwardBatch) -> None:
        """Nothing to update: the captured kernels read lengths from the static buffers."""
        if batch not in self._graph_meta and batch not in self._graph_extends:
            raise RuntimeError("batch was not captured (init_forward_for_capture)")
