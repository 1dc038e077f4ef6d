"""Token embedding and the LM head (its own weight, or tied to the embedding)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["VocabEmbedding", "LMHead"]


class VocabEmbedding(nn.Module):
    """``weight[input_ids]``, weight ``[vocab_size, hidden_size]``."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """Logits in float32: ``(hidden @ W.T).float()``.

    With ``tied`` set it reads the embedding's weight (no parameter of its own), so tied
    checkpoints load one tensor and share the memory.
    """

    def __init__(self, vocab_size: int, hidden_size: int, *,
                 tied: VocabEmbedding | None = None) -> None:
        super().__init__()
        self.tied = tied is not None
        # A tuple keeps the embedding from being registered twice as a submodule.
        self._tied_to = (tied,) if tied is not None else ()
        if tied is None:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self._tied_to[0].weight if self.tied else self.weight
        return nn.functional.linear(hidden, weight).float()
