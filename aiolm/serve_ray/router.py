"""Ray Serve request routers for the engine replicas, and the shared cache index.

:class:`CacheAwareRouter` routes by what each replica's radix cache holds, as the replicas
report it (block-hash events sent to a :class:`CacheIndexActor`), by session and by load
(:mod:`aiolm.serve_ray.policy`). :class:`RoundRobinRouter` is the baseline that ignores the
caches. Serve builds one router per handle (in the ingress replica) from the deployment's
``RequestRouterConfig``; each calls :meth:`RequestRouter.choose_replicas` per request with
the request's arguments, whose first one is a :class:`~aiolm.serve_ray.wire.RoutedRequest`.
"""

from __future__ import annotations

import collections
import itertools
import logging
from collections.abc import Sequence
from typing import Any

import ray
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from ..cache.block_events import CacheEvent
from .index import BlockIndex
from .policy import RoutingPolicy
from .wire import RoutedRequest

__all__ = ["INDEX_NAMESPACE", "CacheAwareRouter", "CacheIndexActor", "RoundRobinRouter",
           "cache_index", "index_name"]

_log = logging.getLogger("aiolm.serve_ray")

#: The Ray namespace of the index actors (one per Serve application).
INDEX_NAMESPACE = "aiolm"
#: The most requests whose routing decision a router remembers until Serve routes them.
_MAX_DECIDING = 4096


def index_name(app_name: str) -> str:
    """The name of ``app_name``'s cache index actor."""
    return f"aiolm-cache-index:{app_name}"


@ray.remote(num_cpus=0, max_restarts=-1)
class CacheIndexActor:
    """The block index (:class:`~aiolm.serve_ray.index.BlockIndex`) of one application's
    replicas, shared by its routers, and each replica's latest engine statistics. Restarted
    empty if its process dies (the routers then route by load until new events arrive)."""

    def __init__(self) -> None:
        self._index = BlockIndex()
        self._statistics: dict[str, dict[str, Any]] = {}

    def apply(self, replica: str, events: list[CacheEvent],
              statistics: dict[str, Any] | None = None) -> None:
        self._index.apply(replica, events)
        if statistics is not None:
            self._statistics[replica] = statistics

    def drop(self, replica: str) -> None:
        self._index.drop(replica)
        self._statistics.pop(replica, None)

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        return self._index.match(hashes)

    def block_counts(self) -> dict[str, int]:
        return self._index.block_counts()

    def statistics(self) -> dict[str, dict[str, Any]]:
        return dict(self._statistics)


def cache_index(app_name: str) -> Any:
    """The handle of ``app_name``'s index actor, created on first use (by whichever replica
    or router comes first). It is detached, so that it outlives any one replica; the
    application's :func:`aiolm.serve_ray.delete` removes it."""
    return CacheIndexActor.options(name=index_name(app_name), namespace=INDEX_NAMESPACE,
                                   get_if_exists=True, lifetime="detached").remote()


def _routed(pending: PendingRequest | None) -> RoutedRequest | None:
    if pending is None or not pending.args:
        return None
    first = pending.args[0]
    return first if isinstance(first, RoutedRequest) else None


