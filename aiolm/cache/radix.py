"""RadixCache: the token-granular prefix tree of cached K/V slots (RadixAttention).

Keys are lists of token ids; each node holds a run of tokens (``key``) and their KV slots
(``value``, an int64 tensor of the same length). Children are keyed by their first token.

Lock contract: a running request locks the node where its cached prefix ends
(:meth:`RadixCache.inc_lock_ref`), which protects that node and all its ancestors from
eviction, and unlocks it (:meth:`RadixCache.dec_lock_ref`) when it releases the prefix.
What a request computed enters the tree through :meth:`RadixCache.cache_unfinished` (while
it runs: its lock moves to the end of what it computed) and :meth:`RadixCache.cache_finished`
(when it is done with its slots: its lock is released); both free the request's slots for
tokens the tree already held.
Sizes are kept incrementally: every cached token is either *evictable* (its node is
unlocked) or *protected* (locked), and ``evictable + protected == total``.

Eviction frees least-recently-used unlocked leaves through the slot allocator; a parent
that becomes an unlocked leaf becomes a candidate in turn. Candidates live in a heap keyed
by last-access time with lazy invalidation (an entry whose node was touched since is pushed
again with its new time), so eviction never scans the whole tree.

A listener (:meth:`RadixCache.listen`) is told which token blocks the tree starts and stops
holding, as chained block hashes (:mod:`aiolm.cache.block_events`), e.g. for a router that
sends requests to the replica holding their prefix. Without one, nothing is hashed.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
import torch

from ..sequences import common_prefix_length
from ..values import hit_rate
from .block_events import DEFAULT_BLOCK_SIZE, CacheEvent, block_hashes

if TYPE_CHECKING:
    from .pool import TokenSlotAllocator

__all__ = ["MatchResult", "RadixCache", "RadixCacheStatistics", "TreeNode"]

_EMPTY = torch.empty(0, dtype=torch.int64)


class TreeNode:
    """One node of the radix tree. Mutated only by :class:`RadixCache`."""

    __slots__ = ("children", "parent", "key", "value", "lock_ref", "last_access", "id", "dead")

    def __init__(self, key: list[int], value: torch.Tensor, parent: TreeNode | None,
                 node_id: int) -> None:
        self.children: dict[int, TreeNode] = {}
        self.parent = parent
        self.key = key
        self.value = value
        self.lock_ref = 0
        self.last_access = 0
        self.id = node_id
        self.dead = False

    def __repr__(self) -> str:
        return (f"TreeNode(id={self.id}, len={len(self.key)}, lock_ref={self.lock_ref}, "
                f"children={len(self.children)})")


@attrs.frozen(kw_only=True, eq=False)
class MatchResult:
    """The longest cached prefix of a key: its slots, the node where it ends, its length."""

    slots: torch.Tensor
    node: TreeNode
    length: int


@attrs.frozen(kw_only=True)
class RadixCacheStatistics:
    """A snapshot of the cache. Hits and misses count tokens of the lookups recorded with
    :meth:`RadixCache.record_lookup` (the scheduler records each request's prompt once, at
    its first admission)."""

    hit_tokens: int
    miss_tokens: int
    total_size: int
    evictable_size: int
    protected_size: int
    node_count: int
    evicted_tokens: int

    @property
    def hit_rate(self) -> float:
        """The cache hit rate: the fraction of looked-up tokens served from the cache (0.0
        before any lookup). aiolm's one definition of it."""
        return hit_rate(self.hit_tokens, self.hit_tokens + self.miss_tokens)


