"""Rotary position embedding (RoPE), plain and with linear / llama3 frequency scaling.

Numerically identical to ``transformers``: inverse frequencies and angles are computed in
float32 the same way, cos/sin are cast to the activations' dtype before rotating, and the
"rotate half" layout (first half of the head dims paired with the second half) is used.
The cos/sin table covers every position up to the context length and is indexed by
``positions``, so a forward pass has no position-dependent shapes. On CUDA, q and k are
rotated in place by one fused Triton kernel (:mod:`.fused`) with the same roundings.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..model_config import RopeScaling

__all__ = ["MRotaryEmbedding", "RotaryEmbedding", "rope_inv_freq"]


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """The ``head_dim // 2`` inverse frequencies (float32, CPU)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float) / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to q and k given each token's position.

    ``cos`` / ``sin``: non-persistent float32 buffers ``[max_positions, head_dim // 2]``;
    ``reset_cache()`` recomputes them (after the module was built on the meta device).
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: RopeScaling | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.theta = theta
        self.scaling = scaling
        self.register_buffer("cos", torch.empty(max_positions, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, head_dim // 2), persistent=False)
        # CPU eager path: the full-width tables, and the rows of the last positions.
        self._full: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._gathered: tuple | None = None
        if self.cos.device.type != "meta":
            self.reset_cache()

    @torch.no_grad()
    def reset_cache(self) -> None:
        """(Re)compute the cos/sin tables in float32 on the buffers' device."""
        device = self.cos.device
        inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling).to(device)
        t = torch.arange(self.max_positions, device=device).float()
        freqs = t[:, None] * inv_freq[None, :]
        self.cos = freqs.cos()
        self.sin = freqs.sin()
        self._full = None
        self._gathered = None

    def _cpu_tables(self, positions: torch.Tensor,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``[cos, cos]`` and ``[-sin, sin]`` rows of ``positions`` in ``dtype``,
        ``[T, 1, D]``: the rotation as ``x * cos2 + swap_halves(x) * sin2``. Eager only: the
        rows of the last ``positions`` tensor are kept, so the layers of one forward pass
        (all given the same tensor) gather them once; ``new_pass()`` drops them."""
        cached = self._gathered
        if cached is not None and cached[0] is positions and cached[1] == dtype:
            return cached[2], cached[3]
        if self._full is None or self._full[0] is not self.cos:
            self._full = (self.cos, torch.cat((self.cos, self.cos), dim=-1),
                          torch.cat((-self.sin, self.sin), dim=-1))
        cos = self._full[1][positions].to(dtype).unsqueeze(1)
        sin = self._full[2][positions].to(dtype).unsqueeze(1)
        self._gathered = (positions, dtype, cos, sin)
        return cos, sin

    def new_pass(self) -> None:
        """Forget the rows gathered for the previous forward pass (its positions)."""
        self._gathered = None

    def rotate(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """RoPE of ``x`` ``[T, H, D]`` (q and k heads side by side: one pass for both) by
        ``positions`` ``[T]``; a new tensor. Eager CPU path: the same products and sums,
        each rounded as the per-half code rounds them (``a - b == a + (-b)`` exactly)."""
        cos, sin = self._cpu_tables(positions, x.dtype)
        t, h, d = x.shape
        swapped = x.reshape(t, h, 2, d // 2).flip(2).view(t, h, d)
        return x * cos + swapped * sin

    def forward(self, positions: torch.Tensor, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q`` ``[T, Hq, D]`` and ``k`` ``[T, Hk, D]`` by ``positions`` ``[T]``.

        On CUDA (last dims contiguous) the rotation is in place and returns ``q``, ``k``
        themselves; elsewhere it returns new tensors.
        """
        if q.is_cuda and q.stride(-1) == 1 and k.stride(-1) == 1 and k.dtype == q.dtype:
            from .fused import rotary_embedding_

            rotary_embedding_(positions, q, k, self.cos, self.sin)
            return q, k
        cos = self.cos[positions].to(q.dtype).unsqueeze(1)
        sin = self.sin[positions].to(q.dtype).unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


class MRotaryEmbedding(RotaryEmbedding):
    """Multimodal RoPE (M-RoPE, Qwen2-VL / Qwen2.5-VL): each token has three positions
    (temporal, height, width), and the ``head_dim // 2`` rotary frequencies are split into
    ``mrope_section`` runs, run ``i`` rotated by position row ``i % 3``.

    ``positions`` is ``[3, T]`` for M-RoPE or ``[T]``; a ``[T]`` tensor stands for the same
    position on all three rows, which is exactly plain RoPE, so it takes
    :class:`RotaryEmbedding`'s paths unchanged (the fused CUDA kernel and CUDA graphs
    included). The ``[3, T]`` path gathers each run's cos/sin from the same float32 table,
    as ``transformers``' ``Qwen2_5_VLRotaryEmbedding`` builds them, then rotates like
    plain RoPE (not in place, also on CUDA: it runs on prefill passes only).
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 mrope_section: tuple[int, ...] | list[int],
                 scaling: RopeScaling | None = None) -> None:
        if sum(mrope_section) != head_dim // 2:
            raise ValueError(f"mrope_section: {list(mrope_section)} must sum to head_dim // 2 "
                             f"= {head_dim // 2}")
        self.mrope_section = tuple(int(n) for n in mrope_section)
        super().__init__(head_dim, max_positions, theta, scaling)

    def _mrope_rows(self, positions: torch.Tensor,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``[T, head_dim // 2]`` of ``positions`` ``[3, T]`` in ``dtype``."""
        cos_runs, sin_runs, start = [], [], 0
        for i, size in enumerate(self.mrope_section):
            rows = positions[i % 3]
            cos_runs.append(self.cos[rows, start:start + size])
            sin_runs.append(self.sin[rows, start:start + size])
            start += size
        return torch.cat(cos_runs, dim=-1).to(dtype), torch.cat(sin_runs, dim=-1).to(dtype)

    def _cpu_tables(self, positions: torch.Tensor,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:
            return super()._cpu_tables(positions, dtype)
        cached = self._gathered
        if cached is not None and cached[0] is positions and cached[1] == dtype:
            return cached[2], cached[3]
        cos, sin = self._mrope_rows(positions, dtype)
        cos2 = torch.cat((cos, cos), dim=-1).unsqueeze(1)
        sin2 = torch.cat((-sin, sin), dim=-1).unsqueeze(1)
        self._gathered = (positions, dtype, cos2, sin2)
        return cos2, sin2

    def forward(self, positions: torch.Tensor, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q`` and ``k`` by ``positions`` ``[T]`` (plain RoPE) or ``[3, T]``."""
        if positions.dim() == 1:
            return super().forward(positions, q, k)
        cos, sin = self._mrope_rows(positions, q.dtype)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
