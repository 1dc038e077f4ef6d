"""The Mixture-of-Experts MLP: top-k routing and the routed experts' gated MLPs.

Each token's router logits pick ``top_k`` of ``E`` experts (softmax over all experts in
float32, the ``top_k`` largest probabilities; ``renormalize`` divides them by their sum, as
Mixtral always does and Qwen3-MoE does when ``norm_topk_prob``). Expert ``e`` computes
``down[e] @ (silu(gate[e] @ x) * (up[e] @ x))`` and the token's output is the routing-weighted
sum over its experts. Expert weights are packed ``gate_up_proj [E, 2*I, H]`` (gate rows,
then up rows: transformers 5's in-memory layout) and ``down_proj [E, H, I]``.

Two implementations of the same function:

- :func:`torch_experts` (the CPU, and the reference): a loop over the experts that received
  tokens, one gathered matmul pair each; it reads the routing on the host.
- :func:`fused_experts` (CUDA): no host sync, so CUDA graphs capture it. The ``M * top_k``
  (token, expert) assignments are sorted by expert and laid out in blocks of ``BLOCK_M``
  rows, each block one expert's (padded with an out-of-range id; an expert that received
  nothing gets no block) by :func:`align_by_expert`, built on the device. One grouped-GEMM
  Triton kernel then computes gate/up for every block (each program reads its expert's
  weight tile and its tokens' rows of ``x``), the fused SiLU-and-mul kernel gates it, and a
  second launch of the kernel computes down with each row multiplied by its routing weight
  in the epilogue (float32, before rounding); a sum over the ``top_k`` rows of each token
  returns to token order. Block sizes follow the rows per expert: small blocks for decode
  (a few rows per expert: the weights are streamed once), large ones for prefill (vLLM's
  and SGLang's ``fused_moe`` take the same approach; the code here is ours).

The Triton kernels also run on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``), which is how the CPU tests check them; triton is imported only
when a CUDA path (or such a test) runs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FusedMoE", "align_by_expert", "fused_experts", "route", "torch_experts",
           "torch_route"]


def torch_route(logits: torch.Tensor, top_k: int, renormalize: bool,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights float32 [M, top_k], expert ids int64 [M, top_k])`` from router logits."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def route(logits: torch.Tensor, top_k: int, renormalize: bool,
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing of ``logits [M, E]`` (see the module docstring): float32 weights and
    expert ids. One Triton kernel on CUDA (ids int32), :func:`torch_route` elsewhere.

    Raises ValueError unless ``1 <= top_k <= E``.
    """
    num_experts = logits.shape[-1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k: must be between 1 and the {num_experts} experts, got {top_k}")
    if not logits.is_cuda:
        return torch_route(logits, top_k, renormalize)
    from . import fused_moe_kernels as kernels

    return kernels.route(logits, top_k, renormalize)


def _check_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                   weights: torch.Tensor, ids: torch.Tensor) -> None:
    """ValueError naming the first argument whose shape or dtype does not fit."""
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"expected x [M, H], gate_up [E, 2I, H], down [E, H, I]; got "
                         f"{tuple(x.shape)}, {tuple(w13.shape)}, {tuple(w2.shape)}")
    num_experts, two_i, hidden = w13.shape
    if (hidden != x.shape[1] or two_i % 2 or w2.shape != (num_experts, hidden, two_i // 2)):
        raise ValueError(f"expert weights gate_up {tuple(w13.shape)} and down "
                         f"{tuple(w2.shape)} do not fit x {tuple(x.shape)}")
    if weights.shape != ids.shape or weights.dim() != 2 or weights.shape[0] != x.shape[0]:
        raise ValueError(f"routing weights {tuple(weights.shape)} and ids {tuple(ids.shape)} "
                         f"must both be [{x.shape[0]}, top_k]")
    if x.dtype != w13.dtype or x.dtype != w2.dtype:
        raise ValueError(f"x is {x.dtype} but the expert weights are {w13.dtype}/{w2.dtype}")


def torch_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The routed experts in plain torch: ``x [M, H]`` → ``[M, H]`` in x's dtype.

    Loops over the experts that received tokens (their counts are read on the host); each
    expert's output is scaled by the routing weights in float32 and summed in float32.
    """
    _check_experts(x, w13, w2, weights, ids)
    top_k = ids.shape[1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    flat_weights = weights.reshape(-1).float()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        assignments = order[start:start + count]
        start += count
        tokens = assignments // top_k
        gate, up = F.linear(x[tokens], w13[expert]).chunk(2, dim=-1)
        hidden = F.linear(F.silu(gate) * up, w2[expert])
        out.index_add_(0, tokens, hidden.float() * flat_weights[assignments, None])
    return out.to(x.dtype)


def align_by_expert(ids: torch.Tensor, num_experts: int, block_m: int,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lay the ``n = M * top_k`` assignments of ``ids [M, top_k]`` out by expert, on the device.

    Returns ``(sorted_ids int32 [capacity], expert_ids int32 [capacity // block_m],
    num_padded int32 [1])``: ``sorted_ids`` lists each expert's assignments (flat indices
    ``token * top_k + k``, in token order) in consecutive blocks of ``block_m``, the last
    block of each expert padded with ``n``; ``expert_ids[b]`` is block ``b``'s expert;
    ``num_padded`` the slots in use. ``capacity`` (``n + min(E, n) * (block_m - 1)``
    rounded up to ``block_m``) bounds it for any routing, so the shapes depend only on ``n``.
    """
    from . import fused_moe_kernels as kernels

    return kernels.align_by_expert(ids, num_experts, block_m)


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The routed experts through the grouped-GEMM Triton kernels (see the module
    docstring): ``x [M, H]`` → ``[M, H]``; same arguments as :func:`torch_experts`."""
    _check_experts(x, w13, w2, weights, ids)
    from . import fused_moe_kernels as kernels

    return kernels.fused_experts(x, w13, w2, weights, ids)


class FusedMoE(nn.Module):
    """The experts of one MoE layer: ``gate_up_proj [E, 2*I, H]``, ``down_proj [E, H, I]``.

    ``forward(x, weights, ids)`` runs :func:`fused_experts` for CUDA tensors and
    :func:`torch_experts` otherwise.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                ) -> torch.Tensor:
        experts: Any = fused_experts if x.is_cuda else torch_experts
        return experts(x, self.gate_up_proj, self.down_proj, weights, ids)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, hidden={self.hidden_size}, "
                f"intermediate={self.intermediate_size}")