class RadixCache:
    """The radix tree of cached K/V slots, freeing evicted slots through ``allocator``.

    ``disabled=True`` is the ablation: nothing is ever cached (matches are empty,
    :meth:`insert` returns 0 and the caller frees all its slots).
    """

    def __init__(self, allocator: TokenSlotAllocator, *, disabled: bool = False) -> None:
        self._allocator = allocator
        self._disabled = bool(disabled)
        self._ids = itertools.count()
        self._clock = itertools.count(1)
        self._empty = _EMPTY.to(allocator.device)
        self._init_tree()
        self._hit_tokens = 0
        self._miss_tokens = 0
        self._evicted_tokens = 0
        self._listener: Callable[[CacheEvent], None] | None = None
        self._block_size = DEFAULT_BLOCK_SIZE

    def _init_tree(self) -> None:
        self._root = TreeNode([], self._empty, None, next(self._ids))
        self._evictable = 0
        self._protected = 0
        self._node_count = 1
        self._heap: list[tuple[int, int, TreeNode]] = []

    # ----------------------------------------------------------------- queries

    @property
    def disabled(self) -> bool:
        """True when the cache is the no-caching ablation."""
        return self._disabled

    @property
    def root(self) -> TreeNode:
        """The root node (empty key; never locked, never evicted)."""
        return self._root

    def evictable_size(self) -> int:
        """Cached tokens in unlocked nodes."""
        return self._evictable

    def protected_size(self) -> int:
        """Cached tokens in locked nodes."""
        return self._protected

    def total_size(self) -> int:
        """All cached tokens."""
        return self._evictable + self._protected

    def statistics(self) -> RadixCacheStatistics:
        """A frozen snapshot of sizes and lookup counts."""
        return RadixCacheStatistics(
            hit_tokens=self._hit_tokens,
            miss_tokens=self._miss_tokens,
            total_size=self.total_size(),
            evictable_size=self._evictable,
            protected_size=self._protected,
            node_count=self._node_count,
            evicted_tokens=self._evicted_tokens,
        )

    def record_lookup(self, hit_tokens: int, miss_tokens: int) -> None:
        """Count a lookup in :meth:`statistics`: ``hit_tokens`` served from the cache,
        ``miss_tokens`` not (the caller decides what counts as a lookup)."""
        self._hit_tokens += hit_tokens
        self._miss_tokens += miss_tokens

    # ----------------------------------------------------------------- events

    def listen(self, listener: Callable[[CacheEvent], None] | None, *,
               block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        """Call ``listener`` (on the thread that changes the tree; it must be quick) with a
        ``stored`` event for the whole ``block_size``-token blocks each insert adds and a
        ``removed`` event for those each eviction drops (:mod:`aiolm.cache.block_events`);
        a ``cleared`` event on :meth:`reset`. ``None`` stops the events. Only blocks cached
        from now on are reported. Raises ``ValueError`` for a ``block_size`` below 1."""
        if block_size < 1:
            raise ValueError(f"block_size: must be at least 1 (got {block_size})")
        self._listener = listener
        self._block_size = block_size

    def _report(self, kind: str, path: list[int], start: int) -> None:
        """Tell the listener that the blocks of ``path`` ending past ``start`` were stored
        or removed (those ending at or before ``start`` are unchanged)."""
        size = self._block_size
        if len(path) // size > start // size:
            hashes = block_hashes(path[:len(path) // size * size], size)
            self._listener(CacheEvent(kind=kind, hashes=tuple(hashes[start // size:])))

    def _path_tokens(self, node: TreeNode) -> list[int]:
        """The tokens from the root to the end of ``node``."""
        keys = []
        while node is not self._root:
            keys.append(node.key)
            node = node.parent
        return [t for key in reversed(keys) for t in key]

    # ----------------------------------------------------------------- match / insert

    def match_prefix(self, key: list[int]) -> MatchResult:
        """The longest cached prefix of ``key``.

        Splits a node when the match ends inside it, so ``node`` always ends exactly at
        ``length``; touches the LRU time of every node on the path.
        """
        node = self._root
        length = 0
        if not self._disabled:
            values = []
            now = next(self._clock)
            n = len(key)
            while length < n:
                child = self._descend(node, key, length, now)
                if child is None:
                    break
                values.append(child.value)
                length += len(child.key)
                node = child
            slots = (values[0] if len(values) == 1 else torch.cat(values)) if values else self._empty
        else:
            slots = self._empty
        return MatchResult(slots=slots, node=node, length=length)

    def match_length(self, key: list[int], limit: int | None = None) -> int:
        """Length of the longest cached prefix of ``key`` (of its first ``limit`` tokens
        when given: no copy of ``key`` is made), for ordering: touches the LRU time of the
        matched nodes like :meth:`match_prefix` but never splits a node, gathers no slots
        and records nothing."""
        if self._disabled:
            return 0
        now = next(self._clock)
        children = self._root.children
        length = 0
        n = len(key) if limit is None else max(0, min(len(key), limit))
        while length < n:
            child = children.get(key[length])
            if child is None:
                break
            child.last_access = now
            ck = child.key
            size = len(ck)
            if length + size > n or key[length:length + size] != ck:
                return min(n, length + common_prefix_length(ck, key, length))
            length += size
            children = child.children
        return length

    def insert(self, key: list[int], slots: torch.Tensor) -> int:
        """Cache ``key`` with KV ``slots``; returns how many leading tokens were ALREADY cached.

        The tree takes ownership of ``slots[result:]``. For ``slots[:result]`` the tree keeps
        its own slots: the caller frees its duplicates in that range (except slots it got
        from the tree in the first place). Disabled: caches nothing and returns 0.
        """
        if len(slots) != len(key):
            raise ValueError(f"slots: expected {len(key)} slots for the key, got {len(slots)}")
        if self._disabled:
            return 0
        now = next(self._clock)
        node = self._root
        i = 0
        n = len(key)
        while i < n:
            child = self._descend(node, key, i, now)
            if child is None:
                leaf = TreeNode(key[i:], slots[i:].to(torch.int64).clone(), node, next(self._ids))
                leaf.last_access = now
                node.children[key[i]] = leaf
                self._node_count += 1
                self._evictable += n - i
                heapq.heappush(self._heap, (now, leaf.id, leaf))
                if self._listener is not None:
                    self._report("stored", list(key), i)
                return i
            i += len(child.key)
            node = child
        return n

    def _descend(self, node: TreeNode, key: list[int], i: int, now: int) -> TreeNode | None:
        """The child of ``node`` that ``key[i:]`` goes on into, split where ``key`` leaves it
        (so all of its key is matched) and touched at LRU time ``now``; None when no child
        starts with ``key[i]``. After a split the next descent finds no child: the lower
        half starts with a token ``key`` does not have there."""
        child = node.children.get(key[i])
        if child is None:
            return None
        ck = child.key
        size = len(ck)
        if key[i:i + size] != ck:
            child = self._split(child, common_prefix_length(ck, key, i))
        child.last_access = now
        return child

    def cache_finished(self, key: list[int], slots: torch.Tensor, *, node: TreeNode,
                       locked_len: int) -> None:
        """Take over what a request computed, when it is done with its slots, and release
        its lock.

        ``key`` are the request's computed tokens and ``slots`` their KV slots: the first
        ``locked_len`` are the tree's own (the request's cached prefix, locked through
        ``node``), the rest the request's. The tree keeps the request's slots of the tokens
        it lacked; those of tokens it already held are duplicates and freed; ``node`` is
        unlocked. Disabled: every slot of the request's is freed. Raises ``ValueError`` when
        ``slots`` and ``key`` differ in length.
        """
        self._take_computed(key, slots, locked_len)
        self.dec_lock_ref(node)

    def cache_unfinished(self, key: list[int], slots: torch.Tensor, *, node: TreeNode,
                         locked_len: int) -> MatchResult:
        """Take over what a still-running request computed so far, and move its lock there.

        As :meth:`cache_finished`, but the request goes on: the returned match holds the
        tree's slots for all of ``key`` (the request's slot table must use them from
        ``locked_len`` on, as its own duplicates were freed) and the node where ``key``
        ends, now locked in place of ``node``. Disabled: nothing changes (the match is
        ``node`` at ``locked_len``).
        """
        if self._disabled:
            return MatchResult(slots=slots[:locked_len], node=node, length=locked_len)
        self._take_computed(key, slots, locked_len)
        match = self.match_prefix(key)
        if match.length != len(key):
            raise RuntimeError("RadixCache: a just-inserted prefix is not in the tree")
        self.inc_lock_ref(match.node)
        self.dec_lock_ref(node)
        return match

    def _take_computed(self, key: list[int], slots: torch.Tensor, locked_len: int) -> None:
        """Insert a request's computed ``key`` and free its duplicate slots (all of its own
        slots when disabled: the tree takes none)."""
        cached = self.insert(key, slots)
        duplicates_end = len(key) if self._disabled else cached
        if duplicates_end > locked_len:
            self._allocator.free(slots[locked_len:duplicates_end])

    def _split(self, child: TreeNode, at: int) -> TreeNode:
        """Split ``child`` after ``at`` tokens; returns the new upper node."""
        upper = TreeNode(child.key[:at], child.value[:at], child.parent, next(self._ids))
        upper.lock_ref = child.lock_ref
        upper.last_access = child.last_access
        upper.children = {child.key[at]: child}
        child.parent.children[child.key[0]] = upper
        child.key = child.key[at:]
        child.value = child.value[at:]
        child.parent = upper
        self._node_count += 1
        return upper

    # ----------------------------------------------------------------- locks

    def inc_lock_ref(self, node: TreeNode) -> None:
        """Lock ``node`` and its ancestors against eviction (one reference each)."""
        root = self._root
        while node is not root:
            if node.lock_ref == 0:
                size = len(node.key)
                self._evictable -= size
                self._protected += size
            node.lock_ref += 1
            node = node.parent

    def dec_lock_ref(self, node: TreeNode) -> None:
        """Drop one lock reference of ``node`` and its ancestors.

        Raises ``RuntimeError`` when a node on the path is not locked (an unbalanced unlock).
        """
        root = self._root
        while node is not root:
            if node.lock_ref <= 0:
                raise RuntimeError(f"dec_lock_ref on an unlocked node {node!r}")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                size = len(node.key)
                self._evictable += size
                self._protected -= size
                if not node.children:
                    heapq.heappush(self._heap, (node.last_access, node.id, node))
            node = node.parent

    # ----------------------------------------------------------------- eviction

    def evict(self, num_tokens: int) -> int:
        """Free at least ``num_tokens`` cached tokens if possible; returns how many were freed.

        Removes least-recently-used unlocked leaves first, giving their slots back to the
        allocator; stops early when nothing evictable is left.
        """
        freed = 0
        heap = self._heap
        root = self._root
        while freed < num_tokens and heap:
            when, node_id, node = heapq.heappop(heap)
            if node.dead or node.children or node.lock_ref:
                continue
            if when != node.last_access:
                heapq.heappush(heap, (node.last_access, node_id, node))
                continue
            size = len(node.key)
            if self._listener is not None:
                path = self._path_tokens(node)
                self._report("removed", path, len(path) - size)
            self._allocator.free(node.value)
            freed += size
            self._evictable -= size
            self._node_count -= 1
            node.dead = True
            parent = node.parent
            del parent.children[node.key[0]]
            node.parent = None
            if parent is not root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, parent.id, parent))
        self._evicted_tokens += freed
        if len(heap) > 4 * self._node_count + 64:
            self._rebuild_heap()
        return freed

    def _rebuild_heap(self) -> None:
        self._heap = [(n.last_access, n.id, n) for n in self._iter_nodes()
                      if not n.children and n.lock_ref == 0]
        heapq.heapify(self._heap)

    def reset(self) -> None:
        """Drop the whole tree, freeing every cached slot, and zero the statistics.

        Raises ``RuntimeError`` while any node is locked (a running request uses it).
        """
        if self._protected:
            raise RuntimeError(f"reset() while {self._protected} cached tokens are locked")
        if self._listener is not None and self._root.children:
            self._listener(CacheEvent(kind="cleared"))
        for node in self._iter_nodes():
            self._allocator.free(node.value)
            node.dead = True
        self._init_tree()
        self._hit_tokens = 0
        self._miss_tokens = 0
        self._evicted_tokens = 0

    # ----------------------------------------------------------------- integrity

    def _iter_nodes(self):
        """Every node except the root (iterative DFS)."""
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def check_integrity(self) -> None:
        """Verify every invariant of the tree; raises ``RuntimeError`` naming the broken one."""

        def fail(msg: str) -> None:
            raise RuntimeError(f"RadixCache integrity: {msg}")

        root = self._root
        if root.key or root.lock_ref or root.parent is not None:
            fail("the root must have an empty key, no lock and no parent")
        evictable = protected = count = 0
        values = []
        in_heap = {id(entry[2]) for entry in self._heap}
        stack = [root]
        while stack:
            node = stack.pop()
            lock_sum = 0
            for first, child in node.children.items():
                if child.parent is not node:
                    fail(f"{child!r} has a wrong parent link")
                if child.dead:
                    fail(f"{child!r} is evicted but still linked")
                if not child.key:
                    fail(f"{child!r} is a non-root node with an empty key")
                if child.key[0] != first:
                    fail(f"{child!r} is keyed by {first} but starts with {child.key[0]}")
                if len(child.value) != len(child.key):
                    fail(f"{child!r} has {len(child.value)} slots for {len(child.key)} tokens")
                if child.lock_ref < 0:
                    fail(f"{child!r} has a negative lock_ref")
                if not child.children and child.lock_ref == 0 and id(child) not in in_heap:
                    fail(f"{child!r} is an evictable leaf missing from the eviction heap")
                lock_sum += child.lock_ref
                count += 1
                if child.lock_ref:
                    protected += len(child.key)
                else:
                    evictable += len(child.key)
                values.append(child.value)
                stack.append(child)
            if node is not root and node.lock_ref < lock_sum:
                fail(f"{node!r} has fewer locks than its children together ({lock_sum})")
        if evictable != self._evictable:
            fail(f"evictable_size is {self._evictable}, the tree holds {evictable}")
        if protected != self._protected:
            fail(f"protected_size is {self._protected}, the tree holds {protected}")
        if count + 1 != self._node_count:
            fail(f"node_count is {self._node_count}, the tree has {count + 1}")
        if values:
            slots = torch.cat(values)
            if slots.unique().numel() != slots.numel():
                fail("a KV slot is held by two tree positions")
            if int(slots.min()) < 1 or int(slots.max()) > self._allocator.size:
                fail("a KV slot is out of range (slot 0 is padding)")
            if torch.isin(slots, self._allocator.free_slots()).any():
                fail("a cached KV slot is also free in the allocator")
