"""Triton kernels for attention over the token-slot KV pool (page size 1).

Three jobs, each a Triton kernel plus a thin launcher:

- ``store_kv``: write the new tokens' K and V into the pool rows ``out_cache_loc``.
- ``extend_attention``: new tokens of each request attend to the request's whole sequence
  (cached prefix and the new tokens themselves, causally), gathered from the pool through
  ``req_to_token``. The new tokens' K/V are stored first, so one loop covers both.
- ``decode_attention``: one query token per request over its sequence, flash-decoding
  style: stage 1 splits each sequence into ``num_splits`` chunks (one program per request,
  KV head and chunk, the whole GQA group of query heads in one tile); stage 2 merges the
  chunks' partial outputs by their log-sum-exp.

All arithmetic accumulates in float32; inputs are bf16 or fp16 (float32 works too).
Softmax runs in base 2 (``exp2``) with the scale folded into ``LOG2E``.

Nothing here uses Triton APIs newer than 3.0, and every kernel runs under the interpreter
(``TRITON_INTERPRET=1``) on CPU tensors, which is how the CPU tests check them.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

__all__ = [
    "KernelConfig",
    "decode_attention",
    "decode_attention_shared",
    "decode_chunk_size",
    "decode_heads",
    "extend_attention",
    "fill_kv_indices",
    "kernel_config",
    "plan_decode_splits",
    "plan_shared_splits",
    "store_kv",
]

LOG2E = 1.4426950408889634
#: The entries of a request's scratch the shared-prefix decode's merge tile covers (its own
#: splits and its group's): one compiled merge kernel for any split counts up to it.
SHARED_ENTRIES = 64


class KernelConfig:
    """Tile sizes and launch shapes for one device (plain values; see ``kernel_config``)."""

    def __init__(self, *, extend_block_m: int, extend_block_n: int, extend_warps: int,
                 extend_stages: int, decode_block_n: int, decode_warps: int,
                 decode_stages: int, decode_min_chunk: int, dot_f32: bool,
                 decode_heads: int = 1, extend_grouped_max: int = 64,
                 extend_grouped_rows: int = 64, extend_grouped_warps: int = 4) -> None:
        self.extend_block_m = extend_block_m
        self.extend_block_n = extend_block_n
        self.extend_warps = extend_warps
        self.extend_stages = extend_stages
        self.decode_block_n = decode_block_n
        self.decode_warps = decode_warps
        self.decode_stages = decode_stages
        self.decode_min_chunk = decode_min_chunk
        # KV heads one decode program reads (each token's K/V of all of them in one row).
        self.decode_heads = decode_heads
        # Extends of at most this many new tokens a request go to the grouped kernel: rows
        # of (token, query head of one KV head), this many rows a program (0: never).
        self.extend_grouped_max = extend_grouped_max
        self.extend_grouped_rows = extend_grouped_rows
        self.extend_grouped_warps = extend_grouped_warps
        # NOTE: the CPU interpreter multiplies bf16 tiles wrongly (triton 3.9, seen 2026-11):
        # there, tiles are upcast to float32 before ``tl.dot``. GPUs multiply the inputs as is.
        self.dot_f32 = dot_f32


def kernel_config(device: torch.device, head_dim: int,
                  dtype: torch.dtype = torch.bfloat16) -> KernelConfig:
    """Tile sizes for ``device``: large tiles on a GPU, small ones for the CPU interpreter."""
    if device.type != "cuda":
        return KernelConfig(extend_block_m=16, extend_block_n=16, extend_warps=1,
                            extend_stages=1, decode_block_n=16, decode_warps=1,
                            decode_stages=1, decode_min_chunk=16, dot_f32=True,
                            extend_grouped_rows=16, extend_grouped_warps=1)
    # float32 tiles take twice the registers and shared memory: halve them.
    wide = head_dim > 128 or dtype == torch.float32
    # AIOLM_DECODE_HEADS=N: decode programs read N KV heads each (an experiment's override;
    # benchmarks/gpu_decode_tune.py measures it).
    heads = os.environ.get("AIOLM_DECODE_HEADS", "").strip()
    if heads and (not heads.isdigit() or int(heads) < 1):
        raise ValueError(f"AIOLM_DECODE_HEADS: expected a positive integer, got {heads!r}")
    return KernelConfig(
        extend_block_m=64 if wide else 128,
        extend_block_n=32 if wide else 64,
        extend_warps=8 if head_dim >= 128 else 4,
        extend_stages=2,
        decode_block_n=32 if wide else 64,
        # Two warps: faster than four at every decode shape swept on nvidia-h200
        # (benchmarks/gpu_decode_tune.py: batch 1 -3%, batch 64 -10%, LLaVA's 32 KV heads
        # -11%, shared-prefix -21%; docs/benchmarks/gpu-h200-decode-tune.json).
        decode_warps=4 if wide else 2,
        decode_stages=2,
        decode_min_chunk=64,
        dot_f32=False,
        decode_heads=int(heads) if heads else 1,
        extend_grouped_rows=32 if wide else 64,
    )


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(n))


def _dot_f32(cfg: KernelConfig, k_buf: torch.Tensor) -> bool:
    # float32 pools multiply in exact float32 ("ieee"), not tf32.
    return cfg.dot_f32 or k_buf.dtype == torch.float32


@triton.jit
def _dot(a, b, F32: tl.constexpr):
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _attend_tiles(q, KBuf, VBuf, slot_row, k_off, v_off, c_mask, start, end, stride_kbs,
                  stride_vbs, qk_scale, ROWS: tl.constexpr, COLS: tl.constexpr,
                  BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr):
    # Online softmax (base 2) of the query rows q [ROWS, COLS] over tokens [start, end), each
    # visible to every row (extend's keys before its query block, decode's chunks), whose
    # slots are at slot_row; column c of a token's K (V) is at k_off[c] (v_off[c]) from its
    # slot's row: a KV head and a dimension. Returns the unnormalized output [ROWS, COLS],
    # each row's running max and its sum of exponentials.
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, COLS], tl.float32)
    for s in range(start, end, BLOCK_N):
        cols = s + offs_n
        n_mask = cols < end
        slots = tl.load(slot_row + cols, mask=n_mask, other=0).to(tl.int64)
        k = tl.load(KBuf + slots[None, :] * stride_kbs + k_off[:, None],
                    mask=n_mask[None, :] & c_mask[:, None], other=0.0)
        qk = _dot(q, k, DOT_F32) * qk_scale
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(VBuf + slots[:, None] * stride_vbs + v_off[None, :],
                    mask=n_mask[:, None] & c_mask[None, :], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_F32)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attend_causal_tiles(acc, m_i, l_i, q, q_pos, KBuf, VBuf, slot_row, k_off, v_off, c_mask,
                         start, end, stride_kbs, stride_vbs, qk_scale,
                         BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr):
    # The online softmax of _attend_tiles carried on over tokens [start, end) that each
    # query row sees only up to its own position q_pos (extend's diagonal tiles).
    offs_n = tl.arange(0, BLOCK_N)
    for s in range(start, end, BLOCK_N):
        cols = s + offs_n
        n_mask = cols < end
        slots = tl.load(slot_row + cols, mask=n_mask, other=0).to(tl.int64)
        k = tl.load(KBuf + slots[None, :] * stride_kbs + k_off[:, None],
                    mask=n_mask[None, :] & c_mask[:, None], other=0.0)
        qk = _dot(q, k, DOT_F32) * qk_scale
        visible = n_mask[None, :] & (cols[None, :] <= q_pos[:, None])
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(VBuf + slots[:, None] * stride_vbs + v_off[None, :],
                    mask=n_mask[:, None] & c_mask[None, :], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_F32)
        m_i = m_new
    return acc, m_i, l_i


# --------------------------------------------------------------------------- store


@triton.jit
def _store_kv_kernel(K, V, KBuf, VBuf, Loc,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_kbs, stride_kbh, stride_vbs, stride_vbh,
                     NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(Loc + t).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_HEADS) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(V + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    tl.store(KBuf + slot * stride_kbs + offs_h[:, None] * stride_kbh + offs_d[None, :],
             k.to(KBuf.dtype.element_ty), mask=mask)
    tl.store(VBuf + slot * stride_vbs + offs_h[:, None] * stride_vbh + offs_d[None, :],
             v.to(VBuf.dtype.element_ty), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
             loc: torch.Tensor) -> None:
    """``k_buf[loc] = k; v_buf[loc] = v`` in one launch (``k``: [T, H, D], last dim contiguous)."""
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k, v, k_buf, v_buf, loc,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4 if k.is_cuda else 1,
    )


# --------------------------------------------------------------------------- extend


@triton.jit
def _attend_extend(q, q_pos, KBuf, VBuf, slot_row, k_off, v_off, c_mask, full_end, kv_end,
                   stride_kbs, stride_vbs, qk_scale, ROWS: tl.constexpr, COLS: tl.constexpr,
                   BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr):
    # Both extend kernels' attention of a block of query rows (at positions q_pos): keys
    # [0, full_end), before the block's first query, are visible to every row (no causal
    # mask, only the bound at the end); keys [full_end, kv_end) each row sees up to its
    # own position. Returns the normalized output [ROWS, COLS].
    acc, m_i, l_i = _attend_tiles(
        q, KBuf, VBuf, slot_row, k_off, v_off, c_mask, 0, full_end, stride_kbs, stride_vbs,
        qk_scale, ROWS=ROWS, COLS=COLS, BLOCK_N=BLOCK_N, DOT_F32=DOT_F32)
    acc, m_i, l_i = _attend_causal_tiles(
        acc, m_i, l_i, q, q_pos, KBuf, VBuf, slot_row, k_off, v_off, c_mask, full_end, kv_end,
        stride_kbs, stride_vbs, qk_scale, BLOCK_N=BLOCK_N, DOT_F32=DOT_F32)
    return acc / l_i[:, None]


@triton.jit
def _extend_kernel(Q, Out, KBuf, VBuf, ReqToToken, ReqPoolIdx, PrefixLens, ExtendLens, QStart,
                   stride_qt, stride_qh, stride_ot, stride_oh,
                   stride_kbs, stride_kbh, stride_vbs, stride_vbh, stride_r2t,
                   qk_scale,
                   KV_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    m_block = tl.program_id(2)
    ext_len = tl.load(ExtendLens + b)
    if m_block * BLOCK_M >= ext_len:
        return
    prefix = tl.load(PrefixLens + b)
    q_start = tl.load(QStart + b)
    row = tl.load(ReqPoolIdx + b).to(tl.int64)
    kvh = h // KV_GROUP

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < ext_len
    d_mask = offs_d < HEAD_DIM
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(Q + q_rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    q_pos = prefix + offs_m  # position of each query in its sequence

    out = _attend_extend(q, q_pos, KBuf, VBuf, ReqToToken + row * stride_r2t,
                         kvh * stride_kbh + offs_d, kvh * stride_vbh + offs_d, d_mask,
                         prefix + m_block * BLOCK_M,
                         tl.minimum(prefix + (m_block + 1) * BLOCK_M, prefix + ext_len),
                         stride_kbs, stride_vbs, qk_scale, ROWS=BLOCK_M, COLS=BLOCK_D,
                         BLOCK_N=BLOCK_N, DOT_F32=DOT_F32)
    tl.store(Out + q_rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


@triton.jit
def _extend_grouped_kernel(Q, Out, KBuf, VBuf, ReqToToken, ReqPoolIdx, PrefixLens, ExtendLens,
                           QStart, stride_qt, stride_qh, stride_ot, stride_oh,
                           stride_kbs, stride_kbh, stride_vbs, stride_vbh, stride_r2t,
                           qk_scale,
                           KV_GROUP: tl.constexpr, GROUP_P: tl.constexpr,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr):
    # Short extends (jump-forward's forced tokens, decode steps riding along): a program
    # takes BLOCK_T new tokens of one request with all KV_GROUP query heads of one KV head,
    # row r = token r // GROUP_P, head r % GROUP_P, so each K/V tile it reads serves the
    # whole group (the per-head kernel reads it once per query head).
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    t_block = tl.program_id(2)
    ext_len = tl.load(ExtendLens + b)
    if t_block * BLOCK_T >= ext_len:
        return
    prefix = tl.load(PrefixLens + b)
    q_start = tl.load(QStart + b)
    row = tl.load(ReqPoolIdx + b).to(tl.int64)

    offs_r = tl.arange(0, BLOCK_T * GROUP_P)
    offs_t = t_block * BLOCK_T + offs_r // GROUP_P
    in_group = offs_r % GROUP_P
    heads = kvh * KV_GROUP + in_group
    offs_d = tl.arange(0, BLOCK_D)
    r_mask = (offs_t < ext_len) & (in_group < KV_GROUP)
    d_mask = offs_d < HEAD_DIM
    q_rows = (q_start + offs_t).to(tl.int64)
    q = tl.load(Q + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=r_mask[:, None] & d_mask[None, :], other=0.0)
    q_pos = prefix + offs_t

    out = _attend_extend(q, q_pos, KBuf, VBuf, ReqToToken + row * stride_r2t,
                         kvh * stride_kbh + offs_d, kvh * stride_vbh + offs_d, d_mask,
                         prefix + t_block * BLOCK_T,
                         tl.minimum(prefix + (t_block + 1) * BLOCK_T, prefix + ext_len),
                         stride_kbs, stride_vbs, qk_scale, ROWS=BLOCK_T * GROUP_P,
                         COLS=BLOCK_D, BLOCK_N=BLOCK_N, DOT_F32=DOT_F32)
    tl.store(Out + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=r_mask[:, None] & d_mask[None, :])


def extend_attention(q: torch.Tensor, o: torch.Tensor, k_buf: torch.Tensor,
                     v_buf: torch.Tensor, req_to_token: torch.Tensor,
                     req_pool_indices: torch.Tensor, prefix_lens: torch.Tensor,
                     extend_lens: torch.Tensor, q_start: torch.Tensor, max_extend_len: int,
                     scale: float, cfg: KernelConfig) -> None:
    """Causal attention of the new tokens over their whole sequences; writes ``o``.

    ``q``/``o``: [num_tokens, Hq, D]; ``prefix_lens``/``extend_lens``/``q_start``: [bs] int32
    on the device (``q_start[i]`` = first row of request ``i`` in ``q``); the K/V of the new
    tokens must already be in the pool. ``max_extend_len`` (a host int) sizes the grid.
    """
    bs = int(req_pool_indices.shape[0])
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    group = num_q_heads // k_buf.shape[1]
    if bs == 0 or max_extend_len == 0:
        return
    # Both kernels take the same tensors and strides.
    args = (q, o, k_buf, v_buf, req_to_token, req_pool_indices, prefix_lens, extend_lens,
            q_start, q.stride(0), q.stride(1), o.stride(0), o.stride(1),
            k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1),
            req_to_token.stride(0), scale * LOG2E)
    shape = dict(KV_GROUP=group, HEAD_DIM=head_dim, BLOCK_D=_pow2(head_dim),
                 DOT_F32=_dot_f32(cfg, k_buf))
    if max_extend_len <= cfg.extend_grouped_max:
        # Few new tokens a request: their query heads grouped by KV head, so the prefix's
        # K/V is read once per KV head rather than once per query head.
        group_p = triton.next_power_of_2(group)
        block_t = max(1, cfg.extend_grouped_rows // group_p)
        grid = (bs, k_buf.shape[1], triton.cdiv(max_extend_len, block_t))
        _extend_grouped_kernel[grid](
            *args, **shape, GROUP_P=group_p, BLOCK_T=block_t, BLOCK_N=cfg.decode_block_n,
            num_warps=cfg.extend_grouped_warps, num_stages=cfg.decode_stages)
        return
    while True:
        grid = (bs, num_q_heads, triton.cdiv(max_extend_len, cfg.extend_block_m))
        try:
            _extend_kernel[grid](
                *args, **shape, BLOCK_M=cfg.extend_block_m, BLOCK_N=cfg.extend_block_n,
                num_warps=cfg.extend_warps, num_stages=cfg.extend_stages)
            return
        except OutOfResources:
            if not _shrink_extend(cfg):
                raise


def _shrink_extend(cfg: KernelConfig) -> bool:
    """Smaller extend tiles after the GPU refused a configuration (shared memory)."""
    if cfg.extend_stages > 1:
        cfg.extend_stages = 1
    elif cfg.extend_block_m > 32:
        cfg.extend_block_m //= 2
        cfg.extend_block_n = max(16, cfg.extend_block_n // 2)
    else:
        return False
    return True


# --------------------------------------------------------------------------- decode


@triton.jit
def _chunk_len(seq_len, num_splits, MIN_CHUNK: tl.constexpr, BLOCK_N: tl.constexpr):
    # Same formula as ``decode_chunk_size`` on the host: ceil(seq / splits), at least
    # MIN_CHUNK, rounded up to whole BLOCK_N tiles.
    chunk = tl.maximum(tl.cdiv(seq_len, num_splits), MIN_CHUNK)
    return tl.cdiv(chunk, BLOCK_N) * BLOCK_N


def decode_chunk_size(seq_len: int, num_splits: int, min_chunk: int, block_n: int) -> int:
    """Tokens per split for a sequence of ``seq_len`` (the kernels compute the same)."""
    chunk = max(-(-seq_len // num_splits), min_chunk)
    return -(-chunk // block_n) * block_n


# The split counts and group widths change from pass to pass: one compiled kernel for all
# (Triton would otherwise compile a variant for a count of 1 and for multiples of 16).
@triton.jit(do_not_specialize=["num_splits"])
def _decode_stage1_kernel(Q, KBuf, VBuf, ReqToToken, ReqPoolIdx, SeqLens, PrefixLens, MidO,
                          MidLse,
                          stride_qb, stride_qh, stride_kbs, stride_kbh, stride_vbs,
                          stride_vbh, stride_r2t, stride_mob, stride_moh, stride_mos,
                          stride_mlb, stride_mlh,
                          qk_scale, num_splits,
                          KV_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, HEADS: tl.constexpr,
                          BLOCK_N: tl.constexpr, MIN_CHUNK: tl.constexpr,
                          DOT_F32: tl.constexpr, HAS_PREFIX: tl.constexpr):
    # One program: one request, HEADS KV heads (their query heads as BLOCK_H rows), one
    # chunk. With several KV heads a program reads each token's K/V of all of them in one
    # contiguous row; each query row holds its query in its own KV head's columns and zeros
    # elsewhere, so one product gives every row the scores of its own head, and each row
    # keeps only its head's columns of the output.
    b = tl.program_id(0)
    hb = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SeqLens + b)
    if HAS_PREFIX:
        # The shared prefix [0, PrefixLens[b]) is _decode_shared_kernel's: split the rest.
        first = tl.load(PrefixLens + b)
        chunk = _chunk_len(seq_len - first, num_splits, MIN_CHUNK, BLOCK_N)
        start = first + split * chunk
    else:
        chunk = _chunk_len(seq_len, num_splits, MIN_CHUNK, BLOCK_N)
        start = split * chunk
    end = tl.minimum(start + chunk, seq_len)
    if start >= end:
        return
    row = tl.load(ReqPoolIdx + b).to(tl.int64)

    offs_r = tl.arange(0, BLOCK_H)
    if HEADS == 1:
        # One KV head: plain ranges (the compiler sees the head's dimensions contiguous).
        r_mask = offs_r < KV_GROUP
        heads = hb * KV_GROUP + offs_r
        d = tl.arange(0, BLOCK_D)
        c_mask = d < HEAD_DIM
        k_off = hb * stride_kbh + d
        v_off = hb * stride_vbh + d
        diag = r_mask[:, None] & c_mask[None, :]
    else:
        r_kv = offs_r // KV_GROUP                 # which of the program's KV heads
        r_mask = r_kv < HEADS
        heads = (hb * HEADS + r_kv) * KV_GROUP + offs_r % KV_GROUP
        offs_c = tl.arange(0, HEADS * BLOCK_D)
        c_kv = offs_c // BLOCK_D
        d = offs_c % BLOCK_D
        c_mask = d < HEAD_DIM
        kv = hb * HEADS + c_kv
        k_off = kv * stride_kbh + d
        v_off = kv * stride_vbh + d
        diag = r_mask[:, None] & (r_kv[:, None] == c_kv[None, :]) & c_mask[None, :]
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=diag,
                other=0.0)
    acc, m_i, l_i = _attend_tiles(
        q, KBuf, VBuf, ReqToToken + row * stride_r2t, k_off, v_off, c_mask, start, end,
        stride_kbs, stride_vbs, qk_scale, ROWS=BLOCK_H, COLS=HEADS * BLOCK_D,
        BLOCK_N=BLOCK_N, DOT_F32=DOT_F32)

    out = acc / l_i[:, None]
    tl.store(MidO + b * stride_mob + heads[:, None] * stride_moh + split * stride_mos
             + d[None, :], out, mask=diag)
    # log2-sum-exp2 of this chunk's scores (base 2, like the scores themselves).
    tl.store(MidLse + b * stride_mlb + heads * stride_mlh + split, m_i + tl.log2(l_i),
             mask=r_mask)


@triton.jit(do_not_specialize=["num_splits", "num_shared"])
def _decode_stage2_kernel(MidO, MidLse, Out, SeqLens, PrefixLens,
                          stride_mob, stride_moh, stride_mos, stride_mlb, stride_mlh,
                          stride_ob, stride_oh, num_splits, num_shared,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr,
                          MIN_CHUNK: tl.constexpr, HAS_PREFIX: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(SeqLens + b)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    # A split holds data only if it starts inside its range; the others were never written.
    if HAS_PREFIX:
        # Entries [0, num_splits) cover [first, seq_len); the next num_shared entries the
        # shared prefix [0, first) (written by _decode_shared_kernel; none when first is 0).
        first = tl.load(PrefixLens + b)
        chunk = _chunk_len(seq_len - first, num_splits, MIN_CHUNK, BLOCK_N)
        shared_chunk = _chunk_len(first, num_shared, MIN_CHUNK, BLOCK_N)
        j = offs_s - num_splits
        s_mask = ((offs_s < num_splits) & (offs_s * chunk < seq_len - first)) | (
            (offs_s >= num_splits) & (j < num_shared) & (j * shared_chunk < first))
    else:
        chunk = _chunk_len(seq_len, num_splits, MIN_CHUNK, BLOCK_N)
        s_mask = (offs_s < num_splits) & (offs_s * chunk < seq_len)
    d_mask = offs_d < HEAD_DIM
    lse = tl.load(MidLse + b * stride_mlb + h * stride_mlh + offs_s, mask=s_mask,
                  other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.exp2(lse - m)
    w = tl.where(s_mask, w, 0.0)
    parts = tl.load(MidO + b * stride_mob + h * stride_moh + offs_s[:, None] * stride_mos
                    + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.sum(w, 0)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty),
             mask=d_mask)


def decode_attention(q: torch.Tensor, o: torch.Tensor, k_buf: torch.Tensor,
                     v_buf: torch.Tensor, req_to_token: torch.Tensor,
                     req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                     mid_o: torch.Tensor, mid_lse: torch.Tensor, num_splits: int,
                     scale: float, cfg: KernelConfig) -> None:
    """Attention of one query per request over its sequence (split-K + merge); writes ``o``.

    ``q``/``o``: [bs, Hq, D]; ``mid_o``: float32 [>=bs, Hq, S, D] and ``mid_lse``: float32
    [>=bs, Hq, S] scratch with ``S >= num_splits``. Reads only device tensors, so the two
    launches can be captured in a CUDA graph and replayed with new lengths.
    """
    if q.shape[0] == 0:
        return
    if num_splits > mid_o.shape[2]:
        raise ValueError(f"num_splits: {num_splits} exceeds the scratch's {mid_o.shape[2]}")
    while True:
        try:
            _stage1(q, k_buf, v_buf, req_to_token, req_pool_indices, seq_lens, None, mid_o,
                    mid_lse, num_splits, scale, cfg)
            break
        except OutOfResources:
            # Both stages read the tile size (the chunk boundaries): shrink before stage 2.
            if cfg.decode_stages > 1:
                cfg.decode_stages = 1
            elif cfg.decode_block_n > 16:
                cfg.decode_block_n //= 2
            else:
                raise
    _stage2(mid_o, mid_lse, o, seq_lens, None, num_splits, 0, cfg)


def decode_heads(cfg: KernelConfig, num_kv_heads: int) -> int:
    """The KV heads one decode program reads for a model of ``num_kv_heads``: the config's
    ``decode_heads``, halved until it divides them."""
    heads = max(1, cfg.decode_heads)
    while heads > 1 and num_kv_heads % heads:
        heads //= 2
    return heads


def _stage1(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
            req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
            prefix_lens: torch.Tensor | None, mid_o: torch.Tensor, mid_lse: torch.Tensor,
            num_splits: int, scale: float, cfg: KernelConfig) -> None:
    bs, num_q_heads, head_dim = q.shape
    num_kv_heads = k_buf.shape[1]
    group = num_q_heads // num_kv_heads
    heads = decode_heads(cfg, num_kv_heads)
    _decode_stage1_kernel[(bs, num_kv_heads // heads, num_splits)](
        q, k_buf, v_buf, req_to_token, req_pool_indices, seq_lens,
        prefix_lens if prefix_lens is not None else seq_lens, mid_o, mid_lse,
        q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1), v_buf.stride(0),
        v_buf.stride(1), req_to_token.stride(0), mid_o.stride(0), mid_o.stride(1),
        mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        scale * LOG2E, num_splits,
        KV_GROUP=group, HEAD_DIM=head_dim, BLOCK_D=_pow2(head_dim),
        BLOCK_H=_pow2(group * heads), HEADS=heads,
        BLOCK_N=cfg.decode_block_n, MIN_CHUNK=cfg.decode_min_chunk,
        DOT_F32=_dot_f32(cfg, k_buf), HAS_PREFIX=prefix_lens is not None,
        num_warps=cfg.decode_warps, num_stages=cfg.decode_stages,
    )


def _stage2(mid_o: torch.Tensor, mid_lse: torch.Tensor, o: torch.Tensor,
            seq_lens: torch.Tensor, prefix_lens: torch.Tensor | None, num_splits: int,
            num_shared: int, cfg: KernelConfig, block_s: int | None = None) -> None:
    bs, num_q_heads, head_dim = o.shape
    _decode_stage2_kernel[(bs, num_q_heads)](
        mid_o, mid_lse, o, seq_lens, prefix_lens if prefix_lens is not None else seq_lens,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0),
        mid_lse.stride(1), o.stride(0), o.stride(1), num_splits, num_shared,
        HEAD_DIM=head_dim, BLOCK_D=_pow2(head_dim),
        BLOCK_S=block_s or triton.next_power_of_2(mid_o.shape[2]),
        BLOCK_N=cfg.decode_block_n, MIN_CHUNK=cfg.decode_min_chunk,
        HAS_PREFIX=prefix_lens is not None, num_warps=4 if o.is_cuda else 1,
    )


# ----------------------------------------------------------- shared-prefix decode


@triton.jit(do_not_specialize=["num_splits", "num_shared", "members"])
def _decode_shared_kernel(Q, KBuf, VBuf, ReqToToken, ReqPoolIdx, GroupRows, GroupLens, MidO,
                          MidLse,
                          stride_qb, stride_qh, stride_kbs, stride_kbh, stride_vbs,
                          stride_vbh, stride_r2t, stride_gr, stride_mob, stride_moh,
                          stride_mos, stride_mlb, stride_mlh,
                          qk_scale, num_splits, num_shared, members,
                          KV_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, MIN_CHUNK: tl.constexpr,
                          DOT_F32: tl.constexpr):
    # One program: one group of requests sharing a prefix, one KV head, one chunk of the
    # prefix. Each K/V tile is read once for every member's queries (rows: member-major,
    # then the KV head's query heads); the partial results go to each member's entry
    # num_splits + split, merged by stage 2 with the member's own suffix.
    g = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    shared_len = tl.load(GroupLens + g)
    chunk = _chunk_len(shared_len, num_shared, MIN_CHUNK, BLOCK_N)
    start = split * chunk
    end = tl.minimum(start + chunk, shared_len)
    if start >= end:
        return
    offs_r = tl.arange(0, BLOCK_M * BLOCK_H)
    member = offs_r // BLOCK_H
    hg = offs_r % BLOCK_H
    b = tl.load(GroupRows + g * stride_gr + member, mask=member < members, other=-1)
    r_mask = (b >= 0) & (hg < KV_GROUP)
    b = tl.where(r_mask, b, 0).to(tl.int64)
    heads = kvh * KV_GROUP + hg
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(Q + b[:, None] * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=r_mask[:, None] & d_mask[None, :], other=0.0)
    # The prefix's slots are the same in every member's row: read the first member's.
    lead = tl.load(GroupRows + g * stride_gr).to(tl.int64)
    slot_row = ReqToToken + tl.load(ReqPoolIdx + lead).to(tl.int64) * stride_r2t
    acc, m_i, l_i = _attend_tiles(
        q, KBuf, VBuf, slot_row, kvh * stride_kbh + offs_d, kvh * stride_vbh + offs_d, d_mask,
        start, end, stride_kbs, stride_vbs, qk_scale, ROWS=BLOCK_M * BLOCK_H, COLS=BLOCK_D,
        BLOCK_N=BLOCK_N, DOT_F32=DOT_F32)

    out = acc / l_i[:, None]
    entry = num_splits + split
    tl.store(MidO + b[:, None] * stride_mob + heads[:, None] * stride_moh + entry * stride_mos
             + offs_d[None, :], out, mask=r_mask[:, None] & d_mask[None, :])
    tl.store(MidLse + b * stride_mlb + heads * stride_mlh + entry, m_i + tl.log2(l_i),
             mask=r_mask)


def decode_attention_shared(q: torch.Tensor, o: torch.Tensor, k_buf: torch.Tensor,
                            v_buf: torch.Tensor, req_to_token: torch.Tensor,
                            req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                            prefix_lens: torch.Tensor, group_rows: torch.Tensor,
                            group_lens: torch.Tensor, mid_o: torch.Tensor,
                            mid_lse: torch.Tensor, num_splits: int, num_shared: int,
                            scale: float, cfg: KernelConfig) -> None:
    """:func:`decode_attention` for a batch whose requests share prefixes (cascade
    attention): each group's shared prefix is read once for all its members.

    ``prefix_lens`` int32 [bs]: the shared prefix of request ``b`` (0: none), whose slots
    ``req_to_token[req_pool_indices[b], :prefix_lens[b]]`` are the same as every other
    member's of its group; ``group_rows`` int32 [G, M]: each group's members (batch
    indices, the first one real, -1 padding); ``group_lens`` int32 [G]: each group's shared
    length (its members' ``prefix_lens``). ``mid_o`` / ``mid_lse``: float32 scratch
    [bs, Hq, >= num_splits + num_shared(, D)]: ``num_splits`` entries for each request's
    own part, ``num_shared`` for its group's prefix. Gives ``decode_attention``'s result
    up to the summation order.
    """
    bs, num_q_heads, head_dim = q.shape
    num_kv_heads = k_buf.shape[1]
    group = num_q_heads // num_kv_heads
    if bs == 0:
        return
    if num_splits + num_shared > mid_o.shape[2]:
        raise ValueError(f"num_splits + num_shared: {num_splits + num_shared} exceeds the "
                         f"scratch's {mid_o.shape[2]}")
    groups, members = group_rows.shape
    block_h = _pow2(group, floor=1)
    block_m = max(triton.next_power_of_2(members), -(-16 // block_h))
    while True:
        try:
            _stage1(q, k_buf, v_buf, req_to_token, req_pool_indices, seq_lens, prefix_lens,
                    mid_o, mid_lse, num_splits, scale, cfg)
            if groups:
                _decode_shared_kernel[(groups, num_kv_heads, num_shared)](
                    q, k_buf, v_buf, req_to_token, req_pool_indices, group_rows, group_lens,
                    mid_o, mid_lse,
                    q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1),
                    v_buf.stride(0), v_buf.stride(1), req_to_token.stride(0),
                    group_rows.stride(0), mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
                    mid_lse.stride(0), mid_lse.stride(1),
                    scale * LOG2E, num_splits, num_shared, members,
                    KV_GROUP=group, HEAD_DIM=head_dim, BLOCK_D=_pow2(head_dim),
                    BLOCK_H=block_h, BLOCK_M=block_m, BLOCK_N=cfg.decode_block_n,
                    MIN_CHUNK=cfg.decode_min_chunk, DOT_F32=_dot_f32(cfg, k_buf),
                    num_warps=cfg.decode_warps, num_stages=cfg.decode_stages,
                )
            break
        except OutOfResources:
            # Every launch reads the tile size (the chunk boundaries): shrink, run all again.
            if cfg.decode_stages > 1:
                cfg.decode_stages = 1
            elif cfg.decode_block_n > 16:
                cfg.decode_block_n //= 2
            else:
                raise
    # One tile size for any split counts (up to 64 entries): one compiled kernel.
    _stage2(mid_o, mid_lse, o, seq_lens, prefix_lens, num_splits, num_shared, cfg,
            block_s=triton.next_power_of_2(max(mid_o.shape[2], SHARED_ENTRIES)))


def plan_decode_splits(batch_size: int, num_kv_heads: int, max_seq_len: int | None,
                       num_sms: int, max_splits: int, min_chunk: int, *,
                       programs_per_sm: int = 2) -> int:
    """How many chunks to split each sequence into for a decode batch.

    Enough programs to cover the GPU about twice (``programs_per_sm * num_sms`` over
    ``batch_size * num_kv_heads``), no more than ``max_splits``, and (when ``max_seq_len``
    is known) no more than the longest sequence has ``min_chunk``-token chunks. A
    CUDA-graph capture passes ``max_seq_len=None``: the lengths change at every replay.
    """
    if batch_size < 1 or num_kv_heads < 1:
        raise ValueError("batch_size and num_kv_heads must be positive")
    want = math.ceil(programs_per_sm * num_sms / (batch_size * num_kv_heads))
    if max_seq_len is not None:
        want = min(want, math.ceil(max_seq_len / min_chunk))
    return max(1, min(want, max_splits))


def plan_shared_splits(num_groups: int, num_kv_heads: int, max_shared_len: int | None,
                       num_sms: int, max_splits: int, min_chunk: int) -> int:
    """How many chunks to split each group's shared prefix into (shared-prefix decode).

    A group's program reads its prefix for all its members, so there are few of them (a
    dozen groups of a 64-request batch): :func:`plan_decode_splits`' two programs an SM
    left a few programs on each SM walking 2,340 tokens one after another, at 2.1 TB/s
    (nvidia-h200, benchmarks/gpu_shared_prefix.py). Aim for 16 programs an SM, no chunk
    under ``min_chunk`` tokens. ``max_shared_len`` None (a CUDA-graph capture): the most
    splits; chunks past a shorter prefix's end return at once.
    """
    if num_groups < 1 or num_kv_heads < 1:
        raise ValueError("num_groups and num_kv_heads must be positive")
    if max_shared_len is None:
        return max_splits
    return plan_decode_splits(num_groups, num_kv_heads, max_shared_len, num_sms, max_splits,
                              min_chunk, programs_per_sm=16)


# --------------------------------------------------------------------------- indices


@triton.jit
def _fill_kv_indices_kernel(ReqToToken, ReqPoolIdx, SeqLens, Indptr, Out, stride_r2t,
                            BLOCK: tl.constexpr):
    b = tl.program_id(0)
    row = tl.load(ReqPoolIdx + b).to(tl.int64)
    seq_len = tl.load(SeqLens + b)
    dst = tl.load(Indptr + b).to(tl.int64)
    for start in range(0, seq_len, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < seq_len
        slots = tl.load(ReqToToken + row * stride_r2t + offs, mask=mask)
        tl.store(Out + dst + offs, slots, mask=mask)


def fill_kv_indices(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                    seq_lens: torch.Tensor, indptr: torch.Tensor, out: torch.Tensor) -> None:
    """Concatenate ``req_to_token[req_pool_indices[i], :seq_lens[i]]`` into ``out``.

    Request ``i`` lands at ``out[indptr[i]:indptr[i + 1]]`` (``indptr``: [bs + 1] on the
    device). One launch, no host synchronisation: flashinfer's page table for page size 1.
    """
    bs = int(req_pool_indices.shape[0])
    if bs == 0:
        return
    _fill_kv_indices_kernel[(bs,)](
        req_to_token, req_pool_indices, seq_lens, indptr, out, req_to_token.stride(0),
        BLOCK=512 if out.is_cuda else 16, num_warps=4 if out.is_cuda else 1,
    )
