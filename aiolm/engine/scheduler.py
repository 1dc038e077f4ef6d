"""The cache-aware continuous-batching scheduler (plain Python over the pools; CPU-testable).

Each pass (:meth:`Scheduler.schedule`) returns one batch:

* an EXTEND batch when there is prefill work: first the running requests that miss more
  than one token (the rest of a chunked prefill, jump-forward tokens), then waiting
  requests in policy order, each prefix-matched against the radix cache, within the token
  budget (the last one may be chunked) and the memory estimate;
* otherwise a DECODE batch of every running request that misses exactly its last token.

Policies: ``lpm`` (longest cached prefix first), ``dfs-weight`` (the SGLang paper's: the
waiting requests form a prefix tree; a node's weight is the number of requests in its
subtree; requests are taken in DFS pre-order, heavier children first) and ``fcfs``. The
waiting queue is kept in arrival order, so ``fcfs`` costs nothing to order and a pass
looks at no more requests than it admits; above ``cache_aware_limit`` waiting requests the
cache-aware policies fall back to it (as SGLang does), so a pass never orders a long queue.

Aging bound (the fix for the paper's starvation problem): a pass *overtakes* a waiting
request when it admits a request that arrived later while this one keeps waiting. A request
overtaken ``aging_limit`` times goes before every policy-ordered request (aged requests in
arrival order), is never deferred, and if it cannot be admitted nothing behind it is
admitted in that pass. So no request is overtaken more than ``aging_limit`` times.

In-batch prefix sharing (``lpm`` and ``dfs-weight``, while they order the queue): a waiting
request whose next ``in_batch_prefix_threshold`` uncached tokens are being computed by a
request already in this batch waits one pass, then hits the cache that request fills.

Memory: admission reserves the missing tokens plus ``new_token_ratio`` × the remaining
``max_tokens`` of every running and admitted request (the ratio decays each decode pass and
resets when a retraction shows it was optimistic; remaining ``max_tokens`` count up to
``max_new_tokens_estimate``). Allocations evict LRU cache leaves when
the allocator runs short; when decode still lacks slots, the latest-arrived running request
is *retracted*: its computed prefix goes into the radix cache, its slots, row and lock are
released, ``kv_len`` drops to 0 and it waits again with its ``output_ids`` kept, to be
recomputed later. No request is ever lost. ``add`` raises ``OutOfMemory`` only for a
request that could not fit even alone in the pool.

Slot ownership: ``req_to_token[row, :locked_len]`` are the radix tree's slots (locked via
``last_node``); ``[locked_len, alloc_len)`` belong to the request.

Overlap (the engine's overlapped loop): :meth:`Scheduler.launched` accounts for a batch as
computed as soon as it is queued on the device, which runs passes in order, so the next
pass may be scheduled before the host knows the tokens this one samples (placeholders, see
:mod:`aiolm.engine.request`); :meth:`Scheduler.process_result` then only releases what
finished. Freeing the slots or the row of a request while a pass in flight still writes or
reads them is safe for the same reason: whatever reuses them is queued after it.

EXTEND batches and admission are :mod:`aiolm.engine.admission`; the batch, the snapshot
and :func:`check_fits` are :mod:`aiolm.engine.schedule_batch`.
"""

from __future__ import annotations

import bisect
import itertools

import torch

from ..cache.pool import ReqToTokenPool, TokenSlotAllocator
from ..cache.radix import RadixCache
from .admission import RIDERS_IN_FLIGHT, PrefillAdmission, _arrival
from .forward_batch import ForwardMode
from .request import Req
from .schedule_batch import ScheduleBatch, SchedulerStatistics, check_fits
from .schedule_policy import POLICIES

__all__ = ["ScheduleBatch", "Scheduler", "SchedulerStatistics", "check_fits"]


