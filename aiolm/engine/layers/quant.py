"""Weight-only quantized linear layers for the CPU, on torch's own kernels.

- ``Int8Linear``: one int8 weight per element and one scale per output row,
  ``w = q * scale`` (``torch._weight_int8pack_mm``).
- ``Int4Linear``: 4-bit codes in groups of ``INT4_GROUP`` along the input dim,
  ``w = (q - 8) * scale + zero`` with ``q`` in 0..15 (gpt-fast's convention,
  ``torch._weight_int4pack_mm_for_cpu``), packed once at construction.

Both kernels are matrix-vector code: fast at decode, slow for a prefill's many rows. On a
CPU with native bfloat16 dot products (AVX512-BF16 or AMX), a layer given at least
``DENSE_MIN_ROWS`` rows dequantizes its weight to bfloat16 for that call and runs the dense
bfloat16 GEMM instead (2-2.7x faster at 256-1024 rows on SmolLM2's shapes, dequantization
included); the int4 layer keeps its codes a second time, in a plain nibble layout, for
that (half a byte per weight). The answer is the same weight in another rounding order.

Both kernels take the activations, scales and zeros in bfloat16 (their float32 paths are
scalar code, 10-40x slower here) and accumulate in float32: a layer casts its input to
bfloat16 and its output back, so the rest of the model keeps its dtype. The bfloat16
rounding of the input, the output and the scales costs about 0.2-0.4% relative error per
layer, well under the quantization's own. ``Int4Codes`` carries a checkpoint's 4-bit
groups (GGUF Q4_0/Q4_1) to ``Int4Linear`` without a float round trip.

``quantize_model`` swaps a loaded float model's projections and LM head for these layers.
"""

from __future__ import annotations

import functools
from collections.abc import MutableMapping, Sequence

import attrs
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DENSE_MIN_ROWS", "INT4_GROUP", "KERNEL_DTYPE", "SCHEMES", "Int4Codes", "Int4Linear", "Int8Linear", "quantize_model",
]

INT4_GROUP = 32
SCHEMES = ("int8", "int4")
_KERNEL_DTYPE = torch.bfloat16
#: The activations' dtype the CPU kernels take (and return).
KERNEL_DTYPE = _KERNEL_DTYPE
#: From this many rows (prefill) a layer multiplies by its dequantized weight instead.
DENSE_MIN_ROWS = 160


@functools.cache
def dense_bf16_is_fast() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX-BF16): then a
    dense bfloat16 GEMM beats the quantized kernels from ``DENSE_MIN_ROWS`` rows."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@attrs.frozen(kw_only=True)
