"""Block-hash events of the radix cache: what a prefix-aware router needs to know of it.

The cache's content is seen in fixed blocks of ``block_size`` tokens: block ``j`` of a cached
sequence is *held* while its first ``(j + 1) * block_size`` tokens are cached. A block is named
by a chained hash (of the previous block's hash and its own tokens), so one hash names a whole
prefix, as in vLLM's KV-cache events and llm-d's indexer: two replicas holding the same hash
hold the same prefix, and whoever holds block ``j`` holds every block before it.

:meth:`aiolm.cache.radix.RadixCache.listen` reports each block the cache starts or stops
holding as a :class:`CacheEvent`; nothing is hashed while no one listens.
:class:`CacheEventLog` is the listener a replica uses: a bounded, thread-safe queue that the
engine thread fills and another thread drains.
"""

from __future__ import annotations

import collections
import hashlib
import struct
import threading
from collections.abc import Sequence
from typing import Literal

import attrs

__all__ = ["DEFAULT_BLOCK_SIZE", "CacheEvent", "CacheEventLog", "block_hashes"]

#: Tokens per block. Small enough that a short shared prefix (a system prompt, a few-shot
#: header) counts, large enough that the events stay few.
DEFAULT_BLOCK_SIZE = 16

_SEED = b"aiolm-blocks-v1"


def block_hashes(tokens: Sequence[int], block_size: int = DEFAULT_BLOCK_SIZE) -> list[int]:
    """The chained hashes of every whole block of ``tokens`` (a trailing partial block has
    none): 64-bit BLAKE2b of the previous hash and the block's token ids, the same in every
    process and on every machine. Raises ``ValueError`` for a ``block_size`` below 1."""
    if block_size < 1:
        raise ValueError(f"block_size: must be at least 1 (got {block_size})")
    out: list[int] = []
    prev = _SEED
    pack = struct.Struct(f"<{block_size}q").pack
    for start in range(0, len(tokens) - block_size + 1, block_size):
        prev = hashlib.blake2b(prev + pack(*tokens[start:start + block_size]), digest_size=8).digest()
        out.append(int.from_bytes(prev, "little"))
    return out


@attrs.frozen(kw_only=True)
class CacheEvent:
    """The cache started (``stored``) or stopped (``removed``) holding the blocks ``hashes``
    (in prefix order), or dropped everything (``cleared``, no hashes)."""

    kind: Literal["stored", "removed", "cleared"]
    hashes: tuple[int, ...] = ()


@attrs.define(eq=False)
class CacheEventLog:
    """A bounded queue of :class:`CacheEvent`: the cache's listener on the engine thread,
    drained elsewhere with :meth:`drain`.

    When more than ``max_events`` wait, the queue is emptied and the next :meth:`drain` starts
    with a ``cleared`` event: a reader that missed events cannot tell what the cache holds,
    so it forgets it and learns again from the events that follow.
    """

    max_events: int = attrs.field(default=65536)
    _events: collections.deque[CacheEvent] = attrs.field(factory=collections.deque, init=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    _overflowed: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        if self.max_events < 1:
            raise ValueError(f"max_events: must be at least 1 (got {self.max_events})")

    def __call__(self, event: CacheEvent) -> None:
        """Queue ``event`` (the cache calls this; never blocks for long)."""
        with self._lock:
            if len(self._events) >= self.max_events:
                self._events.clear()
                self._overflowed = True
            self._events.append(event)

    def drain(self) -> list[CacheEvent]:
        """Every queued event, oldest first, and empty the queue; a ``cleared`` event first
        when some were dropped since the last drain."""
        with self._lock:
            events = list(self._events)
            self._events.clear()
            overflowed, self._overflowed = self._overflowed, False
        return [CacheEvent(kind="cleared"), *events] if overflowed else events