class Scheduler(PrefillAdmission):
    """Decides what each forward pass computes, and owns the requests' KV bookkeeping.

    Not thread-safe: the engine loop calls it from one thread. ``abort`` frees a request's
    slots at once, so between :meth:`schedule` and :meth:`process_result` it may only be
    called while no forward pass is writing them (``process_result`` then skips the request).
    """

    def __init__(self, *, cache: RadixCache, allocator: TokenSlotAllocator,
                 req_to_token_pool: ReqToTokenPool, policy: str = "lpm",
                 chunked_prefill_size: int | None = 2048,
                 max_running_requests: int | None = None,
                 max_prefill_tokens: int = 16384, aging_limit: int = 16,
                 new_token_ratio: float = 0.7, min_new_token_ratio: float = 0.1,
                 new_token_ratio_decay: float = 0.001,
                 max_new_tokens_estimate: int = 4096,
                 in_batch_prefix_threshold: int = 32,
                 cache_aware_limit: int = 128, mix_decode: bool = False,
                 riders_in_flight: bool | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy: expected one of {', '.join(POLICIES)}, got {policy!r}")
        for name, value in (("max_prefill_tokens", max_prefill_tokens),
                            ("aging_limit", aging_limit),
                            ("max_new_tokens_estimate", max_new_tokens_estimate),
                            ("in_batch_prefix_threshold", in_batch_prefix_threshold),
                            ("cache_aware_limit", cache_aware_limit)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if chunked_prefill_size is not None and chunked_prefill_size < 1:
            raise ValueError(f"chunked_prefill_size: must be >= 1 or None, got {chunked_prefill_size}")
        if max_running_requests is not None and max_running_requests < 1:
            raise ValueError(f"max_running_requests: must be >= 1, got {max_running_requests}")
        if not 0.0 <= min_new_token_ratio <= new_token_ratio <= 1.0:
            raise ValueError("new_token_ratio: need 0 <= min_new_token_ratio <= new_token_ratio <= 1")
        self.cache = cache
        self.allocator = allocator
        self.req_to_token_pool = req_to_token_pool
        self.policy = policy
        self.chunked_prefill_size = chunked_prefill_size
        self.max_running_requests = min(max_running_requests or req_to_token_pool.max_requests,
                                        req_to_token_pool.max_requests)
        self.max_prefill_tokens = max_prefill_tokens
        self.aging_limit = aging_limit
        self.init_new_token_ratio = new_token_ratio
        self.min_new_token_ratio = min_new_token_ratio
        self.new_token_ratio_decay = new_token_ratio_decay
        self.max_new_tokens_estimate = max_new_tokens_estimate
        self.in_batch_prefix_threshold = in_batch_prefix_threshold
        self.cache_aware_limit = cache_aware_limit
        self.mix_decode = mix_decode
        self.riders_in_flight = RIDERS_IN_FLIGHT if riders_in_flight is None else riders_in_flight
        self._budget = min(max_prefill_tokens, chunked_prefill_size or max_prefill_tokens)
        self._new_token_ratio = new_token_ratio
        self._arrivals = itertools.count()
        self._reqs: dict[str, Req] = {}
        self._waiting: list[Req] = []   # in arrival order
        self._aged: list[Req] = []      # the waiting requests overtaken aging_limit times, ditto
        self._running: list[Req] = []
        self._retractions = 0

    # ----------------------------------------------------------------- requests

    @property
    def waiting(self) -> tuple[Req, ...]:
        return tuple(self._waiting)

    @property
    def running(self) -> tuple[Req, ...]:
        return tuple(self._running)

    def has_work(self) -> bool:
        """True while any request is waiting or running."""
        return bool(self._reqs)

    def get(self, rid: str) -> Req | None:
        return self._reqs.get(rid)

    def add(self, req: Req) -> None:
        """Queue ``req``; sets its ``arrival``.

        Raises ``ValueError`` for a duplicate rid or an empty prompt, and
        ``ContextLengthExceeded`` / ``OutOfMemory`` by :func:`check_fits` (the context being
        a ``req_to_token`` row).
        """
        if req.rid in self._reqs:
            raise ValueError(f"rid: a request {req.rid!r} is already scheduled")
        if not req.prompt_len:
            raise ValueError("input_ids: the prompt must not be empty")
        if req.max_prefix_match is not None and req.max_prefix_match < 0:
            raise ValueError(f"max_prefix_match: must be >= 0, got {req.max_prefix_match}")
        check_fits(req.seq_len, req.remaining_tokens,
                   context_len=self.req_to_token_pool.max_context_len,
                   kv_slots=self.allocator.size)
        req.arrival = next(self._arrivals)
        req.overtaken = 0
        self._reqs[req.rid] = req
        self._waiting.append(req)

    def abort(self, rid: str) -> Req | None:
        """Remove request ``rid`` wherever it is, freeing its slots, row and lock.

        Sets ``finish_reason = "abort"`` unless it already finished; returns the request, or
        ``None`` for an unknown rid.
        """
        req = self._reqs.pop(rid, None)
        if req is None:
            return None
        if req.req_pool_idx is None:
            self._remove_waiting(req)
        else:
            self._release(req, cache_prefix=False)
            self._running.remove(req)
        if req.finish_reason is None:
            req.finish_reason = "abort"
        return req

    def flush_cache(self) -> int:
        """Evict every unlocked cached token; returns how many slots were freed."""
        return self.cache.evict(self.cache.evictable_size())

    def counts(self) -> tuple[int, int, int]:
        """``(running, waiting, retractions)``, without building a snapshot."""
        return len(self._running), len(self._waiting), self._retractions

    def statistics(self) -> SchedulerStatistics:
        return SchedulerStatistics(
            running=len(self._running), waiting=len(self._waiting),
            free_slots=self.allocator.available_size(), total_slots=self.allocator.size,
            evictable_size=self.cache.evictable_size(),
            protected_size=self.cache.protected_size(),
            retractions=self._retractions, new_token_ratio=self._new_token_ratio)

    # ----------------------------------------------------------------- one pass

    def schedule(self) -> ScheduleBatch | None:
        """The next batch, or ``None`` when nothing can run (no requests)."""
        while True:
            batch = self._schedule_extend()
            if batch is not None:
                return batch
            batch = self._schedule_decode()
            if batch is not None:
                return batch
            if not any(r.needs_extend for r in self._running):
                # Nothing to run until the tokens in flight are known (overlap), or idle.
                return None
            # Only unfinished extends remain and memory cannot hold them: make room.
            self._retract_latest()

    def launched(self, batch: ScheduleBatch) -> None:
        """Account for ``batch`` as computed once its pass is queued on the device.

        Advances ``kv_len`` to ``alloc_len``; after an extend, each request's computed
        prefix is cached (and locked) so later requests can share it. The device runs
        passes in order, so a pass scheduled next may read this one's K/V. Idempotent per
        batch; :meth:`process_result` calls it when the loop did not.
        """
        if batch.launched:
            return
        batch.launched = True
        extend = batch.mode is ForwardMode.EXTEND
        cached_until = len(batch.reqs) if batch.decode_start is None else batch.decode_start
        for i, req in enumerate(batch.reqs):
            if self._reqs.get(req.rid) is not req or req.req_pool_idx is None:
                continue  # aborted since
            req.kv_len = req.alloc_len
            if extend and i < cached_until and req.finish_reason is None:
                self._cache_unfinished(req)

    def process_result(self, batch: ScheduleBatch) -> None:
        """Account for a computed batch (after the runner appended tokens / finished requests).

        Advances ``kv_len`` and caches extended prefixes (:meth:`launched`) unless that was
        done when the pass was queued; a finished request's sequence goes into the radix
        cache and its row is freed. A finished request that waits (retracted while a token
        of it was in flight) leaves the queue.
        """
        self.launched(batch)
        for req in batch.reqs:
            if self._reqs.get(req.rid) is not req or req.finish_reason is None:
                continue  # aborted since, or still going
            if req.req_pool_idx is None:
                self._remove_waiting(req)
            else:
                self._release(req, cache_prefix=True)
                self._running.remove(req)
            del self._reqs[req.rid]

    def without_finished_riders(self, batch: ScheduleBatch) -> ScheduleBatch:
        """``batch`` less the decode riders (see ``mix_decode``) that finished or were
        aborted since it was scheduled: the overlapped loop processes the step in flight
        before it launches an extend that may not queue behind it, and that step may end a
        rider (its slots, its rider slot included, and its row are already released)."""
        start = batch.decode_start
        if start is None or start == len(batch.reqs):
            return batch
        keep = [i for i, r in enumerate(batch.reqs)
                if i < start or (self._reqs.get(r.rid) is r and r.finish_reason is None
                                 and r.req_pool_idx is not None)]
        if len(keep) == len(batch.reqs):
            return batch
        first = sum(batch.extend_lens[:start])
        riders_kept = [first + i - start for i in keep[start:]]
        loc = batch.out_cache_loc
        out_cache_loc = torch.cat([loc[:first], loc[riders_kept]]) if riders_kept else loc[:first]
        return ScheduleBatch(
            mode=batch.mode, reqs=[batch.reqs[i] for i in keep],
            prefix_lens=[batch.prefix_lens[i] for i in keep],
            extend_lens=[batch.extend_lens[i] for i in keep], out_cache_loc=out_cache_loc,
            sample_mask=[batch.sample_mask[i] for i in keep], decode_start=start)

    def drop_in_flight(self, req: Req, tokens: int) -> None:
        """``req`` finished before the last ``tokens`` of its placeholders were known: the
        caller removed them from ``all_ids``; the K/V that the passes in flight compute for
        the tokens before them no longer count (their slots are freed with the request's,
        as in the loop that is not overlapped, which never computes them)."""
        if tokens and req.req_pool_idx is not None:
            req.kv_len = max(req.locked_len, req.kv_len - tokens)

    # ----------------------------------------------------------------- decode

    def _schedule_decode(self) -> ScheduleBatch | None:
        while True:
            reqs = [r for r in self._running if r.needs_decode]
            if not reqs:
                return None
            slots = self._alloc(len(reqs))
            if slots is not None:
                break
            self._retract_latest()
        pool = self.req_to_token_pool
        # Built on the host and copied without waiting: a tensor made on the device from a
        # list would wait for the pass in flight (the overlapped loop's whole point).
        rows = torch.tensor([r.req_pool_idx for r in reqs]).to(pool.device, non_blocking=True)
        cols = torch.tensor([r.kv_len for r in reqs]).to(pool.device, non_blocking=True)
        pool.req_to_token[rows, cols] = slots.to(torch.int32)
        prefix_lens = []
        for r in reqs:
            prefix_lens.append(r.kv_len)
            r.alloc_len = r.kv_len + 1
        self._new_token_ratio = max(self.min_new_token_ratio,
                                    self._new_token_ratio - self.new_token_ratio_decay)
        return ScheduleBatch(mode=ForwardMode.DECODE, reqs=reqs, prefix_lens=prefix_lens,
                             extend_lens=[1] * len(reqs), out_cache_loc=slots,
                             sample_mask=[True] * len(reqs))

    # ----------------------------------------------------------------- memory

    def _alloc(self, n: int) -> torch.Tensor | None:
        short = n - self.allocator.available_size()
        if short > 0:
            self.cache.evict(short)
        return self.allocator.alloc(n)

    def _retract_latest(self) -> None:
        if len(self._running) <= 1:
            # add() guarantees a lone request fits; reaching here means output_ids grew past
            # max_tokens or the pool was touched from outside.
            raise RuntimeError("scheduler: a lone running request does not fit the KV pool")
        req = max(self._running, key=_arrival)
        self._release(req, cache_prefix=True)
        self._running.remove(req)
        bisect.insort(self._waiting, req, key=_arrival)
        if req.overtaken >= self.aging_limit:
            bisect.insort(self._aged, req, key=_arrival)
        req.retractions += 1
        self._retractions += 1
        self._new_token_ratio = self.init_new_token_ratio

    def _release(self, req: Req, *, cache_prefix: bool) -> None:
        """Give back ``req``'s row, lock and own slots; with ``cache_prefix`` the radix cache
        takes over what it computed first."""
        pool = self.req_to_token_pool
        row = req.req_pool_idx
        own_from = req.locked_len
        if cache_prefix and req.kv_len > 0:
            self.cache.cache_finished(req.all_ids[:req.kv_len], pool.read(row, 0, req.kv_len),
                                      node=req.last_node, locked_len=req.locked_len)
            own_from = req.kv_len
        else:
            self.cache.dec_lock_ref(req.last_node)
        if req.alloc_len > own_from:
            self.allocator.free(pool.read(row, own_from, req.alloc_len))
        pool.free(row)
        req.req_pool_idx = req.last_node = None
        req.kv_len = req.alloc_len = req.locked_len = 0

    def _cache_unfinished(self, req: Req) -> None:
        """Hand ``req``'s computed prefix to the radix cache, which moves its lock there."""
        if req.kv_len == req.locked_len:
            return
        pool = self.req_to_token_pool
        row = req.req_pool_idx
        match = self.cache.cache_unfinished(req.all_ids[:req.kv_len], pool.read(row, 0, req.kv_len),
                                            node=req.last_node, locked_len=req.locked_len)
        pool.write(row, req.locked_len, match.slots[req.locked_len:])
        req.last_node, req.locked_len = match.node, match.length
