"""Token embedding and the LM head (its own weight, or tied to the embedding).

Under tensor parallelism (``tp=`` a :class:`~aiolm.engine.parallel.TPGroup` of several
ranks) both hold a rank's rows of the vocabulary: ``ceil(vocab / size)`` rows from
``rank * that``, the last rank's tail padded with zero rows. The embedding looks up the ids
in its rows, zeroes the others and sums over the ranks; the head computes its logits
columns and gathers every rank's (see :mod:`aiolm.engine.parallel`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from ..parallel import TPGroup

__all__ = ["VocabEmbedding", "LMHead"]


class _VocabRows:
    """The vocabulary rows one rank holds: ``first .. first + count`` of ``vocab_size``
    (``count`` rows allocated; those past ``vocab_size`` are padding)."""

    def __init__(self, vocab_size: int, tp: TPGroup | None) -> None:
        size, rank = (tp.size, tp.rank) if tp is not None else (1, 0)
        self.vocab_size = vocab_size
        self.count = -(-vocab_size // size)
        self.first = rank * self.count
        self.real = max(0, min(self.count, vocab_size - self.first))

    def take(self, full: Any) -> torch.Tensor:
        """This rank's rows of a full ``[vocab_size, hidden]`` weight (a tensor, or a lazy
        slice indexed ``[a:b]``), zero rows past the vocabulary."""
        part = full[self.first:self.first + self.real]
        if self.real == self.count:
            return part
        pad = part.new_zeros((self.count - self.real, *part.shape[1:]))
        return torch.cat([part, pad])


class VocabEmbedding(nn.Module):
    """``weight[input_ids]``, weight ``[vocab_size, hidden_size]`` (a rank's rows under
    tensor parallelism, summed over the ranks)."""

    def __init__(self, vocab_size: int, hidden_size: int, *, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.vocab = _VocabRows(vocab_size, self.tp)
        self.hidden_size = hidden_size
        self.weight = nn.Parameter(torch.empty(self.vocab.count, hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return nn.functional.embedding(input_ids, self.weight)
        local = input_ids - self.vocab.first
        mine = (local >= 0) & (local < self.vocab.count)
        out = nn.functional.embedding(local.masked_fill(~mine, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill_(~mine[:, None], 0))

    def full_shape(self, param: str) -> tuple[int, ...]:
        """The weight's shape in the unsharded model."""
        return (self.vocab.vocab_size, self.hidden_size)

    def take_shard(self, param: str, full: Any) -> torch.Tensor:
        """This rank's rows of the full weight ``full``."""
        return self.vocab.take(full)


class LMHead(nn.Module):
    """Logits in float32: ``(hidden @ W.T).float()``.

    With ``tied`` set it reads the embedding's weight (no parameter of its own), so tied
    checkpoints load one tensor and share the memory. Under tensor parallelism each rank
    computes its vocabulary rows' logits and every rank receives the whole row.
    """

    def __init__(self, vocab_size: int, hidden_size: int, *,
                 tied: VocabEmbedding | None = None, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.tied = tied is not None
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.vocab = _VocabRows(vocab_size, self.tp)
        self.hidden_size = hidden_size
        # A tuple keeps the embedding from being registered twice as a submodule.
        self._tied_to = (tied,) if tied is not None else ()
        if tied is None:
            self.weight = nn.Parameter(torch.empty(self.vocab.count, hidden_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self._tied_to[0].weight if self.tied else self.weight
        logits = nn.functional.linear(hidden, weight)
        if self.tp is not None:
            logits = self.tp.all_gather_last(logits)[..., :self.vocab.vocab_size]
        return logits.float()

    def full_shape(self, param: str) -> tuple[int, ...]:
        """The weight's shape in the unsharded model."""
        return (self.vocab.vocab_size, self.hidden_size)

    def take_shard(self, param: str, full: Any) -> torch.Tensor:
        """This rank's rows of the full weight ``full``."""
        return self.vocab.take(full)
