"""Linear layers: several projections stacked by output rows (q|k|v, gate|up), and the
row-parallel projection of tensor parallelism.

:class:`MergedLinear` is one matmul instead of several; the loader fills each part from its
separate checkpoint tensor with ``load_shard``. Under tensor parallelism it holds a rank's
rows of each part (column parallel, ``rows=``) and takes them out of the full checkpoint
tensor. :class:`RowParallelLinear` holds a rank's input columns and sums the partial
products over the ranks (see :mod:`aiolm.engine.parallel`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from ..parallel import TPGroup

__all__ = ["MergedLinear", "RowParallelLinear"]


class MergedLinear(nn.Module):
    """``y = x @ W.T (+ b)`` with ``W`` the row-wise concatenation of named shards.

    ``shards``: ``[(name, out_features), ...]`` in output order. ``rows``: under tensor
    parallelism, ``{name: (start, count)}``, the rows of each shard's full weight this rank
    holds (its output is those rows only); a checkpoint tensor given to :meth:`load_shard`
    is the full one. Default: every row.
    """

    def __init__(self, in_features: int, shards: Sequence[tuple[str, int]], *,
                 bias: bool = False, rows: Mapping[str, tuple[int, int]] | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.full_sizes = {name: size for name, size in shards}
        self.rows = {name: rows[name] if rows is not None else (0, size)
                     for name, size in shards}
        for name, (first, count) in self.rows.items():
            if first < 0 or count < 1 or first + count > self.full_sizes[name]:
                raise ValueError(f"rows: {name} rows {first}..{first + count} are not within "
                                 f"its {self.full_sizes[name]}")
        self.shard_names = [name for name, _ in shards]
        self.shard_sizes = [self.rows[name][1] for name in self.shard_names]
        self.offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, size in zip(self.shard_names, self.shard_sizes, strict=True):
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

        ``tensor``: the checkpoint's whole tensor of the shard (a tensor, or a lazy slice
        that ``[a:b]`` reads: only this rank's rows are read). Raises ValueError when the
        shapes disagree (the checkpoint does not fit the config).
        """
        if self.is_partial:
            self._check_full(shard, param, tuple(tensor.shape))
            first, count = self.rows[shard]
            tensor = tensor[first:first + count]
        self.check_shard(shard, param, tuple(tensor.shape))
        start, size = self.offsets[shard]
        getattr(self, param).narrow(0, start, size).copy_(tensor)

    @property
    def is_partial(self) -> bool:
        """Whether this layer holds only some rows of a shard (a tensor-parallel rank)."""
        return any(count != self.full_sizes[n] for n, (_, count) in self.rows.items())

    def full_shape(self, param: str) -> tuple[int, ...]:
        """The shape ``param`` (``"weight"`` / ``"bias"``) has in the unsharded model."""
        rows = sum(self.full_sizes.values())
        return (rows, self.in_features) if param == "weight" else (rows,)

    def take_shard(self, param: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of ``full``, ``param`` of the unsharded layer (for dummy weights
        drawn at full size)."""
        parts = full.split([self.full_sizes[n] for n in self.shard_names])
        return torch.cat([part[first:first + count] for part, (first, count)
                          in zip(parts, (self.rows[n] for n in self.shard_names), strict=True)])

    def _check_full(self, shard: str, param: str, shape: tuple[int, ...]) -> None:
        want = (self.full_sizes[shard], *((self.in_features,) if param == "weight" else ()))
        if shape != want:
            raise ValueError(f"{shard}.{param}: checkpoint shape {shape} does not match {want}")

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


class RowParallelLinear(nn.Module):
    """``y = sum over ranks (x_r @ W_r.T) (+ b)``: this rank's ``in_features / size``
    input columns of the weight (``x`` is this rank's part of the input: the output of the
    column-parallel layer before it); the partial products are summed by an all-reduce,
    then the (whole, replicated) bias is added. Raises ValueError when ``tp.size`` does not
    divide ``in_features``."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, tp: TPGroup) -> None:
        super().__init__()
        if in_features % tp.size:
            raise ValueError(f"tp_size: {tp.size} does not divide in_features {in_features}")
        self.tp = tp
        self.in_features = in_features
        self.out_features = out_features
        self.local_in = in_features // tp.size
        self.weight = nn.Parameter(torch.empty(out_features, self.local_in))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(nn.functional.linear(x, self.weight))
        return y if self.bias is None else y + self.bias

    def full_shape(self, param: str) -> tuple[int, ...]:
        """The shape ``param`` (``"weight"`` / ``"bias"``) has in the unsharded model."""
        return (self.out_features, self.in_features) if param == "weight" else (self.out_features,)

    def take_shard(self, param: str, full: Any) -> torch.Tensor:
        """This rank's part of ``full`` (a tensor, or a lazy slice indexed ``[:, a:b]``)."""
        if param != "weight":
            return full[:]
        first = self.tp.rank * self.local_in
        return full[:, first:first + self.local_in]

    def extra_repr(self) -> str:
        return (f"in={self.in_features} (this rank: {self.local_in}), out={self.out_features}, "
                f"bias={self.bias is not None}")
