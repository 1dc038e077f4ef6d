"""Fused elementwise Triton kernels for the layers' CUDA path.

Each function computes what the plain torch code of its layer computes, in one pass over
memory instead of several (the torch code launches one kernel per operator and writes
every intermediate):

- ``rmsnorm`` / ``fused_add_rmsnorm``: ``s = x + residual`` (rounded to the IO dtype, as
  torch's add), then ``weight * (s / sqrt(mean(s^2) + eps))`` with the statistics in
  float32; returns the normalised rows and ``s`` (the next residual).
- ``silu_and_mul``: ``silu(x[..., :d]) * x[..., d:]`` over the fused gate/up output.
- ``rotary_embedding_``: RoPE ("rotate half" layout) applied to q and k in place, one
  program per token.

The kernels round intermediate results to the IO dtype where the torch code does (e.g.
``x1 * cos`` and ``x2 * sin`` each rounded before the subtraction), so they agree with it
to float32 reduction order. IO dtypes: bfloat16, float16, float32. They run on CPU
tensors under Triton's interpreter (``TRITON_INTERPRET=1``), which is how the CPU tests
check them. Layers call these only for CUDA tensors; triton is imported with this module.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["fused_add_rmsnorm", "rmsnorm", "rotary_embedding_", "silu_and_mul"]

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name}: expected bfloat16, float16 or float32, got {t.dtype}")


def _warps(block: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


# --------------------------------------------------------------------------- RMSNorm


@triton.jit
def _rmsnorm_kernel(X, Res, W, Out, ResOut, stride_x, stride_r, stride_o, stride_ro, n_cols,
                    eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(Res + row * stride_r + cols, mask=mask, other=0.0)
        # Rounded to the IO dtype like torch's ``x + residual`` before the norm reads it.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(ResOut.dtype.element_ty)
        tl.store(ResOut + row * stride_ro + cols, x, mask=mask)
    h = x.to(tl.float32)
    mean_sq = tl.sum(h * h, axis=0) / n_cols
    h = (h * tl.math.rsqrt(mean_sq + eps)).to(Out.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + cols, (w * h).to(Out.dtype.element_ty), mask=mask)


def _rows(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` as 2-D rows over its last dim (a view when possible, else a copy)."""
    _check_dtype(name, t)
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _output(name: str, given: torch.Tensor | None, like: torch.Tensor,
            shape: tuple[int, ...]) -> torch.Tensor:
    """``given`` checked (contiguous, ``shape``, ``like``'s dtype and device) or a new one."""
    if given is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if (tuple(given.shape) != tuple(shape) or given.dtype != like.dtype
            or given.device != like.device or not given.is_contiguous()):
        raise ValueError(f"{name}: expected a contiguous {tuple(shape)} {like.dtype} tensor "
                         f"on {like.device}, got {tuple(given.shape)} {given.dtype} "
                         f"on {given.device}")
    return given


def _launch_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                    eps: float, out: torch.Tensor | None, residual_out: torch.Tensor | None,
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"weight: expected shape ({n},), got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight: dtype {weight.dtype} differs from the input's {x.dtype}")
    x2 = _rows("x", x)
    out = _output("out", out, x, tuple(x.shape))
    res2 = res_out = None
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"residual: expected {tuple(x.shape)} {x.dtype}, got "
                f"{tuple(residual.shape)} {residual.dtype}"
            )
        res2 = _rows("residual", residual)
        res_out = _output("residual_out", residual_out, x, tuple(x.shape))
    if x2.shape[0]:  # outputs are contiguous: their rows are n apart
        block = triton.next_power_of_2(n)
        _rmsnorm_kernel[(x2.shape[0],)](
            x2, res2 if res2 is not None else x2, weight, out,
            res_out if res_out is not None else out,
            x2.stride(0), res2.stride(0) if res2 is not None else 0, n, n, n, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block,
            num_warps=_warps(block, x.device),
        )
    return out, res_out


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, *,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2, -1) + eps)`` in one pass, into ``out`` (contiguous,
    like ``x``; a new tensor by default), which is returned.

    ``weight``: ``[x.shape[-1]]`` of ``x``'s dtype. Raises TypeError / ValueError otherwise.
    """
    result, _ = _launch_rmsnorm(x, None, weight, eps, out, None)
    return result


def fused_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float, *, out: torch.Tensor | None = None,
                      residual_out: torch.Tensor | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rmsnorm(x + residual), x + residual)`` in one pass, into ``out`` and
    ``residual_out`` (new tensors by default); ``x`` and ``residual`` are only read."""
    result, summed = _launch_rmsnorm(x, residual, weight, eps, out, residual_out)
    if summed is None:
        raise RuntimeError("the residual sum was not produced")
    return result, summed