class CacheAwareRouter(RequestRouter):
    """Routes to the replica holding the longest prefix of the request's token blocks,
    keeps a program's session on its replica while it has room, places new prefixes where
    the fewest of the last ``window`` went, spills to the least-loaded replica when loads
    diverge by more than ``imbalance`` requests (``request_router_kwargs`` of the
    deployment's ``RequestRouterConfig``; see :mod:`aiolm.serve_ray.policy`)."""

    def initialize_state(self, imbalance: int = 4, window: int = 64, **kwargs: Any) -> None:
        if kwargs:
            raise TypeError(f"CacheAwareRouter: unknown options {sorted(kwargs)}")
        self._policy = RoutingPolicy(imbalance=imbalance, window=window)
        # The replica each request being routed was sent to first, and whether that was a
        # placement (the policy counted it), until Serve says where it went: meanwhile it
        # counts as in flight there, so that requests decided at the same time see each
        # other. A request cancelled before that leaves its entry: the oldest go beyond
        # _MAX_DECIDING.
        self._deciding: collections.OrderedDict[str, tuple[str, bool]] = (
            collections.OrderedDict())
        self._undecided_load: collections.Counter[str] = collections.Counter()
        self._index: Any = None
        self._inflight: collections.Counter[str] = collections.Counter()
        # The prompts of the requests in flight, per replica: their blocks will be in its
        # cache before its events say so (a burst of requests sharing a prefix follows the
        # first one). A request's entry goes when it completes: its replica has reported
        # its blocks by then (before its last chunk).
        self._sent = BlockIndex()
        self._sent_count: collections.Counter[tuple[str, int]] = collections.Counter()
        self._sent_by_request: dict[str, tuple[str, tuple[int, ...]]] = {}
        #: (reason, matched blocks, replica) of the latest decisions, for tests and the bench.
        self.decisions: collections.deque[tuple[str, int, str]] = collections.deque(maxlen=1024)

    def _load(self, replica: RunningReplica) -> int:
        """Requests in flight on ``replica``: ours, or the queue it reported, if larger
        (other routers, in other ingress replicas, send to it too)."""
        rid = replica.replica_id.unique_id
        reported = self.replica_queue_len_cache.get(replica.replica_id)
        return max(self._inflight[rid] + self._undecided_load[rid], reported or 0)

    async def _match(self, hashes: tuple[int, ...]) -> dict[str, int]:
        if self._index is None:
            self._index = cache_index(self.app_name)
        try:
            return await self._index.match.remote(list(hashes))
        except ray.exceptions.RayError as exc:  # the index restarts; route by load meanwhile
            _log.warning("cache index unavailable (%r): routing by load", exc)
            self._index = None
            return {}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None,
                              ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        routed = _routed(pending_request)
        matched = await self._match(routed.block_hashes) if routed and routed.block_hashes else {}
        if routed and routed.block_hashes:
            for rid, blocks in self._sent.match(routed.block_hashes).items():
                matched[rid] = max(blocks, matched.get(rid, 0))
        load = {rid: self._load(r) for rid, r in by_id.items()}
        request_id = pending_request.metadata.internal_request_id if pending_request else None
        earlier = self._undecide(request_id)
        if earlier is not None and earlier[1]:  # decided again (its replica was full)
            self._policy.withdraw(earlier[0])   # that placement is void
        decision = self._policy.decide(list(by_id), matched=matched, load=load,
                                       session=routed.session if routed else None)
        first = decision.ranks[0][0]
        self.decisions.append((decision.reason, decision.matched_blocks, first))
        if request_id is not None:
            self._deciding[request_id] = (first, decision.placed)
            self._undecided_load[first] += 1
            while len(self._deciding) > _MAX_DECIDING:
                self._undecide(next(iter(self._deciding)))
        return [[by_id[rid] for rid in rank] for rank in decision.ranks]

    def _undecide(self, request_id: str | None) -> tuple[str, bool] | None:
        """Drop ``request_id``'s pending decision and the load it counted; returns (the
        replica it was sent to first, whether that was a placement), or None."""
        entry = self._deciding.pop(request_id, None) if request_id is not None else None
        if entry is not None:
            self._undecided_load[entry[0]] -= 1
        return entry

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: Any) -> None:
        rid = replica_id.unique_id
        self._inflight[rid] += 1
        request_id = pending_request.metadata.internal_request_id
        entry = self._undecide(request_id)
        if entry is not None and entry[1] and entry[0] != rid:
            self._policy.withdraw(entry[0])   # Serve took a later rank: the placement
            self._policy.place(rid)           # moves with it
        routed = _routed(pending_request)
        if routed is not None:
            self._policy.routed(routed.session, rid)
            if routed.block_hashes:
                self._remember(request_id, rid, routed.block_hashes)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        rid = replica_id.unique_id
        if self._inflight[rid] > 0:
            self._inflight[rid] -= 1
        self._release(internal_request_id)

    def _remember(self, request_id: str, rid: str, hashes: tuple[int, ...]) -> None:
        """Count ``hashes`` as held by ``rid`` while request ``request_id`` is in flight."""
        self._release(request_id)  # a retried request: its former replica no longer counts
        self._sent_by_request[request_id] = (rid, hashes)
        new = []
        for h in hashes:
            self._sent_count[rid, h] += 1
            if self._sent_count[rid, h] == 1:
                new.append(h)
        self._sent.apply(rid, [CacheEvent(kind="stored", hashes=tuple(new))])

    def _release(self, request_id: str) -> None:
        entry = self._sent_by_request.pop(request_id, None)
        if entry is None:
            return
        rid, hashes = entry
        gone = []
        for h in hashes:
            self._sent_count[rid, h] -= 1
            if self._sent_count[rid, h] <= 0:
                del self._sent_count[rid, h]
                gone.append(h)
        self._sent.apply(rid, [CacheEvent(kind="removed", hashes=tuple(gone))])

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget(replica_id.unique_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        gone = set(self.curr_replicas) - {r.replica_id for r in replicas}
        super().update_replicas(replicas)
        for replica_id in gone:  # stopped (draining) or dead: no request goes there again
            self._forget(replica_id.unique_id)

    def _forget(self, rid: str) -> None:
        self._policy.forget_replica(rid)
        self._inflight.pop(rid, None)
        self._undecided_load.pop(rid, None)
        for request_id in [q for q, (r, _) in self._sent_by_request.items() if r == rid]:
            self._release(request_id)
        self._sent.drop(rid)
        if self._index is not None:  # a replica that died cannot say so itself
            self._index.drop.remote(rid)


class RoundRobinRouter(RequestRouter):
    """The baseline: each request to the next replica in turn, whatever their caches hold."""

    def initialize_state(self, **kwargs: Any) -> None:
        if kwargs:
            raise TypeError(f"RoundRobinRouter: unknown options {sorted(kwargs)}")
        self._turn = itertools.count()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None,
                              ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        k = next(self._turn) % len(ordered)
        turn = ordered[k:] + ordered[:k]
        return [[turn[0]], turn[1:]] if len(turn) > 1 else [[turn[0]]]
