"""Debug checks of every index that reaches a kernel (``AIOLM_DEBUG_CHECKS=1``).

A bad slot id, table row or length does not fail loudly on a GPU: a kernel reads or writes
someone else's memory, or the device faults and takes the whole process (every request
in it) down with an illegal address that says nothing about which index was wrong. With
``AIOLM_DEBUG_CHECKS=1`` in the environment when an engine starts, the runner checks each
:class:`~aiolm.engine.forward_batch.ForwardBatch` on the host before the pass and raises
:class:`DebugCheckError` naming the first bad index:

- ``req_pool_indices``: rows of ``req_to_token`` in range, distinct, and taken (not free);
- lengths: ``1 <= seq_len <= max_context_len``; for an extend, ``prefix + extend ==
  seq_len`` and the new tokens add up to ``num_tokens``; a decode has one token each;
- ``positions``: the new tokens' positions ``prefix .. seq_len - 1`` (past the prompt
  shifted by the request's ``rope_delta`` where ``rope_shifts_cpu`` says so);
- ``input_ids`` inside the vocabulary, but on the rows ``mm_rows`` of a multimodal pass,
  which hold an image's pad ids (>= the vocabulary size) and get ``mm_embeds`` rows, one
  each;
- ``out_cache_loc``: real slots (``1..size``; 0 is padding), distinct, not free in the
  allocator, and exactly the slots the table holds for the new tokens;
- the table: every slot of every sequence ``req_to_token[row, :seq_len]`` real and not free
  (a slot freed while a request still reads it is a use-after-free).

The checks copy the batch's tensors to the host (device syncs): debug builds only, never
the hot path. The test suite runs with them on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .knobs import env_flag

if TYPE_CHECKING:
    from ..cache.pool import ReqToTokenPool, TokenSlotAllocator
    from .forward_batch import ForwardBatch

__all__ = ["DebugCheckError", "check_forward_batch", "debug_checks_enabled"]

ENV_VAR = "AIOLM_DEBUG_CHECKS"


class DebugCheckError(RuntimeError):
    """A batch about to reach the kernels holds an index that would be out of bounds or
    stale. It is an engine bug, never a user error: the message names the index."""


def debug_checks_enabled() -> bool:
    """Whether ``AIOLM_DEBUG_CHECKS`` asks for the checks (``1``, ``true``, ``yes``, ``on``)."""
    return env_flag(ENV_VAR)


def _host(t: torch.Tensor | None) -> list[int]:
    return [] if t is None else t.detach().to("cpu").reshape(-1).tolist()


def check_forward_batch(fb: ForwardBatch, *, allocator: TokenSlotAllocator,
                        req_to_token_pool: ReqToTokenPool, vocab_size: int) -> None:
    """Check every index of ``fb`` (see the module docstring); raises :class:`DebugCheckError`
    naming the first bad one. Reads the tensors (device syncs); mutates nothing."""

    def fail(msg: str) -> None:
        raise DebugCheckError(f"{ENV_VAR}: {msg}")

    bs = fb.batch_size
    rows = _host(fb.req_pool_indices)
    seq_lens = _host(fb.seq_lens)
    for name, n in (("req_pool_indices", len(rows)), ("seq_lens", len(seq_lens)),
                    ("seq_lens_cpu", len(fb.seq_lens_cpu))):
        if n != bs:
            fail(f"{name} has {n} entries for a batch of {bs} requests")
    if seq_lens != list(fb.seq_lens_cpu):
        i = next(i for i, (a, b) in enumerate(zip(seq_lens, fb.seq_lens_cpu, strict=True)) if a != b)
        fail(f"seq_lens[{i}] = {seq_lens[i]} on the device but {fb.seq_lens_cpu[i]} on the host")

    max_rows, max_len = req_to_token_pool.max_requests, req_to_token_pool.max_context_len
    seen_rows: dict[int, int] = {}
    for i, (row, n) in enumerate(zip(rows, seq_lens, strict=True)):
        if not 0 <= row < max_rows:
            fail(f"req_pool_indices[{i}] = {row} is not a req_to_token row (0..{max_rows - 1})")
        if req_to_token_pool.is_free(row):
            fail(f"req_pool_indices[{i}] = {row} is a free req_to_token row")
        if row in seen_rows:
            fail(f"req_pool_indices[{i}] = {row} is also request {seen_rows[row]}'s row")
        seen_rows[row] = i
        if not 1 <= n <= max_len:
            fail(f"seq_lens[{i}] = {n} is outside 1..{max_len} (the table's width)")

    if fb.is_decode:
        prefix, extend = [n - 1 for n in seq_lens], [1] * bs
    else:
        prefix, extend = _host(fb.extend_prefix_lens), _host(fb.extend_seq_lens)
        if len(prefix) != bs or len(extend) != bs:
            fail(f"an extend batch of {bs} requests has {len(prefix)} prefix lengths and "
                 f"{len(extend)} extend lengths")
        for i, (p, e, n) in enumerate(zip(prefix, extend, seq_lens, strict=True)):
            if p < 0 or e < 1 or p + e != n:
                fail(f"request {i}: prefix {p} + extend {e} does not make seq_len {n}")
    num_tokens = fb.num_tokens
    if sum(extend) != num_tokens:
        fail(f"the requests add {sum(extend)} new tokens but the batch has {num_tokens}")

    positions, ids, locs = _host(fb.positions), _host(fb.input_ids), _host(fb.out_cache_loc)
    if len(positions) != num_tokens or len(locs) != num_tokens:
        fail(f"{num_tokens} tokens but {len(positions)} positions and {len(locs)} "
             "out_cache_loc entries")
    mm_rows = set(_host(fb.mm_rows)) if fb.mm_rows is not None else set()
    if fb.mm_rows is not None:
        if fb.mm_embeds is None or fb.mm_embeds.shape[0] != len(fb.mm_rows):
            fail(f"{len(fb.mm_rows)} mm_rows but mm_embeds of shape "
                 f"{None if fb.mm_embeds is None else tuple(fb.mm_embeds.shape)}")
        if len(mm_rows) != len(fb.mm_rows) or not all(0 <= r < num_tokens for r in mm_rows):
            fail(f"mm_rows are not distinct rows of the pass (0..{num_tokens - 1})")
    for k, t in enumerate(ids):
        if k in mm_rows:
            if t < vocab_size:
                fail(f"input_ids[{k}] = {t} is a token id on an image row (a pad id expected)")
        elif not 0 <= t < vocab_size:
            fail(f"input_ids[{k}] = {t} is not a token id (0..{vocab_size - 1})")

    size = allocator.size
    table = req_to_token_pool.req_to_token
    # The sequences' slots, checked as one tensor: a pool holds up to millions of slots.
    seqs = torch.cat([table[row, :n] for row, n in zip(rows, seq_lens, strict=True)]).long()
    starts = [0]
    for n in seq_lens:
        starts.append(starts[-1] + n)

    def locate(flat: int) -> tuple[int, int, int]:
        i = max(r for r in range(bs) if starts[r] <= flat)
        return i, rows[i], flat - starts[i]

    bad = ((seqs < 1) | (seqs > size)).nonzero()
    if bad.numel():
        i, row, j = locate(int(bad[0]))
        fail(f"req_to_token[{row}, {j}] = {int(seqs[int(bad[0])])} (request {i}) is not a KV "
             f"slot (1..{size}; 0 is padding)")
    stale = torch.isin(seqs, allocator.free_slots().to(seqs.device)).nonzero()
    if stale.numel():
        i, row, j = locate(int(stale[0]))
        fail(f"req_to_token[{row}, {j}] = {int(seqs[int(stale[0])])} (request {i}) is a free "
             "KV slot (use after free)")

    seen_slots: dict[int, int] = {}
    k = 0
    shifts = fb.rope_shifts_cpu or [(0, 0)] * bs
    for i, (row, p, e, n) in enumerate(zip(rows, prefix, extend, seq_lens, strict=True)):
        prompt_len, delta = shifts[i]
        wanted = [t + delta if delta and t >= prompt_len else t for t in range(p, n)]
        if positions[k:k + e] != wanted:
            fail(f"request {i}: positions {positions[k:k + e][:8]}... are not "
                 f"{wanted[:8]}...")
        new = _host(table[row, p:n])
        for j in range(e):
            slot = locs[k + j]
            if not 1 <= slot <= size:
                fail(f"out_cache_loc[{k + j}] = {slot} (request {i}) is not a KV slot "
                     f"(1..{size}; 0 is padding)")
            if slot in seen_slots:
                fail(f"out_cache_loc[{k + j}] = {slot} (request {i}) is also written by "
                     f"out_cache_loc[{seen_slots[slot]}]")
            seen_slots[slot] = k + j
            if slot != new[j]:
                fail(f"out_cache_loc[{k + j}] = {slot} but req_to_token[{row}, {p + j}] = "
                     f"{new[j]} (request {i})")
        k += e