# --------------------------------------------------------------------------- SiLU and mul


@triton.jit
def _silu_and_mul_kernel(X, Out, stride_x, stride_o, d, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    # torch rounds silu(gate) to the IO dtype before the product.
    act = (gate / (1.0 + tl.exp(-gate))).to(Out.dtype.element_ty).to(tl.float32)
    tl.store(Out + row * stride_o + cols, (act * up).to(Out.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for ``x[..., 2 * d]``, into ``out`` ``[..., d]``
    (contiguous; a new tensor by default), which is returned."""
    if x.shape[-1] % 2:
        raise ValueError(f"x: the last dim must be even (gate | up), got {x.shape[-1]}")
    d = x.shape[-1] // 2
    x2 = _rows("x", x)
    out = _output("out", out, x, (*x.shape[:-1], d))
    if x2.shape[0] and d:
        block = min(triton.next_power_of_2(d), 1024 if x.is_cuda else 64)
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](
            x2, out, x2.stride(0), d, d, BLOCK=block,
            num_warps=4 if x.is_cuda else 1,
        )
    return out


# --------------------------------------------------------------------------- rotary


@triton.jit
def _rotate_heads(X, stride_t, stride_h, t, num_heads, cos, sin, half,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < num_heads) & (dims < half)
    first = X + t * stride_t + heads * stride_h + dims
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + half, mask=mask, other=0.0).to(tl.float32)
    dtype = X.dtype.element_ty
    # Each product rounded to the IO dtype, then the sum: torch's order of roundings.
    a1 = (x1 * cos).to(dtype).to(tl.float32)
    b1 = (x2 * sin).to(dtype).to(tl.float32)
    a2 = (x2 * cos).to(dtype).to(tl.float32)
    b2 = (x1 * sin).to(dtype).to(tl.float32)
    tl.store(first, (a1 - b1).to(dtype), mask=mask)
    tl.store(first + half, (a2 + b2).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(Q, K, Positions, Cos, Sin, stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_cos, num_q_heads, num_kv_heads, half,
                   BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(Positions + t).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    dmask = dims < half
    dtype = Q.dtype.element_ty
    # The float32 table cast to the IO dtype first, as the torch code does.
    cos = tl.load(Cos + pos * stride_cos + dims, mask=dmask, other=0.0).to(dtype).to(tl.float32)
    sin = tl.load(Sin + pos * stride_cos + dims, mask=dmask, other=0.0).to(dtype).to(tl.float32)
    _rotate_heads(Q, stride_qt, stride_qh, t, num_q_heads, cos, sin, half,
                  BLOCK_H=BLOCK_HQ, BLOCK_HALF=BLOCK_HALF)
    _rotate_heads(K, stride_kt, stride_kh, t, num_kv_heads, cos, sin, half,
                  BLOCK_H=BLOCK_HK, BLOCK_HALF=BLOCK_HALF)


def rotary_embedding_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                      cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate ``q`` ``[T, Hq, D]`` and ``k`` ``[T, Hk, D]`` in place by ``positions`` ``[T]``.

    ``cos`` / ``sin``: float32 tables ``[max_positions, D // 2]`` (row ``p`` = the angles of
    position ``p``). ``q`` and ``k`` may be strided views (e.g. of a fused qkv output) as
    long as their last dim is contiguous; their dtype must be the same.
    """
    _check_dtype("q", q)
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q, k: expected [T, H, D] with equal T and D, got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    if k.dtype != q.dtype:
        raise TypeError(f"k: dtype {k.dtype} differs from q's {q.dtype}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q, k: the last dim must be contiguous (the rotation is in place)")
    num_tokens, num_q_heads, head_dim = q.shape
    half = head_dim // 2
    if cos.shape[-1] != half or sin.shape != cos.shape or cos.stride(-1) != 1:
        raise ValueError(f"cos, sin: expected contiguous [max_positions, {half}] tables")
    if num_tokens == 0:
        return
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        cos.stride(0), num_q_heads, k.shape[1], half,
        BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HK=triton.next_power_of_2(k.shape[1]),
        BLOCK_HALF=triton.next_power_of_2(half),
        num_warps=4 if q.is_cuda else 1,
    )
