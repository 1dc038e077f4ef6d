"""The attention-backend interface and its registry.

A backend stores the new tokens' K/V into the pool and computes attention of the new
queries over each request's whole sequence (prefix from the pool + new tokens, causal).
``init_forward`` runs once per forward pass (metadata shared by all layers);
``forward`` once per layer. Backends that support CUDA graphs implement the capture hooks.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ..forward_batch import ForwardBatch

__all__ = ["AttentionBackend", "register", "create", "available"]


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
