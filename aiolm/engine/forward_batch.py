"""What one model forward pass computes: the batch's tokens, positions and KV slots.

Built by the runner from the scheduler's batch; read by the model and the attention
backend. All tensors are on the model's device.

Layout: requests ``0..bs-1``; request ``i`` contributes ``extend_seq_lens[i]`` new tokens
(1 for every request in a decode batch), laid out one request after another in
``input_ids`` / ``positions`` / ``out_cache_loc``. Its first ``extend_prefix_lens[i]``
tokens are already in the KV pool; the slots of its whole sequence are
``req_to_token[req_pool_indices[i], :seq_lens[i]]``.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    import torch

    from ..cache.pool import KVPool, ReqToTokenPool
    from .shared_prefix import PrefixGroups

__all__ = ["ForwardBatch", "ForwardMode"]


class ForwardMode(enum.Enum):
    EXTEND = "extend"  # prefill / chunked prefill / jump-forward: any number of new tokens
    DECODE = "decode"  # exactly one new token per request


@attrs.define(kw_only=True, eq=False)
class ForwardBatch:
    mode: ForwardMode
    batch_size: int
    input_ids: torch.Tensor          # [num_tokens] int64
    positions: torch.Tensor          # [num_tokens] int64
    out_cache_loc: torch.Tensor      # [num_tokens] int64: KV slots the new tokens are written to
    req_pool_indices: torch.Tensor   # [bs] int64: rows of req_to_token
    seq_lens: torch.Tensor           # [bs] int32: sequence length after this pass
    extend_prefix_lens: torch.Tensor | None = None  # [bs] int32 (EXTEND only)
    extend_seq_lens: torch.Tensor | None = None     # [bs] int32 (EXTEND only)
    # Host copies of the lengths (the torch backend and metadata preparation use them;
    # keeping them avoids device->host syncs).
    seq_lens_cpu: list[int] = attrs.field(factory=list)
    extend_prefix_lens_cpu: list[int] = attrs.field(factory=list)
    extend_seq_lens_cpu: list[int] = attrs.field(factory=list)
    # Which logits to return: "last" (one row per request) or "all" (one per new token,
    # for scoring and parity tests).
    return_logits: str = "last"
    kv_pool: KVPool | None = None
    req_to_token_pool: ReqToTokenPool | None = None
    # Multimodal inputs (aiolm/engine/multimodal.py), all None for a text-only pass:
    # ``mm_embeds`` [K, hidden] overwrite the token embeddings of rows ``mm_rows`` [K] int64
    # (their input ids are pad ids >= vocab_size: clamp/mask them before the lookup);
    # ``mrope_positions`` [3, num_tokens] int64 for M-RoPE models (None: ``positions`` on
    # all three sections).
    mm_embeds: torch.Tensor | None = None
    mm_rows: torch.Tensor | None = None
    mrope_positions: torch.Tensor | None = None
    # Host copy, per request, of ``(prompt_len, rope_delta)`` for requests whose positions
    # past the prompt are shifted by ``rope_delta`` (empty: no shift anywhere; the debug
    # checks read it).
    rope_shifts_cpu: list[tuple[int, int]] = attrs.field(factory=list)
    # DECODE only: the requests sharing a cached prefix (:mod:`aiolm.engine.shared_prefix`),
    # whose K/V the attention reads once per group; None: every request reads its own.
    prefix_groups: PrefixGroups | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def is_decode(self) -> bool:
        return self.mode is ForwardMode.DECODE
