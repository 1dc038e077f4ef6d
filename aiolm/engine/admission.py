"""How the scheduler builds an EXTEND batch: prefill work and the admission of waiting
requests.

:class:`PrefillAdmission` is the part of :class:`~aiolm.engine.scheduler.Scheduler` that
continues the running requests' unfinished extends, then admits waiting requests in
policy order (aged ones first), each prefix-matched against the radix cache, within the
token budget (chunking the last) and the memory estimate, with in-batch prefix sharing and
the aging bound (see the module docstring of :mod:`aiolm.engine.scheduler`).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch

from .forward_batch import ForwardMode
from .knobs import env_flag
from .request import Req
from .schedule_batch import ScheduleBatch
from .schedule_policy import order_by_policy

if TYPE_CHECKING:
    from ..cache.pool import ReqToTokenPool, TokenSlotAllocator
    from ..cache.radix import RadixCache

__all__ = ["PrefillAdmission"]

#: Whether a running request whose token is still in flight (the overlapped loop) may ride
#: along in an extend pass (``mix_decode``); its token is taken on the device, as a decode
#: pass takes it. ``AIOLM_RIDERS_IN_FLIGHT=0`` or ``1`` overrides the default (an
#: experiment's knob, for the ablation in docs/benchmarks.md).
RIDERS_IN_FLIGHT = env_flag("AIOLM_RIDERS_IN_FLIGHT", default=True)


class PrefillAdmission:
    """The extend-scheduling methods of :class:`~aiolm.engine.scheduler.Scheduler` (a
    mixin: the queues and pools it reads and mutates are the scheduler's, set up by
    ``Scheduler.__init__``)."""

    cache: RadixCache
    allocator: TokenSlotAllocator
    req_to_token_pool: ReqToTokenPool
    policy: str
    chunked_prefill_size: int | None
    max_running_requests: int
    aging_limit: int
    max_new_tokens_estimate: int
    in_batch_prefix_threshold: int
    cache_aware_limit: int
    mix_decode: bool
    riders_in_flight: bool
    _budget: int
    _new_token_ratio: float
    _waiting: list[Req]
    _aged: list[Req]
    _running: list[Req]

    def _schedule_extend(self) -> ScheduleBatch | None:
        entries: list[tuple[Req, list[int], int, int, torch.Tensor]] = []
        left = self._budget
        for req in self._running:
            if left <= 0:
                break
            if not req.needs_extend:
                continue
            ext = self._extend_len(req, req.num_missing, left, bool(entries))
            if ext == 0:
                continue
            slots = self._alloc(ext)
            if slots is None:
                break
            self.req_to_token_pool.write(req.req_pool_idx, req.kv_len, slots)
            req.alloc_len = req.kv_len + ext
            entries.append((req, req.all_ids, req.kv_len, ext, slots))
            left -= ext
        if (self._waiting and left > 0 and len(self._running) < self.max_running_requests
                and self.req_to_token_pool.available_size()):
            left = self._admit_waiting(entries, left)
        if not entries:
            return None
        decode_start = len(entries)
        slots = [e[4] for e in entries]
        if self.mix_decode and left > 0:
            riding = self._mix_decode(entries, left)
            if riding is not None:
                slots.append(riding)
        return ScheduleBatch(
            mode=ForwardMode.EXTEND,
            reqs=[e[0] for e in entries],
            prefix_lens=[e[2] for e in entries],
            extend_lens=[e[3] for e in entries],
            out_cache_loc=torch.cat(slots),
            sample_mask=[e[2] + e[3] == len(e[1]) for e in entries],
            decode_start=decode_start,
        )

    def _mix_decode(self, entries: list, left: int) -> torch.Tensor | None:
        """Let the running requests that miss only their last token ride along in this
        extend pass (SGLang's mixed chunk): each advances a token now instead of waiting for
        the next decode pass. That pass would read every weight again for them, so a
        jump-forward (or a chunk of prefill) no longer costs a pass of its own. Within the
        pass's token budget; nothing when the pool cannot give every one a slot without
        evicting (a decode pass makes room as it always does). Returns their slots, in the
        order of the entries appended.

        A request whose token is still in flight (the overlapped loop) rides only with
        ``riders_in_flight``; otherwise its decode goes behind that pass as usual."""
        taken = {id(e[0]) for e in entries}
        in_flight = self.riders_in_flight
        reqs = [r for r in self._running
                if r.needs_decode and (in_flight or not r.pending) and id(r) not in taken][:left]
        if not reqs or len(reqs) > self.allocator.available_size():
            return None
        slots = self.allocator.alloc(len(reqs))
        pool = self.req_to_token_pool
        rows = torch.tensor([r.req_pool_idx for r in reqs]).to(pool.device, non_blocking=True)
        cols = torch.tensor([r.kv_len for r in reqs]).to(pool.device, non_blocking=True)
        pool.req_to_token[rows, cols] = slots.to(torch.int32)
        for r in reqs:
            r.alloc_len = r.kv_len + 1
            entries.append((r, r.all_ids, r.kv_len, 1, None))
        return slots

    def _extend_len(self, req: Req, missing: int, left: int, batch_nonempty: bool) -> int:
        """Tokens of ``missing`` to compute now: all, a chunk, or 0 (does not fit)."""
        if missing <= left:
            return missing
        if self.chunked_prefill_size is not None and not req.return_all_logits:
            return left
        # Unchunkable and over budget: it runs alone in a batch of its own.
        return 0 if batch_nonempty else missing

    def _admit_waiting(self, entries: list, left: int) -> int:
        """Admit waiting requests into ``entries``; returns the token budget left."""
        pool = self.req_to_token_pool
        reserved = sum(self._future_need(r) for r in self._running)
        cache_aware = (self.policy != "fcfs" and not self.cache.disabled
                       and len(self._waiting) <= self.cache_aware_limit)
        admitted_arrival = -1
        for req in self._order_waiting(cache_aware):
            if left <= 0 or len(self._running) >= self.max_running_requests \
                    or pool.available_size() == 0:
                break
            aged = req.overtaken >= self.aging_limit
            if req.pending:  # retracted while a token of it was in flight: not known yet
                if aged:
                    break    # nothing overtakes an aged request
                continue
            ids = req.all_ids
            cap = len(ids) - 1
            if req.max_prefix_match is not None:
                cap = min(cap, req.max_prefix_match)
            match = self.cache.match_prefix(ids[:cap])
            m = match.length
            if cache_aware and not aged and self._shared_in_batch(ids, m, entries):
                continue
            missing = len(ids) - m
            ext = self._extend_len(req, missing, left, bool(entries))
            if ext == 0:
                break
            self.cache.inc_lock_ref(match.node)
            need = missing + self._decode_estimate(req)
            room = self.allocator.available_size() + self.cache.evictable_size()
            idle = not self._running and not entries
            slots = None
            if (ext <= room) if idle else (need <= room - reserved):
                slots = self._alloc(ext)
            if slots is None:
                self.cache.dec_lock_ref(match.node)
                break
            row = pool.alloc()
            pool.write(row, 0, match.slots)
            pool.write(row, m, slots)
            req.req_pool_idx = row
            req.kv_len = req.locked_len = m
            req.alloc_len = m + ext
            req.last_node = match.node
            if req.admissions == 0:
                req.cached_len = min(m, req.prompt_len)
                self.cache.record_lookup(req.cached_len, req.prompt_len - req.cached_len)
            req.admissions += 1
            self._remove_waiting(req)
            req.overtaken = 0
            self._running.append(req)
            reserved += need
            admitted_arrival = max(admitted_arrival, req.arrival)
            entries.append((req, ids, m, ext, slots))
            left -= ext
        for req in self._waiting:   # in arrival order: those that arrived before it
            if req.arrival >= admitted_arrival:
                break
            req.overtaken += 1
            if req.overtaken == self.aging_limit:
                bisect.insort(self._aged, req, key=_arrival)
        return left

    def _shared_in_batch(self, ids: list[int], m: int, entries: list) -> bool:
        """True when a batch member computes this request's next uncached tokens now."""
        end = m + self.in_batch_prefix_threshold
        if end > len(ids) - 1:
            return False
        head = ids[:end]
        return any(p + e >= end and other[:end] == head for _, other, p, e, _ in entries)

    def _order_waiting(self, cache_aware: bool) -> Iterator[Req]:
        """The waiting requests in admission order: the aged ones by arrival, then the rest
        in policy order (``cache_aware``), else by arrival, produced lazily: a pass that
        admits few requests of a long queue looks at few."""
        aged = list(self._aged)
        waiting = list(self._waiting)   # snapshots: admission removes from the queue
        if aged:
            # By identity: admitting an aged request resets its count before the rest
            # is produced.
            skip = set(aged)
            rest: Iterable[Req] = (r for r in waiting if r not in skip)
        else:
            rest = waiting
        if cache_aware:
            rest = order_by_policy(self.policy, list(rest), self.cache)
        yield from aged
        yield from rest

    def _remove_waiting(self, req: Req) -> None:
        """Take ``req`` out of the waiting queue (and the aged list)."""
        self._waiting.remove(req)
        if req.overtaken >= self.aging_limit:
            self._aged.remove(req)

    def _future_need(self, req: Req) -> int:
        """Slots ``req`` will still take: its unallocated tokens plus estimated decode."""
        return req.seq_len - req.alloc_len + self._decode_estimate(req)

    def _decode_estimate(self, req: Req) -> int:
        """Slots ``req``'s future decode steps are expected to take (clipped, as SGLang)."""
        remaining = min(req.remaining_tokens, self.max_new_tokens_estimate)
        return math.ceil(remaining * self._new_token_ratio)


def _arrival(req: Req) -> int:
    return req.arrival
