"""A linear layer whose output rows are several projections stacked (q|k|v, gate|up).

One matmul instead of several; the loader fills each part from its separate checkpoint
tensor with ``load_shard``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MergedLinear"]


class MergedLinear(nn.Module):
    """``y = x @ W.T (+ b)`` with ``W`` the row-wise concatenation of named shards.

    ``shards``: ``[(name, out_features), ...]`` in output order.
    """

    def __init__(self, in_features: int, shards: Sequence[tuple[str, int]], *,
                 bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.shard_names = [name for name, _ in shards]
        self.shard_sizes = [size for _, size in shards]
        self.offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, size in shards:
            self.offsets[name] = (start, size)
            start += size
        self.out_features = start
        self.weight = nn.Parameter(torch.empty(start, in_features))
        self.bias = nn.Parameter(torch.empty(start)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Split an output along its last dim into the shards, in order."""
        return y.split(self.shard_sizes, dim=-1)

    @torch.no_grad()
    def load_shard(self, shard: str, param: str, tensor: torch.Tensor) -> None:
        """Copy ``tensor`` into shard ``shard`` of ``param`` (``"weight"`` or ``"bias"``).

        Raises ValueError when the shapes disagree (the checkpoint does not fit the config).
        """
        self.check_shard(shard, param, tensor.shape)
        start, size = self.offsets[shard]
        getattr(self, param).narrow(0, start, size).copy_(tensor)

    def check_shard(self, shard: str, param: str, shape: Sequence[int]) -> None:
        """Raise ValueError unless a checkpoint tensor of ``shape`` fits shard ``shard`` of
        ``param``."""
        start, size = self.offsets[shard]
        target = getattr(self, param)
        if target is None:
            raise ValueError(f"checkpoint has a {param} for {shard} but the config has none")
        part = target.narrow(0, start, size)
        if part.shape != tuple(shape):
            raise ValueError(
                f"{shard}.{param}: checkpoint shape {tuple(shape)} does not match "
                f"{tuple(part.shape)}"
            )

    def extra_repr(self) -> str:
        parts = ", ".join(f"{n}={s}" for n, s in zip(self.shard_names, self.shard_sizes, strict=True))
        return f"in={self.in_features}, {parts}, bias={self.bias is not None}"
