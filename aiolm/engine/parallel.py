"""Tensor parallelism: how a model's heads and rows are split across ranks, and the
collectives its sharded layers call.

A tensor-parallel engine runs one process per rank (rank 0 is the engine itself, the others
are :mod:`aiolm.engine.tp_worker` processes). Every rank holds a shard of each weight:

- q/k/v and gate/up are split by output rows (column parallel): rank ``r`` holds query heads
  ``r * Hq / N ..`` and the KV heads those queries read. With fewer KV heads than ranks
  (``N % Hkv == 0``) each KV head is replicated on ``N / Hkv`` ranks.
- o_proj and down_proj are split by input columns (row parallel): each rank's partial
  product is summed across ranks (an all-reduce), then the bias is added.
- The embedding and the LM head are split by vocabulary rows (padded to a multiple of
  ``N``): a rank looks up the ids in its range and zeroes the others before the
  all-reduce; the head's logits shards are gathered (all-gather) into the full row.

:class:`TPGroup` is a process's place in the group: its rank, the group's size and those
three collectives, over the default ``torch.distributed`` process group (NCCL on CUDA, gloo
on the CPU). A model built without a group (``tp=None``) is the single-device model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from .model_config import ModelConfig

__all__ = ["TP_ARCHITECTURES", "TPGroup", "check_tensor_parallel", "kv_head_range",
           "local_heads"]

#: The architectures whose model class takes a tensor-parallel group (the dense Llama
#: family). Mixture-of-Experts and multimodal models need ``tp_size=1``.
TP_ARCHITECTURES = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                              "Qwen3ForCausalLM"})


@attrs.frozen(kw_only=True)
class TPGroup:
    """This process's rank in a tensor-parallel group of ``size`` ranks, and the
    collectives of the sharded layers (over the default process group, which the caller
    initialised). Every rank must call the same collectives in the same order."""

    rank: int
    size: int

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank: must be in [0, {self.size}), got {self.rank}")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place; returns ``x``. Waits for every rank (on CUDA:
        queued on the stream, capturable in a CUDA graph)."""
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' ``x`` (``[..., n]``, the same shape on every rank) side by side along
        the last dimension, rank 0 first: ``[..., size * n]``."""
        if self.size == 1:
            return x
        x = x.contiguous()
        out = torch.empty((self.size * x.shape[0], *x.shape[1:]), dtype=x.dtype,
                          device=x.device)
        # torch renamed all_gather_into_tensor (deprecated from 2.12 on); both take (out, in).
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, x)
        out = out.view(self.size, *x.shape).movedim(0, -2)
        return out.reshape(*x.shape[:-1], self.size * x.shape[-1])

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``x`` into every rank's ``x`` (same shape and dtype), in place."""
        if self.size > 1:
            dist.broadcast(x, src=0)
        return x

    def min_int(self, value: int, device: torch.device) -> int:
        """The smallest ``value`` over the ranks (a host sync; for setup, not the step)."""
        t = torch.tensor([value], dtype=torch.int64, device=device)
        if self.size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())


def local_heads(num_heads: int, num_kv_heads: int, size: int) -> tuple[int, int]:
    """``(query heads, KV heads)`` each of ``size`` ranks holds. Raises ValueError naming
    ``tp_size`` when the heads cannot be split evenly: ``num_heads`` must be a multiple of
    ``size``, and ``num_kv_heads`` a multiple or a divisor of it (then replicated)."""
    if num_heads % size:
        raise ValueError(f"tp_size: {size} does not divide the model's {num_heads} attention "
                         "heads")
    if num_kv_heads % size == 0:
        return num_heads // size, num_kv_heads // size
    if size % num_kv_heads:
        raise ValueError(f"tp_size: {size} neither divides nor is a multiple of the model's "
                         f"{num_kv_heads} KV heads")
    return num_heads // size, 1


def kv_head_range(rank: int, size: int, num_kv_heads: int) -> tuple[int, int]:
    """``(first KV head, count)`` rank ``rank`` holds: its share, or, with fewer KV heads
    than ranks, the one head its query heads read (query head ``h`` reads KV head
    ``h // (num_heads / num_kv_heads)``)."""
    if num_kv_heads % size == 0:
        per = num_kv_heads // size
        return rank * per, per
    return rank * num_kv_heads // size, 1


def check_tensor_parallel(config: ModelConfig, size: int) -> None:
    """Raise ValueError naming ``tp_size`` unless a model of ``config`` can be split over
    ``size`` ranks."""
    if size == 1:
        return
    arch = config.architecture
    if arch not in TP_ARCHITECTURES:
        raise ValueError(f"tp_size: tensor parallelism runs the dense Llama family "
                         f"({', '.join(sorted(TP_ARCHITECTURES))}); {arch} needs tp_size=1")
    local_heads(config.num_heads, config.num_kv_heads, size)
    inter = config.intermediate_size
    if inter % size:
        raise ValueError(f"tp_size: {size} does not divide the model's intermediate_size "
                         f"{inter}")
