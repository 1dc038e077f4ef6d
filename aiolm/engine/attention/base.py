"""The attention-backend interface and its registry.

A backend stores the new tokens' K/V into the pool and computes attention of the new
queries over each request's whole sequence (prefix from the pool + new tokens, causal).
``init_forward`` runs once per forward pass (metadata shared by all layers);
``forward`` once per layer. Backends that support CUDA graphs implement the capture hooks.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs

from ..forward_batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    import torch

__all__ = ["AttentionBackend", "OneTokenTail", "available", "create", "register",
           "split_one_token_tail"]

#: The fewest one-token requests at the end of an extend pass that go to the decode kernel
#: (see ``split_one_token_tail``): below it, the extra launches cost more than they save.
#: ``AIOLM_MIN_ONE_TOKEN_TAIL=N`` overrides it (an experiment's knob: a huge N is the
#: ablation).
MIN_ONE_TOKEN_TAIL = int(os.environ.get("AIOLM_MIN_ONE_TOKEN_TAIL", "8"))


@attrs.frozen
class OneTokenTail:
    """An extend pass cut in two (``split_one_token_tail``): ``head`` (an EXTEND batch of
    the first requests, their ``head_tokens`` new tokens; None when every request has one
    new token) and ``tail`` (a DECODE batch of the rest, one new token each)."""

    head: ForwardBatch | None
    tail: ForwardBatch
    head_tokens: int

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
               head: Callable[..., torch.Tensor],
               tail: Callable[..., torch.Tensor]) -> torch.Tensor:
        """The pass's attention output: ``tail(q, k, v, layer_id, batch)`` of the tail's
        rows and ``head(...)`` of the head's (a backend's ``forward``: each stores its own
        K/V), in order."""
        import torch

        t = self.head_tokens
        out = tail(q[t:], k[t:], v[t:], layer_id, self.tail)
        if self.head is None:
            return out
        return torch.cat((head(q[:t], k[:t], v[:t], layer_id, self.head), out))


def split_one_token_tail(batch: ForwardBatch,
                         min_tail: int = MIN_ONE_TOKEN_TAIL) -> OneTokenTail | None:
    """Cut off the run of requests at the end of extend ``batch`` that compute one new
    token each (decode steps riding along in a mixed pass, one-token jump-forwards) as a
    DECODE batch, when it has at least ``min_tail`` requests; else None.

    Such a request's one query, at the end of its sequence, attends to the whole sequence:
    exactly a decode step, which the decode kernel computes several times faster than a
    prefill kernel laid out for query blocks (measured on nvidia-h200: flashinfer's paged
    prefill spent ~3 us a layer on each such request in the throughput workload's mixed
    passes). The parts are views (the tail's three index tensors are copied): no host
    synchronisation.
    """
    lens = batch.extend_seq_lens_cpu
    bs = batch.batch_size
    if batch.is_decode or len(lens) != bs:
        return None
    first = bs
    while first > 0 and lens[first - 1] == 1:
        first -= 1
    if bs - first < min_tail:
        return None
    head_tokens = sum(lens[:first])
    # NOTE: the tail's index tensors are copies, not views: Triton specializes a kernel on
    # whether each pointer is 16-byte aligned, and a view at an arbitrary offset would
    # compile new variants of the decode kernels in the middle of a run.
    tail = _rows(batch, slice(head_tokens, None), slice(first, None), copy=True,
                 mode=ForwardMode.DECODE, extend_prefix_lens=None, extend_seq_lens=None,
                 extend_prefix_lens_cpu=[], extend_seq_lens_cpu=[], prefix_groups=None)
    head = None
    if first:
        head = _rows(batch, slice(None, head_tokens), slice(None, first), copy=False,
                     extend_prefix_lens=_part(batch.extend_prefix_lens, slice(None, first)),
                     extend_seq_lens=_part(batch.extend_seq_lens, slice(None, first)),
                     extend_prefix_lens_cpu=batch.extend_prefix_lens_cpu[:first],
                     extend_seq_lens_cpu=lens[:first])
    return OneTokenTail(head=head, tail=tail, head_tokens=head_tokens)


def _part(t: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if t is None else t[rows]


def _rows(batch: ForwardBatch, tokens: slice, reqs: slice, *, copy: bool,
          **changes: object) -> ForwardBatch:
    """``batch``'s requests ``reqs`` and their new tokens ``tokens`` as a batch for the
    attention alone (no multimodal rows, no rope shifts), with ``changes``; ``copy``: the
    index tensors the kernels read are copies rather than views."""
    def index(t: torch.Tensor, rows: slice) -> torch.Tensor:
        return t[rows].clone() if copy else t[rows]

    return attrs.evolve(
        batch, batch_size=len(range(batch.batch_size)[reqs]), input_ids=batch.input_ids[tokens],
        positions=batch.positions[tokens], out_cache_loc=index(batch.out_cache_loc, tokens),
        req_pool_indices=index(batch.req_pool_indices, reqs),
        seq_lens=index(batch.seq_lens, reqs), seq_lens_cpu=batch.seq_lens_cpu[reqs], mm_embeds=None,
        mm_rows=None, mrope_positions=None, rope_shifts_cpu=[], **changes)


class AttentionBackend(abc.ABC):
    """Per-engine attention implementation.

    Constructed with the model geometry: ``num_q_heads``, ``num_kv_heads``, ``head_dim``,
    ``scale`` (usually ``head_dim ** -0.5``), and the device.
    """

    name: str = ""
    supports_cuda_graph: bool = False
    #: Whether small extend passes can be captured too (their kernels read every length
    #: from device tensors; the grid is sized by a bound on each request's new tokens).
    supports_extend_graph: bool = False
    #: Whether decode reads a shared prefix once per group (``ForwardBatch.prefix_groups``).
    supports_shared_prefix: bool = False

    def __init__(self, *, num_q_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 device: torch.device | str) -> None:
        self.num_q_heads = num_q_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.device = device

    @abc.abstractmethod
    def init_forward(self, batch: ForwardBatch) -> None:
        """Prepare per-pass metadata (index tensors, split plans) from ``batch``."""

    @abc.abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                batch: ForwardBatch) -> torch.Tensor:
        """Write ``k``/``v`` to ``batch.out_cache_loc`` of layer ``layer_id``, then attend.

        ``q``: [num_tokens, num_q_heads, head_dim]; ``k``, ``v``: [num_tokens,
        num_kv_heads, head_dim]. Returns [num_tokens, num_q_heads, head_dim].
        """

    def max_kv_slots(self, num_kv_heads: int, head_dim: int) -> int:
        """The most KV slots a pool may have for these kernels to address every row.

        Slot ids travel as int32 (the request → slots table), so never more than
        ``2**31 - 2`` (slot 0 is padding); backends whose kernels compute offsets in
        narrower arithmetic lower it.
        """
        return 2**31 - 2

    # CUDA-graph hooks (decode only). Backends without graph support keep the defaults.
    def init_cuda_graph_state(self, max_batch_size: int, max_context_len: int) -> None:
        raise NotImplementedError(f"{self.name} attention does not support CUDA graphs")

    def init_forward_for_capture(self, batch: ForwardBatch) -> None:
        raise NotImplementedError(f"{self.name} attention does not support CUDA graphs")

    def init_forward_for_replay(self, batch: ForwardBatch) -> None:
        raise NotImplementedError(f"{self.name} attention does not support CUDA graphs")


_REGISTRY: dict[str, Callable[[], type[AttentionBackend]]] = {}


def register(name: str, loader: Callable[[], type[AttentionBackend]]) -> None:
    """Register a backend class by name; ``loader`` imports it lazily."""
    _REGISTRY[name] = loader


def available() -> list[str]:
    return sorted(_REGISTRY)


def create(name: str, **geometry) -> AttentionBackend:
    """Instantiate backend ``name``; an unknown name lists the known ones."""
    try:
        loader = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"attention_backend: unknown {name!r}; choose one of {', '.join(available())} or 'auto'"
        ) from None
    return loader()(**geometry)
