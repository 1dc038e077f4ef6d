"""Triton kernels of the fused MoE path (:mod:`.fused_moe` describes the method).

- ``_route_kernel``: softmax over one token's router logits, the ``top_k`` largest
  probabilities (lowest expert id first among equals), optionally renormalised.
- ``_align_kernel``: given the assignments sorted by expert, fills the block-aligned
  layout: each output slot finds its expert from the padded per-expert counts (a gather,
  so the slots need no prior fill and programs need no synchronisation).
- ``_moe_gemm_kernel``: one grouped GEMM over the aligned blocks; block ``b`` multiplies
  its rows of ``A`` (``A`` row = assignment id // ``A_ROW_DIV``) by expert
  ``expert_ids[b]``'s ``[N, K]`` weight and writes the rows of ``C`` of its assignment ids,
  optionally scaled by their routing weights. Programs past ``num_padded`` return at once.

Everything runs on the device, with shapes that depend only on the token count: no host
sync, so CUDA graphs capture it. On CPU tensors the kernels run under Triton's interpreter.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .fused import silu_and_mul

__all__ = ["align_by_expert", "fused_experts", "gemm_config", "route"]

_ALIGN_CHUNK = 64


# --------------------------------------------------------------------------- routing


@triton.jit
def _route_kernel(Logits, Weights, Ids, stride_l, num_experts, TOP_K: tl.constexpr,
                  RENORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    valid = cols < num_experts
    x = tl.load(Logits + row * stride_l + cols, mask=valid, other=float("-inf")).to(tl.float32)
    e = tl.exp(x - tl.max(x, axis=0))
    probs = e / tl.sum(e, axis=0)
    probs = tl.where(valid, probs, -1.0)  # below any probability: never chosen
    slots = tl.arange(0, BLOCK_K)
    chosen_w = tl.zeros((BLOCK_K,), dtype=tl.float32)
    chosen_i = tl.zeros((BLOCK_K,), dtype=tl.int32)
    for k in tl.static_range(TOP_K):
        best = tl.max(probs, axis=0)
        index = tl.min(tl.where(probs == best, cols, BLOCK_E), axis=0)
        chosen_w = tl.where(slots == k, best, chosen_w)
        chosen_i = tl.where(slots == k, index, chosen_i)
        probs = tl.where(cols == index, -1.0, probs)
    if RENORMALIZE:
        chosen_w = chosen_w / tl.sum(chosen_w, axis=0)  # the unused slots hold 0
    mask = slots < TOP_K
    tl.store(Weights + row * TOP_K + slots, chosen_w, mask=mask)
    tl.store(Ids + row * TOP_K + slots, chosen_i, mask=mask)


def route(logits: torch.Tensor, top_k: int, renormalize: bool,
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights float32 [M, top_k], ids int32 [M, top_k])`` of ``logits [M, E]``."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    rows, num_experts = logits.shape
    weights = torch.empty(rows, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(rows, top_k, dtype=torch.int32, device=logits.device)
    if rows:
        _route_kernel[(rows,)](
            logits, weights, ids, logits.stride(0), num_experts, TOP_K=top_k,
            RENORMALIZE=renormalize, BLOCK_E=triton.next_power_of_2(num_experts),
            BLOCK_K=triton.next_power_of_2(top_k), num_warps=1 if num_experts <= 256 else 4)
    return weights, ids


# ------------------------------------------------------------------------- alignment


@triton.jit
def _align_kernel(Order, Bounds, SortedIds, ExpertIds, NumPadded, num_assign, num_experts,
                  capacity, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
                  CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    bins = tl.arange(0, BLOCK_E)
    in_range = bins < num_experts
    first = tl.load(Bounds + bins, mask=in_range, other=0).to(tl.int32)
    counts = tl.load(Bounds + bins + 1, mask=in_range, other=0).to(tl.int32) - first
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    slot = pid * CHUNK + tl.arange(0, CHUNK)
    # The slot's expert: how many experts' padded ranges end at or before it (for a slot
    # past the last range, every bin counts: no expert).
    expert = tl.sum((ends[None, :] <= slot[:, None]).to(tl.int32), axis=1)
    own = bins[None, :] == expert[:, None]
    start = tl.sum(tl.where(own, starts[None, :], 0), axis=1)
    first_of = tl.sum(tl.where(own, first[None, :], 0), axis=1)
    count = tl.sum(tl.where(own, counts[None, :], 0), axis=1)
    rank = slot - start
    in_capacity = slot < capacity
    used = (expert < num_experts) & (rank < count) & in_capacity
    source = tl.load(Order + first_of + rank, mask=used, other=0).to(tl.int32)
    tl.store(SortedIds + slot, tl.where(used, source, num_assign), mask=in_capacity)
    block_start = (slot % BLOCK_M == 0) & in_capacity
    tl.store(ExpertIds + slot // BLOCK_M, tl.minimum(expert, num_experts - 1),
             mask=block_start)
    if pid == 0:
        tl.store(NumPadded, tl.sum(padded, axis=0))


def align_capacity(num_assign: int, num_experts: int, block_m: int) -> int:
    """Slots for any routing of ``num_assign`` assignments: each non-empty expert (at most
    ``min(E, n)``) pads its last block by fewer than ``block_m``."""
    bound = num_assign + min(num_experts, num_assign) * (block_m - 1)
    return triton.cdiv(bound, block_m) * block_m


@triton.jit
def _one_token_layout_kernel(SortedIds, NumPadded, num_assign, BLOCK_M: tl.constexpr,
                             BLOCK: tl.constexpr):
    slot = tl.arange(0, BLOCK)
    rank = slot // BLOCK_M
    tl.store(SortedIds + slot, tl.where(slot % BLOCK_M == 0, rank, num_assign),
             mask=slot < num_assign * BLOCK_M)
    tl.store(NumPadded, num_assign * BLOCK_M)


def align_by_expert(ids: torch.Tensor, num_experts: int, block_m: int,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See :func:`aiolm.engine.layers.fused_moe.align_by_expert`."""
    flat = ids.reshape(-1)
    num_assign = flat.numel()
    device = ids.device
    capacity = align_capacity(num_assign, num_experts, block_m)
    sorted_ids = torch.empty(capacity, dtype=torch.int32, device=device)
    if ids.shape[0] == 1 and num_assign <= num_experts:
        # One token (decode at batch 1): its top_k experts are distinct, so each
        # assignment is its own expert's whole block, in k order. One launch instead of
        # the sort, the search and the alignment kernel.
        num_padded = torch.empty(1, dtype=torch.int32, device=device)
        _one_token_layout_kernel[(1,)](sorted_ids, num_padded, num_assign, BLOCK_M=block_m,
                                       BLOCK=triton.next_power_of_2(capacity), num_warps=1)
        return sorted_ids, flat.to(torch.int32), num_padded
    expert_ids = torch.empty(capacity // block_m, dtype=torch.int32, device=device)
    num_padded = torch.zeros(1, dtype=torch.int32, device=device)
    if num_assign == 0:
        return sorted_ids, expert_ids, num_padded
    sorted_experts, order = torch.sort(flat, stable=True)
    # bounds[e]: the first sorted position of expert e (bounds[E] = n).
    bounds = torch.searchsorted(
        sorted_experts, torch.arange(num_experts + 1, dtype=sorted_experts.dtype, device=device))
    _align_kernel[(triton.cdiv(capacity, _ALIGN_CHUNK),)](
        order, bounds, sorted_ids, expert_ids, num_padded, num_assign, num_experts, capacity,
        BLOCK_M=block_m, BLOCK_E=triton.next_power_of_2(num_experts), CHUNK=_ALIGN_CHUNK,
        num_warps=4)
    return sorted_ids, expert_ids, num_padded


# --------------------------------------------------------------------------- grouped GEMM


@triton.jit
def _moe_gemm_kernel(A, B, C, RoutedWeights, SortedIds, ExpertIds, NumPadded,
                     N, K, num_assign, capacity, stride_am, stride_be, stride_bn, stride_cm,
                     A_ROW_DIV: tl.constexpr, MUL_WEIGHT: tl.constexpr, IEEE: tl.constexpr,
                     DOT_F32: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(capacity, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row blocks share each weight tile while it is in L2.
    per_group = GROUP_M * blocks_n
    group_first = (pid // per_group) * GROUP_M
    group_size = tl.minimum(blocks_m - group_first, GROUP_M)
    pid_m = group_first + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    if pid_m * BLOCK_M >= tl.load(NumPadded):
        return
    ids = tl.load(SortedIds + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = ids < num_assign
    expert = tl.load(ExpertIds + pid_m).to(tl.int64)
    a_rows = (ids // A_ROW_DIV).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_bn = (offs_n % N).to(tl.int64)  # in range without a mask; stores are masked
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + a_rows[:, None] * stride_am + offs_k[None, :]
    b_ptrs = B + expert * stride_be + offs_bn[None, :] * stride_bn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptrs)
        else:
            k_ok = offs_k < K - k0
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        if DOT_F32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if MUL_WEIGHT:
        w = tl.load(RoutedWeights + ids, mask=row_ok, other=0.0)
        acc = acc * w[:, None]
    c_ptrs = C + ids.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def gemm_config(num_assign: int, num_experts: int, element_size: int) -> dict[str, int]:
    """Block sizes for ``num_assign`` assignments over ``num_experts`` experts.

    The rows an expert receives on average decide: a few (decode) → 16-row blocks that
    stream each weight tile once, wide along N and K; many (prefill) → 128 x 256 tiles that
    reuse each loaded tile for many rows. Float32 halves the K and N tiles (shared memory).
    """
    per_expert = num_assign / num_experts
    if per_expert <= 8:
        cfg = dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    elif per_expert <= 24:
        cfg = dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3)
    elif per_expert <= 48:
        cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    if element_size >= 4:
        cfg.update(BLOCK_N=min(cfg["BLOCK_N"], 128), BLOCK_K=32, num_stages=2)
    return cfg


def _gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, routed: torch.Tensor | None,
          layout: tuple[torch.Tensor, torch.Tensor, torch.Tensor], num_assign: int,
          a_row_div: int, cfg: dict[str, int]) -> None:
    """``c[id] = a[id // a_row_div] @ b[expert].T`` (x routed[id]) over the aligned blocks."""
    sorted_ids, expert_ids, num_padded = layout
    n, k = b.shape[1], b.shape[2]
    capacity = sorted_ids.numel()
    block_n = min(cfg["BLOCK_N"], max(16, triton.next_power_of_2(n)))
    if cfg["BLOCK_M"] == 16 and a.is_cuda:
        # Decode: few blocks carry rows, so narrow the N tiles until their programs cover
        # the GPU twice over (a 16-row block reads its weight tile once: bandwidth bound).
        busy = min(num_assign, b.shape[0])
        while block_n > 32 and busy * triton.cdiv(n, block_n) < 2 * _sm_count(a.device):
            block_n //= 2
    block_k = min(cfg["BLOCK_K"], max(16, triton.next_power_of_2(k)))
    on_gpu = a.is_cuda
    grid = (triton.cdiv(capacity, cfg["BLOCK_M"]) * triton.cdiv(n, block_n),)
    _moe_gemm_kernel[grid](
        a, b, c, routed if routed is not None else c, sorted_ids, expert_ids, num_padded,
        n, k, num_assign, capacity, a.stride(0), b.stride(0), b.stride(1), c.stride(0),
        A_ROW_DIV=a_row_div, MUL_WEIGHT=routed is not None, IEEE=a.dtype == torch.float32,
        # NOTE: Triton's CPU interpreter multiplies bf16 tiles wrongly (3.9; as in
        # attention/triton_kernels.py): there the tiles are upcast. GPUs multiply them as is.
        DOT_F32=not on_gpu,
        EVEN_K=k % block_k == 0, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=block_n, BLOCK_K=block_k,
        GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps"] if on_gpu else 1,
        num_stages=cfg["num_stages"] if on_gpu else 1)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """See :func:`aiolm.engine.layers.fused_moe.fused_experts` (arguments checked there)."""
    tokens, hidden = x.shape
    num_experts, two_i, _ = w13.shape
    top_k = ids.shape[1]
    num_assign = tokens * top_k
    if tokens == 0:
        return torch.empty_like(x)
    x = x if x.stride(-1) == 1 and x.stride(0) == hidden else x.contiguous()
    cfg = gemm_config(num_assign, num_experts, x.element_size())
    layout = align_by_expert(ids, num_experts, cfg["BLOCK_M"])
    gate_up = torch.empty(num_assign, two_i, dtype=x.dtype, device=x.device)
    _gemm(x, w13, gate_up, None, layout, num_assign, top_k, cfg)
    act = silu_and_mul(gate_up)
    down = torch.empty(num_assign, hidden, dtype=x.dtype, device=x.device)
    routed = weights.reshape(-1).to(torch.float32)
    _gemm(act, w2, down, routed, layout, num_assign, 1, cfg)
    return down.view(tokens, top_k, hidden).sum(dim=1)