class Int4Codes:
    """A weight as 4-bit codes in groups of ``INT4_GROUP`` along its rows:
    ``w[n, k] = codes[n, k] * scale[n, k // 32] + offset[n, k // 32]``.

    ``codes``: uint8 ``[N, K]`` in 0..15; ``scale``, ``offset``: float32 ``[N, K // 32]``.
    GGUF Q4_1 blocks are exactly this (``d``, ``m``); Q4_0 is ``scale = d, offset = -8 d``.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self) -> torch.Tensor:
        """The float32 weight these codes stand for."""
        n, k = self.codes.shape
        groups = self.codes.view(n, k // INT4_GROUP, INT4_GROUP).float()
        return (groups * self.scale[..., None] + self.offset[..., None]).view(n, k)

    @staticmethod
    def concat(parts: Sequence[Int4Codes]) -> Int4Codes:
        """Row-wise concatenation (the shards of a merged projection, in order)."""
        return Int4Codes(codes=torch.cat([p.codes for p in parts]),
                         scale=torch.cat([p.scale for p in parts]),
                         offset=torch.cat([p.offset for p in parts]))


class _QuantizedLinear(nn.Module):
    """Shared shape handling: ``forward`` flattens leading dims, adds the bias in the input's
    dtype (or ``out_dtype``), and ``split`` cuts the output into shards as ``MergedLinear``
    does."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None,
                 shard_sizes: Sequence[int] | None, out_dtype: torch.dtype | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.shard_sizes = list(shard_sizes) if shard_sizes is not None else [out_features]
        self.out_dtype = out_dtype
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``x @ W.T (+ b)`` in ``out_dtype`` (default: the layer's ``out_dtype``, else
        ``x``'s dtype); an input already in the kernel's dtype (bfloat16) is not cast."""
        lead = x.shape[:-1]
        y = self._matmul(x.reshape(-1, self.in_features).to(_KERNEL_DTYPE))
        y = y.to(out_dtype or self.out_dtype or x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*lead, self.out_features)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Split an output along its last dim into the shards, in order."""
        return y.split(self.shard_sizes, dim=-1)


class Int8Linear(_QuantizedLinear):
    """``y = x @ (q * scale).T (+ b)``: int8 weight ``[N, K]``, one scale per output row."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, *,
                 bias: torch.Tensor | None = None, shard_sizes: Sequence[int] | None = None,
                 out_dtype: torch.dtype | None = None) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias, shard_sizes, out_dtype)
        self.register_buffer("weight", weight.to(torch.int8).contiguous())
        self.register_buffer("scales", scales.to(_KERNEL_DTYPE).contiguous())

    @classmethod
    def from_float(cls, weight: torch.Tensor, **kwargs: object) -> Int8Linear:
        """Symmetric per-row quantization: ``scale = max|w_row| / 127``."""
        w = weight.detach().float()
        largest = torch.maximum(w.amax(dim=1), -w.amin(dim=1))  # no |w| temporary
        scales = (largest / 127).clamp(min=torch.finfo(_KERNEL_DTYPE).tiny)
        scales = scales.to(_KERNEL_DTYPE).float()  # round the codes to the scales the kernel uses
        # In place: the LM head's weight is the largest tensor; one temporary, not three.
        q = torch.div(w, scales[:, None]).round_().clamp_(-127, 127)
        return cls(q, scales, **kwargs)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= DENSE_MIN_ROWS and dense_bf16_is_fast():
            return F.linear(x, self.weight.to(_KERNEL_DTYPE).mul_(self.scales[:, None]))
        return torch._weight_int8pack_mm(x, self.weight, self.scales)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class Int4Linear(_QuantizedLinear):
    """``y = x @ W.T (+ b)`` with ``W`` 4-bit in groups of ``INT4_GROUP``
    (``N`` a multiple of 16, ``K`` of 32: ``int4_fits``)."""

    def __init__(self, codes: Int4Codes, *, bias: torch.Tensor | None = None,
                 shard_sizes: Sequence[int] | None = None,
                 out_dtype: torch.dtype | None = None) -> None:
        n, k = codes.shape
        if not int4_fits(n, k):
            raise ValueError(f"Int4Linear: weight {n}x{k} needs rows % 16 == 0 and columns % "
                             f"{INT4_GROUP} == 0")
        super().__init__(k, n, bias, shard_sizes, out_dtype)
        self.register_buffer("weight", torch._convert_weight_to_int4pack_for_cpu(
            codes.codes.to(torch.int32).contiguous(), 1))
        # (q - 8) * scale + zero == q * scale + offset  <=>  zero = offset + 8 * scale
        zeros = codes.offset + 8 * codes.scale
        self.register_buffer("scales_and_zeros", torch.stack([codes.scale, zeros], dim=-1)
                             .transpose(0, 1).contiguous().to(_KERNEL_DTYPE))
        # For the dense prefill path: the codes two per byte (even column low), and the
        # groups' scale and offset (w = q * scale + offset).
        dense = dense_bf16_is_fast()
        c = codes.codes
        self.register_buffer("nibbles", (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()
                             if dense else None)
        self.register_buffer("dense_scale", codes.scale.to(_KERNEL_DTYPE)[..., None]
                             if dense else None)
        self.register_buffer("dense_offset", codes.offset.to(_KERNEL_DTYPE)[..., None]
                             if dense else None)

    @classmethod
    def from_float(cls, weight: torch.Tensor, **kwargs: object) -> Int4Linear:
        """Asymmetric min/max quantization per group of ``INT4_GROUP``."""
        return cls(int4_codes(weight), **kwargs)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= DENSE_MIN_ROWS and self.nibbles is not None:
            return F.linear(x, self._dense_weight())
        return torch._weight_int4pack_mm_for_cpu(x, self.weight, INT4_GROUP, self.scales_and_zeros)

    def _dense_weight(self) -> torch.Tensor:
        """The weight in bfloat16, unpacked from ``nibbles`` (one temporary, in place)."""
        n, k = self.out_features, self.in_features
        q = torch.empty(n, k, dtype=torch.uint8)
        torch.bitwise_and(self.nibbles, 15, out=q[:, 0::2])
        torch.bitwise_right_shift(self.nibbles, 4, out=q[:, 1::2])
        w = q.view(n, k // INT4_GROUP, INT4_GROUP).to(_KERNEL_DTYPE)
        return w.mul_(self.dense_scale).add_(self.dense_offset).view(n, k)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, group={INT4_GROUP}, "
                f"bias={self.bias is not None}")


def int4_fits(out_features: int, in_features: int) -> bool:
    """Whether torch's CPU int4 kernel takes a weight of this shape."""
    return out_features % 16 == 0 and in_features % INT4_GROUP == 0


def int4_codes(weight: torch.Tensor) -> Int4Codes:
    """Min/max 4-bit codes of a float weight: ``offset`` = group min, ``scale`` = range / 15."""
    n, k = weight.shape
    groups = weight.detach().float().reshape(n, k // INT4_GROUP, INT4_GROUP)
    low = groups.amin(dim=-1)
    scale = ((groups.amax(dim=-1) - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    codes = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15)
    return Int4Codes(codes=codes.to(torch.uint8).reshape(n, k), scale=scale, offset=low)


def quantize_model(model: nn.Module, scheme: str,
                   codes: MutableMapping[tuple[str, str | None], Int4Codes]) -> dict[str, int]:
    """Replace ``model``'s projections and LM head by quantized layers, in place.

    ``scheme``: ``"int8"`` (every projection and the head int8 per row) or ``"int4"``
    (projections int4 in groups of 32, the head int8: its error moves the logits directly;
    a projection whose shape the int4 kernel does not take is int8). ``codes``: the 4-bit
    groups a checkpoint stored, keyed ``(parameter name, shard or None)`` as
    ``load_weights`` returns them (their float parameters were never filled); a projection
    whose every shard has codes is packed from them exactly, any other is quantized from
    its float weight (with those shards dequantized); each entry is removed from ``codes``
    once used, so its memory goes while the next layers are packed. The embedding lookup and
    the norms stay float. Returns how many layers became each kind (``{"int4": .., "int8": ..}``).
    Raises ValueError for an unknown scheme.
    """
    from .embedding import LMHead
    from .linear import MergedLinear

    if scheme not in SCHEMES:
        raise ValueError(f"quantization: expected one of {SCHEMES}, got {scheme!r}")
    counts = {"int4": 0, "int8": 0}
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear | MergedLinear | LMHead)]
    for name, module in targets:
        if isinstance(module, LMHead):
            weight = module._tied_to[0].weight if module.tied else module.weight
            layer: nn.Module = Int8Linear.from_float(weight, out_dtype=torch.float32)
        else:
            shards = module.shard_names if isinstance(module, MergedLinear) else [None]
            sizes = module.shard_sizes if isinstance(module, MergedLinear) else None
            stored = [codes.pop((f"{name}.weight", shard), None) for shard in shards]
            kwargs = {"bias": module.bias, "shard_sizes": sizes}
            n, k = module.weight.shape
            exact = all(c is not None for c in stored)
            if scheme == "int4" and int4_fits(n, k) and exact:
                layer = Int4Linear(Int4Codes.concat(stored), **kwargs)
            else:
                weight = _float_weight(module.weight, stored, sizes or [n])
                if scheme == "int4" and int4_fits(n, k):
                    layer = Int4Linear.from_float(weight, **kwargs)
                else:
                    layer = Int8Linear.from_float(weight, **kwargs)
        counts["int4" if isinstance(layer, Int4Linear) else "int8"] += 1
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, layer)
    return counts


def _float_weight(weight: torch.Tensor, stored: Sequence[Int4Codes | None],
                  sizes: Sequence[int]) -> torch.Tensor:
    """``weight`` with the rows of every shard that came as codes dequantized from them."""
    if all(c is None for c in stored):
        return weight
    parts = weight.split(list(sizes))
    return torch.cat([part if c is None else c.dequantize().to(part.dtype)
                      for part, c in zip(parts, stored, strict=True)])
