"""The ``hybrid`` attention backend: flashinfer for extend passes, our Triton kernels for
decode passes, over the same KV pool.

On the first GPU run (Llama-3-8B shape, H100) flashinfer's prefill was faster than our
extend kernel (prefill, few-shot) while our decode kernel, captured in CUDA graphs, was
faster at decode and throughput. Both read the pool through the same slot table, so each
pass can simply go to the better one: ``init_forward`` picks the backend by the batch's
mode and forwards to it; the CUDA-graph hooks (decode passes, and the small extends
the graph runner captures) are Triton's. An extend pass that ends in requests computing one
token each (decode steps riding along, see ``split_one_token_tail``) is cut in two: its
prompts go to flashinfer, those requests to Triton's decode kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import AttentionBackend, OneTokenTail, split_one_token_tail
from .flashinfer import FlashInferAttention
from .triton import TritonAttention

if TYPE_CHECKING:
    import torch

    from ..forward_batch import ForwardBatch

__all__ = ["HybridAttention"]


class HybridAttention(AttentionBackend):
    """flashinfer's paged prefill for EXTEND, Triton decode (and its CUDA graphs) for DECODE.

    Needs what both need: CUDA and the flashinfer package (constructing it without
    flashinfer raises ImportError saying how to get it).
    """

    name = "hybrid"
    supports_cuda_graph = True
    supports_extend_graph = True    # captured extends are Triton's
    supports_shared_prefix = True   # decode is Triton's

    def __init__(self, *, num_q_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 device: torch.device | str) -> None:
        super().__init__(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                         head_dim=head_dim, scale=scale, device=device)
        geometry = dict(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                        head_dim=head_dim, scale=scale, device=device)
        self.extend_backend = FlashInferAttention(**geometry)
        self.decode_backend = TritonAttention(**geometry)
        self._active: AttentionBackend | None = None
        self._split: OneTokenTail | None = None

    def max_kv_slots(self, num_kv_heads: int, head_dim: int) -> int:
        """The tighter of the two backends' limits (flashinfer's 32-bit offsets)."""
        return min(self.extend_backend.max_kv_slots(num_kv_heads, head_dim),
                   self.decode_backend.max_kv_slots(num_kv_heads, head_dim))

    def init_forward(self, batch: ForwardBatch) -> None:
        """Prepare the pass on the backend that runs it (flashinfer plans, Triton splits)."""
        # Extends captured in CUDA graphs are Triton's too (flashinfer plans on the host).
        triton = batch.is_decode or self.decode_backend.captured_extend(batch)
        self._split = None if triton else split_one_token_tail(batch)
        if self._split is not None:
            if self._split.head is not None:
                self.extend_backend.init_forward(self._split.head)
            self.decode_backend.init_forward(self._split.tail)
            self._active = self.decode_backend
            return
        self._active = self.decode_backend if triton else self.extend_backend
        self._active.init_forward(batch)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                batch: ForwardBatch) -> torch.Tensor:
        """Store ``k``/``v`` at ``batch.out_cache_loc`` of layer ``layer_id``, then attend."""
        if self._active is None:
            raise RuntimeError("HybridAttention.init_forward was not called for this batch")
        if self._split is None:
            return self._active.forward(q, k, v, layer_id, batch)
        return self._split.attend(q, k, v, layer_id, self.extend_backend.forward,
                                  self.decode_backend.forward)

    # CUDA graphs capture decode passes and small extends: both are Triton's.
    def init_cuda_graph_state(self, max_batch_size: int, max_context_len: int) -> None:
        """Triton's decode scratch for the largest captured batch."""
        self.decode_backend.init_cuda_graph_state(max_batch_size, max_context_len)

    def init_forward_for_capture(self, batch: ForwardBatch) -> None:
        """Fix Triton's decode split count for ``batch``'s size (an extend batch: Triton's
        extend kernel, which reads its lengths on the device, takes it)."""
        self.decode_backend.init_forward_for_capture(batch)

    def init_forward_for_replay(self, batch: ForwardBatch) -> None:
        """Nothing to re-plan: Triton's captured kernels read the static buffers."""
        self.decode_backend.init_forward_for_replay(batch)
