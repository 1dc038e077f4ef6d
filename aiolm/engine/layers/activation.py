"""SiLU-and-mul: the gated activation of the Llama MLP over a fused gate/up projection.

CUDA tensors go through the fused Triton kernel (:mod:`.fused`); others run plain torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SiluAndMul"]


class SiluAndMul(nn.Module):
    """``silu(x[..., :d]) * x[..., d:]`` where the last dim of ``x`` is ``2 * d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from .fused import silu_and_mul

            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
