"""The ``flashinfer`` attention backend: flashinfer's paged kernels with page size 1.

Our pool is token-granular, so each slot is one flashinfer page: the K/V buffers
``[size + 1, heads, dim]`` are viewed as ``[num_pages, page_size=1, heads, dim]`` (NHD),
every request's page list is its ``req_to_token`` row (gathered on the device by
:func:`.triton_kernels.fill_kv_indices`), and every last page holds one token.

Decode uses ``BatchDecodeWithPagedKVCacheWrapper``, extend
``BatchPrefillWithPagedKVCacheWrapper`` (causal, aligned to the end of each sequence, so
the new tokens see their cached prefix and each other causally). ``plan`` runs once per
pass in ``init_forward`` from host-side lengths; ``forward`` stores the new K/V (our Triton
store kernel) and runs the planned kernel. CUDA graphs: one decode wrapper per captured
batch size over fixed index buffers, re-planned before each replay.

flashinfer is imported lazily; without it, constructing this backend raises ImportError
saying how to get it. It compiles its kernels just in time on first use (about a minute
on a fresh machine).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from ..forward_batch import ForwardBatch
from . import triton_kernels as tk
from .base import AttentionBackend

__all__ = ["FlashInferAttention", "flashinfer_available"]

_WORKSPACE_BYTES = 128 * 1024 * 1024
# NOTE: flashinfer's SM90 (Hopper) paged prefill gathers the page indices of a request's
# whole last KV tile before it masks the loads past the sequence (BlockSparseIndexedGather:
# "the user's responsibility to ensure that indptr[-2] + TILE_KV is less than the size of
# the indices tensor"). With an indices tensor of exactly ``indptr[-1]`` entries the last
# request's tile reads up to TILE_KV - 1 entries past its end: an illegal address whenever
# the caching allocator placed the tensor at the end of a mapped segment (aiolm bench
# select → tree-of-thought with the radix cache off, on an H200). So the page list carries
# this many extra entries (the largest TILE_KV of the SM90 kernels is 96, the decode
# kernels' smaller), all slot 0: the padding row, which holds zeros, never a stray address.
KV_INDICES_PAD = 256
# Devices the kernels run on (tests with a CPU stand-in for flashinfer widen it).
_DEVICE_TYPES = ("cuda",)


def _import_flashinfer() -> Any:
    try:
        import flashinfer
    except ImportError as exc:
        raise ImportError(
            "attention_backend='flashinfer' needs the flashinfer package "
            "(pip install flashinfer-python==0.5.3; on a machine without network, carry its "
            "wheel and apache-tvm-ffi's: scripts/gpu_wheels.sh). Or use attention_backend="
            "'triton'."
        ) from exc
    return flashinfer


def flashinfer_available() -> bool:
    """Whether flashinfer imports and a CUDA device is present."""
    if not torch.cuda.is_available():
        return False
    try:
        _import_flashinfer()
    except ImportError:
        return False
    return True


class FlashInferAttention(AttentionBackend):
    """Attention through flashinfer's paged decode/prefill wrappers (CUDA, bf16 / fp16)."""

    name = "flashinfer"
    supports_cuda_graph = True

    def __init__(self, *, num_q_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 device: torch.device | str) -> None:
        super().__init__(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                         head_dim=head_dim, scale=scale, device=device)
        self._fi = _import_flashinfer()
        self._device = torch.device(device)
        if self._device.type not in _DEVICE_TYPES:
            raise ValueError(f"device: flashinfer attention runs on CUDA only, got {device!r}")
        if num_q_heads % num_kv_heads:
            raise ValueError(
                f"num_kv_heads: {num_kv_heads} does not divide num_q_heads {num_q_heads}"
            )
        self._workspace = torch.zeros(_WORKSPACE_BYTES, dtype=torch.uint8, device=self._device)
        self._decode = self._fi.BatchDecodeWithPagedKVCacheWrapper(self._workspace, "NHD")
        # NOTE: two prefill wrappers, planned in turn. A plan writes its wrapper's
        # page-locked host buffer and queues a copy of it to the device; with the engine's
        # overlapped loop the next extend is planned while the pass before it may not have
        # reached that copy yet, so it must plan into the other wrapper's buffer (two
        # suffice: the loop has at most one pass in flight, and the one before it is done).
        # They share the float workspace: their kernels run one after the other.
        self._prefills = tuple(self._fi.BatchPrefillWithPagedKVCacheWrapper(self._workspace, "NHD")
                               for _ in range(2))
        self._prefill_turn = 0
        self._active: Any = None
        # CUDA-graph state: fixed index buffers and one decode wrapper per captured batch.
        self._graph_wrappers: weakref.WeakKeyDictionary[ForwardBatch, Any] = (
            weakref.WeakKeyDictionary()
        )
        self._graph_indptr: torch.Tensor | None = None
        self._graph_indices: torch.Tensor | None = None
        self._graph_last_page: torch.Tensor | None = None

    def max_kv_slots(self, num_kv_heads: int, head_dim: int) -> int:
        """Rows of one layer's K buffer the kernels address: fewer than ``2**32`` elements.

        NOTE: flashinfer's SM90 paged prefill multiplies a page index by the page stride in
        32-bit unsigned arithmetic (``CustomStride`` in its block-sparse gather), so a K
        buffer of ``2**32`` elements or more wraps to a wrong address. A ~140 GB card gives a
        model with few layers a pool that large (two layers, 2 x 128 KV elements a token:
        about 60 million slots) unless the pool is capped here.
        """
        return min(super().max_kv_slots(num_kv_heads, head_dim),
                   (2**32 - 1) // (num_kv_heads * head_dim) - 1)

    # ----------------------------------------------------------------- metadata

    def _kv_indices(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(indptr on the host, page indices on the device) for ``batch``'s sequences.

        The indices end with ``KV_INDICES_PAD`` entries of slot 0 that no sequence owns, so
        a kernel that reads a whole tile of page indices stays inside the tensor.
        """
        if batch.req_to_token_pool is None:
            raise RuntimeError("ForwardBatch needs req_to_token_pool for attention")
        if len(batch.seq_lens_cpu) != batch.batch_size:
            raise RuntimeError("ForwardBatch.seq_lens_cpu must hold one length per request")
        indptr = torch.zeros(batch.batch_size + 1, dtype=torch.int32)
        indptr[1:] = torch.tensor(batch.seq_lens_cpu, dtype=torch.int32).cumsum(0)
        total = int(indptr[-1])
        indices = torch.empty(total + KV_INDICES_PAD, dtype=torch.int32, device=self._device)
        indices[total:].zero_()
        tk.fill_kv_indices(batch.req_to_token_pool.req_to_token, batch.req_pool_indices,
                           batch.seq_lens, indptr.to(self._device, non_blocking=True), indices)
        return indptr, indices

    def _dtype(self, batch: ForwardBatch) -> torch.dtype:
        if batch.kv_pool is None:
            raise RuntimeError("ForwardBatch needs kv_pool for attention")
        return batch.kv_pool.dtype

    def _plan_decode(self, wrapper: Any, batch: ForwardBatch) -> None:
        indptr, indices = self._kv_indices(batch)
        dtype = self._dtype(batch)
        wrapper.plan(indptr, indices, torch.ones(batch.batch_size, dtype=torch.int32),
                     self.num_q_heads, self.num_kv_heads, self.head_dim, 1,
                     q_data_type=dtype, kv_data_type=dtype, sm_scale=self.scale)

    def init_forward(self, batch: ForwardBatch) -> None:
        """Plan the pass's kernels from the host-side lengths (shared by all layers)."""
        if batch.is_decode:
            wrapper = self._graph_wrappers.get(batch)
            if wrapper is None:
                wrapper = self._decode
                self._plan_decode(wrapper, batch)
            self._active = wrapper
            return
        if len(batch.extend_seq_lens_cpu) != batch.batch_size:
            raise RuntimeError("ForwardBatch.extend_seq_lens_cpu must hold one length per request")
        qo_indptr = torch.zeros(batch.batch_size + 1, dtype=torch.int32)
        qo_indptr[1:] = torch.tensor(batch.extend_seq_lens_cpu, dtype=torch.int32).cumsum(0)
        indptr, indices = self._kv_indices(batch)
        dtype = self._dtype(batch)
        wrapper = self._prefills[self._prefill_turn]
        self._prefill_turn ^= 1
        wrapper.plan(qo_indptr, indptr, indices, torch.ones(batch.batch_size, dtype=torch.int32),
                     self.num_q_heads, self.num_kv_heads, self.head_dim, 1, causal=True,
                     sm_scale=self.scale, q_data_type=dtype, kv_data_type=dtype)
        self._active = wrapper

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                batch: ForwardBatch) -> torch.Tensor:
        """Store ``k``/``v`` at ``batch.out_cache_loc`` of layer ``layer_id``, then attend."""
        if self._active is None:
            raise RuntimeError("FlashInferAttention.init_forward was not called for this batch")
        k_buf, v_buf = batch.kv_pool.get_kv(layer_id)
        k = k if k.stride(-1) == 1 else k.contiguous()
        v = v if v.stride(-1) == 1 else v.contiguous()
        tk.store_kv(k, v, k_buf, v_buf, batch.out_cache_loc)
        pages = (k_buf.view(-1, 1, self.num_kv_heads, self.head_dim),
                 v_buf.view(-1, 1, self.num_kv_heads, self.head_dim))
        return self._active.run(q.contiguous(), pages)

    # ----------------------------------------------------------------- CUDA graphs

    def init_cuda_graph_state(self, max_batch_size: int, max_context_len: int) -> None:
        """Allocate the fixed page-table buffers every captured decode wrapper reads."""
        self._graph_indptr = torch.zeros(max_batch_size + 1, dtype=torch.int32,
                                         device=self._device)
        self._graph_indices = torch.zeros(max_batch_size * max_context_len + KV_INDICES_PAD,
                                          dtype=torch.int32, device=self._device)
        self._graph_last_page = torch.ones(max_batch_size, dtype=torch.int32,
                                           device=self._device)

    def init_forward_for_capture(self, batch: ForwardBatch) -> None:
        """Make and plan a graph-mode decode wrapper for ``batch``'s size."""
        if self._graph_indptr is None:
            raise RuntimeError("call init_cuda_graph_state before capturing")
        if not batch.is_decode:
            raise ValueError("batch: only decode batches are captured")
        bs = batch.batch_size
        wrapper = self._fi.BatchDecodeWithPagedKVCacheWrapper(
            self._workspace, "NHD", use_cuda_graph=True,
            paged_kv_indptr_buffer=self._graph_indptr[:bs + 1],
            paged_kv_indices_buffer=self._graph_indices,
            paged_kv_last_page_len_buffer=self._graph_last_page[:bs],
        )
        self._plan_decode(wrapper, batch)
        self._graph_wrappers[batch] = wrapper

    def init_forward_for_replay(self, batch: ForwardBatch) -> None:
        """Re-plan ``batch``'s wrapper for its new lengths (copies into the fixed buffers)."""
        wrapper = self._graph_wrappers.get(batch)
        if wrapper is None:
            raise RuntimeError("batch was not captured (init_forward_for_capture)")
        self._plan_decode(wrapper, batch)
