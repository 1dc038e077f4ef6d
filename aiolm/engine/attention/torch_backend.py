"""Exact attention in plain torch: the CPU path and the reference for the GPU kernels.

Each layer first writes the new tokens' K/V into the pool, then every query attends over its
request's whole sequence read back through ``req_to_token`` (prefix from the cache + the new
tokens), causally with the prefix offset, with GQA. Scores, softmax and the weighted sum
are in float32. Loops run over host-side lengths only, so nothing waits on the device.

Decode batches are computed in one padded pass (one query per request, padding masked);
extend batches per request through torch's fused attention (no score matrix in memory).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..forward_batch import ForwardBatch
from .base import AttentionBackend

__all__ = ["TorchAttention"]

class TorchAttention(AttentionBackend):
    """Reference attention over the paged KV cache (``batch.kv_pool``)."""

    name = "torch"

    def __init__(self, *, num_q_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 device: torch.device | str) -> None:
        super().__init__(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                         head_dim=head_dim, scale=scale, device=device)
        if num_q_heads % num_kv_heads:
            raise ValueError(
                f"num_kv_heads: {num_kv_heads} does not divide num_q_heads {num_q_heads}"
            )
        self.group = num_q_heads // num_kv_heads
        self._kv_index: torch.Tensor | None = None   # [bs, max_seq_len] slots
        self._kv_valid: torch.Tensor | None = None   # [bs, max_seq_len] bool (decode)
        # Set by the runner when it compiles the CPU decode step: the index tensors' sizes
        # are then marked dynamic, so a new batch size or length reuses the compiled code.
        self.compiled = False

    @torch.compiler.disable
    def init_forward(self, batch: ForwardBatch) -> None:
        """Gather each request's slot row (up to the longest sequence) once for all layers.

        Runs eagerly under ``torch.compile`` (it reads host-side lengths)."""
        bs = batch.batch_size
        if len(batch.seq_lens_cpu) != bs:
            raise RuntimeError("ForwardBatch.seq_lens_cpu must hold one length per request")
        if not batch.is_decode and len(batch.extend_seq_lens_cpu) != bs:
            raise RuntimeError("ForwardBatch.extend_seq_lens_cpu must hold one length per request")
        if batch.kv_pool is None or batch.req_to_token_pool is None:
            raise RuntimeError("ForwardBatch needs kv_pool and req_to_token_pool for attention")
        max_len = max(batch.seq_lens_cpu, default=0)
        rows = batch.req_to_token_pool.req_to_token.index_select(0, batch.req_pool_indices)
        self._kv_index = rows[:, :max_len].long()
        if batch.is_decode:
            positions = torch.arange(max_len, device=rows.device)
            self._kv_valid = positions[None, :] < batch.seq_lens.to(rows.device)[:, None]
            # NOTE: entries past a request's length are stale; point them at padding slot 0.
            self._kv_index.masked_fill_(~self._kv_valid, 0)
        else:
            self._kv_valid = None
        if self.compiled:
            for t in (self._kv_index, self._kv_valid):
                if t is not None:
                    torch._dynamo.maybe_mark_dynamic(t, 0)
                    torch._dynamo.maybe_mark_dynamic(t, 1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                batch: ForwardBatch) -> torch.Tensor:
        """Store ``k``/``v`` at ``batch.out_cache_loc`` of layer ``layer_id``, then attend."""
        pool = batch.kv_pool
        pool.set_kv(layer_id, batch.out_cache_loc, k, v)
        k_buf, v_buf = pool.get_kv(layer_id)
        if batch.is_decode:
            return self._decode(q, k_buf, v_buf)
        return self._extend(q, k_buf, v_buf, batch)

    def _decode(self, q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor) -> torch.Tensor:
        bs = q.shape[0]
        if bs == 1 and not self.compiled and q.device.type == "cpu":
            return self._decode_one(q, k_buf, v_buf)
        valid = self._kv_valid
        keys = k_buf[self._kv_index].float()      # [bs, S, Hkv, D]
        # Padding rows get zero weight; zeroing their values too keeps 0 * NaN out.
        values = v_buf[self._kv_index].float().masked_fill_(~valid[:, :, None, None], 0.0)
        qg = q.float().view(bs, self.num_kv_heads, self.group, self.head_dim)
        scores = torch.einsum("bhgd,bshd->bhgs", qg, keys) * self.scale
        scores.masked_fill_(~valid[:, None, None, :], float("-inf"))
        probs = scores.softmax(dim=-1)
        out = torch.einsum("bhgs,bshd->bhgd", probs, values)
        return out.reshape(bs, self.num_q_heads, self.head_dim).to(q.dtype)

    def _decode_one(self, q: torch.Tensor, k_buf: torch.Tensor,
                    v_buf: torch.Tensor) -> torch.Tensor:
        """``_decode`` for one request on the CPU (eager): its row has no padding, so no
        masks, and two batched matmuls over the kv heads instead of the einsums; the same
        float32 products and softmax, in fewer (per-op overhead bound) operators."""
        slots = self._kv_index[0]
        keys = k_buf.index_select(0, slots).float().permute(1, 2, 0)     # [Hkv, D, S]
        values = v_buf.index_select(0, slots).float().transpose(0, 1)   # [Hkv, S, D]
        qg = q.float().view(self.num_kv_heads, self.group, self.head_dim)
        probs = torch.bmm(qg, keys).mul_(self.scale).softmax(dim=-1)    # [Hkv, group, S]
        out = torch.bmm(probs, values)                                  # [Hkv, group, D]
        return out.view(1, self.num_q_heads, self.head_dim).to(q.dtype)

    def _extend(self, q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor:
        out = torch.empty_like(q)
        start = 0
        for i, (seq_len, ext_len) in enumerate(
            zip(batch.seq_lens_cpu, batch.extend_seq_lens_cpu, strict=True)
        ):
            if ext_len == 0:
                continue
            slots = self._kv_index[i, :seq_len]
            keys = k_buf[slots].float().transpose(0, 1)[None]     # [1, Hkv, S, D]
            values = v_buf[slots].float().transpose(0, 1)[None]
            queries = q[start:start + ext_len].float().transpose(0, 1)[None]  # [1, Hq, E, D]
            out[start:start + ext_len] = self._attend(queries, keys, values, seq_len - ext_len)
            start += ext_len
        return out

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                prefix_len: int) -> torch.Tensor:
        """Queries at positions ``prefix_len ..`` over keys ``0 .. S-1`` (causal, GQA).

        torch's fused attention: on the CPU its flash kernel (tiled, float32 softmax), so
        no score matrix is materialized and no query blocking is needed."""
        rows, seq_len = q.shape[2], keys.shape[2]
        if prefix_len == 0:
            mask, causal = None, True
        else:  # query r (position prefix_len + r) sees keys 0 .. prefix_len + r
            q_pos = torch.arange(prefix_len, prefix_len + rows, device=q.device)
            mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]
            causal = False
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal,
                                           scale=self.scale, enable_gqa=True)
        return o[0].transpose(0, 1)                    # [E, Hq, D]
