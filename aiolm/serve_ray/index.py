"""The router's view of every replica's radix cache: which token blocks each one holds.

Replicas report their caches' block events (:mod:`aiolm.cache.block_events`); the index
keeps, per block hash, the replicas holding it, and answers how long a prefix of a request's
blocks each replica holds. Plain Python, no Ray: the Ray actor that shares it between
routers (:mod:`aiolm.serve_ray.router`) wraps it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import attrs

from ..cache.block_events import CacheEvent

__all__ = ["BlockIndex"]


@attrs.define(eq=False)
class BlockIndex:
    """Block hash → the replicas that hold the block; replica → its hashes."""

    _holders: dict[int, set[str]] = attrs.field(factory=dict, init=False)
    _blocks: dict[str, set[int]] = attrs.field(factory=dict, init=False)

    def apply(self, replica: str, events: Iterable[CacheEvent]) -> None:
        """Apply ``replica``'s cache events in order (``stored`` adds its hashes, ``removed``
        drops them, ``cleared`` forgets everything of the replica)."""
        held = self._blocks.setdefault(replica, set())
        for event in events:
            if event.kind == "stored":
                for h in event.hashes:
                    if h not in held:
                        held.add(h)
                        self._holders.setdefault(h, set()).add(replica)
            elif event.kind == "removed":
                for h in event.hashes:
                    if h in held:
                        held.discard(h)
                        self._forget(h, replica)
            elif event.kind == "cleared":
                self._drop_blocks(replica, held)
            else:
                raise ValueError(f"event.kind: 'stored', 'removed' or 'cleared' (got {event.kind!r})")

    def drop(self, replica: str) -> None:
        """Forget ``replica`` (it stopped or died)."""
        held = self._blocks.pop(replica, None)
        if held is not None:
            self._drop_blocks(replica, held)

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """For each replica holding the first block of ``hashes``, how many leading blocks of
        them it holds (replicas holding none are left out)."""
        if not hashes:
            return {}
        live = set(self._holders.get(hashes[0], ()))
        matched = dict.fromkeys(live, 1)
        for depth, h in enumerate(hashes[1:], start=2):
            live &= self._holders.get(h, set())
            if not live:
                break
            for replica in live:
                matched[replica] = depth
        return matched

    def block_counts(self) -> dict[str, int]:
        """How many blocks each known replica holds."""
        return {replica: len(held) for replica, held in self._blocks.items()}

    def _forget(self, h: int, replica: str) -> None:
        holders = self._holders.get(h)
        if holders is not None:
            holders.discard(replica)
            if not holders:
                del self._holders[h]

    def _drop_blocks(self, replica: str, held: set[int]) -> None:
        for h in held:
            self._forget(h, replica)
        held.clear()
