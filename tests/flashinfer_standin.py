"""A stand-in for the ``flashinfer`` package on machines without it (the CPU tests).

It implements the two wrappers aiolm's flashinfer backend uses, with the same ``plan`` /
``run`` signatures and page-table semantics, in plain float32 torch:
``BatchPrefillWithPagedKVCacheWrapper`` (causal, aligned to the end of each sequence) and
``BatchDecodeWithPagedKVCacheWrapper``. Tests put it in ``sys.modules["flashinfer"]``.
Each wrapper counts its ``run`` calls so a test can tell which kernels a pass used.

Like flashinfer's SM90 paged prefill, ``run`` gathers the page indices of each request's
whole last KV tile (``TILE_KV`` entries) before masking: an indices tensor too short for
that raises ``IndexError`` here, where the GPU kernel reads past the tensor.
"""

from __future__ import annotations

import types

import torch

__version__ = "stand-in"
# The KV tile of flashinfer's SM90 paged prefill for head dims 64 and 128.
TILE_KV = 96


class _PagedWrapper:
    causal = False

    def __init__(self, workspace: torch.Tensor, layout: str = "NHD", **_graph_options) -> None:
        if layout != "NHD":
            raise ValueError(f"layout: the stand-in knows NHD only, got {layout!r}")
        self.runs = 0
        self._plan: tuple | None = None

    def _set_plan(self, qo_indptr, kv_indptr, kv_indices, last_page_len, page_size,
                  sm_scale) -> None:
        if page_size != 1 or not bool((last_page_len == 1).all()):
            raise ValueError("the stand-in supports page size 1 only")
        self._plan = (qo_indptr.tolist(), kv_indptr.tolist(), kv_indices, sm_scale)

    def run(self, q: torch.Tensor, paged_kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if self._plan is None:
            raise RuntimeError("plan() before run()")
        qo_indptr, kv_indptr, kv_indices, scale = self._plan
        k_pages, v_pages = paged_kv
        out = torch.empty_like(q)
        group = q.shape[1] // k_pages.shape[2]
        for i in range(len(kv_indptr) - 1):
            start, n = kv_indptr[i], kv_indptr[i + 1] - kv_indptr[i]
            tile_end = start + -(-n // TILE_KV) * TILE_KV
            if tile_end > kv_indices.numel():
                raise IndexError(
                    f"page indices {start}..{tile_end} of request {i} gathered (a whole KV "
                    f"tile), but the indices tensor has {kv_indices.numel()} entries")
            pages = kv_indices[start:tile_end][:n].long()
            k = k_pages[pages, 0].float().repeat_interleave(group, dim=1)  # [S, Hq, D]
            v = v_pages[pages, 0].float().repeat_interleave(group, dim=1)
            rows = slice(qo_indptr[i], qo_indptr[i + 1])
            qi = q[rows].float()
            scores = torch.einsum("thd,shd->hts", qi, k) * scale
            if self.causal:
                n_q, n_kv = qi.shape[0], k.shape[0]
                allowed = (torch.arange(n_kv)[None, :]
                           <= torch.arange(n_q)[:, None] + (n_kv - n_q))
                scores = scores.masked_fill(~allowed.to(scores.device), float("-inf"))
            out[rows] = torch.einsum("hts,shd->thd", scores.softmax(-1), v).to(q.dtype)
        self.runs += 1
        return out


class BatchPrefillWithPagedKVCacheWrapper(_PagedWrapper):
    def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len,
             num_qo_heads, num_kv_heads, head_dim, page_size, *, causal=False, sm_scale=None,
             q_data_type=None, kv_data_type=None) -> None:
        self.causal = causal
        self._set_plan(qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len,
                       page_size, head_dim ** -0.5 if sm_scale is None else sm_scale)


class BatchDecodeWithPagedKVCacheWrapper(_PagedWrapper):
    def plan(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim,
             page_size, *, q_data_type=None, kv_data_type=None, sm_scale=None) -> None:
        bs = len(indptr) - 1
        self._set_plan(torch.arange(bs + 1), indptr, indices, last_page_len, page_size,
                       head_dim ** -0.5 if sm_scale is None else sm_scale)


def as_module() -> types.ModuleType:
    """This stand-in as a module object to install as ``sys.modules["flashinfer"]``."""
    module = types.ModuleType("flashinfer")
    module.__version__ = __version__
    module.BatchPrefillWithPagedKVCacheWrapper = BatchPrefillWithPagedKVCacheWrapper
    module.BatchDecodeWithPagedKVCacheWrapper = BatchDecodeWithPagedKVCacheWrapper
    return module
