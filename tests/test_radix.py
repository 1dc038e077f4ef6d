"""RadixCache: matching, insertion, node splits, locks, LRU eviction, integrity.

The property test drives random sequences of operations against a reference model: the
cache as a map from every cached prefix (a tuple of tokens) to the slot of its last token.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from aiolm.cache.pool import TokenSlotAllocator
from aiolm.cache.radix import RadixCache


def cache_contents(cache: RadixCache) -> dict[tuple[int, ...], int]:
    """Every cached prefix → the slot of its last token, read from the tree."""
    out: dict[tuple[int, ...], int] = {}
    stack = [(cache.root, ())]
    while stack:
        node, prefix = stack.pop()
        slots = node.value.tolist()
        for i, tok in enumerate(node.key):
            prefix = prefix + (tok,)
            out[prefix] = slots[i]
        stack.extend((child, prefix) for child in node.children.values())
    return out


def put(cache: RadixCache, alloc: TokenSlotAllocator, key: list[int]) -> int:
    """Insert ``key`` with fresh slots the way a request does, freeing duplicates."""
    slots = alloc.alloc(len(key))
    assert slots is not None
    cached = cache.insert(key, slots)
    alloc.free(slots[:cached])
    return cached


@pytest.fixture
def cache():
    alloc = TokenSlotAllocator(100)
    return RadixCache(alloc), alloc


def test_match_of_an_empty_cache_is_empty(cache):
    c, _ = cache
    res = c.match_prefix([1, 2, 3])
    assert res.length == 0 and res.slots.numel() == 0 and res.node is c.root


def test_insert_returns_already_cached_prefix_and_match_returns_its_slots(cache):
    c, alloc = cache
    assert put(c, alloc, [1, 2, 3, 4]) == 0
    assert put(c, alloc, [1, 2, 5]) == 2
    assert put(c, alloc, [1, 2, 3, 4]) == 4
    contents = cache_contents(c)
    res = c.match_prefix([1, 2, 5, 9])
    assert res.length == 3
    assert res.slots.tolist() == [contents[(1,)], contents[(1, 2)], contents[(1, 2, 5)]]
    assert c.total_size() == 5
    c.check_integrity()


def test_match_ending_inside_a_node_splits_it(cache):
    c, alloc = cache
    put(c, alloc, [7, 8, 9, 10])
    before = c.statistics().node_count
    res = c.match_prefix([7, 8, 0])
    assert res.length == 2
    assert res.node.key == [7, 8]
    assert c.statistics().node_count == before + 1
    assert list(res.node.children.values())[0].key == [9, 10]
    c.check_integrity()


def test_locked_prefix_is_protected_from_eviction(cache):
    c, alloc = cache
    put(c, alloc, [1, 2, 3])
    put(c, alloc, [1, 2, 4, 5])
    node = c.match_prefix([1, 2, 4, 5]).node
    c.inc_lock_ref(node)
    assert c.protected_size() == 4 and c.evictable_size() == 1
    freed = c.evict(100)
    assert freed == 1
    assert c.match_prefix([1, 2, 4, 5]).length == 4
    assert c.match_prefix([1, 2, 3]).length == 2
    c.dec_lock_ref(node)
    assert c.protected_size() == 0 and c.evictable_size() == 4
    assert c.evict(100) == 4
    assert alloc.available_size() == 100
    c.check_integrity()


def test_unbalanced_unlock_raises(cache):
    c, alloc = cache
    put(c, alloc, [1, 2])
    with pytest.raises(RuntimeError, match="unlocked"):
        c.dec_lock_ref(c.match_prefix([1, 2]).node)


def test_eviction_takes_least_recently_used_leaves_first(cache):
    c, alloc = cache
    put(c, alloc, [1, 1, 1])
    put(c, alloc, [2, 2, 2])
    put(c, alloc, [3, 3, 3])
    c.match_prefix([1, 1, 1])  # touch: now [2,2,2] is the oldest
    assert c.evict(1) == 3
    assert c.match_prefix([2, 2, 2]).length == 0
    assert c.match_prefix([1, 1, 1]).length == 3
    assert c.match_prefix([3, 3, 3]).length == 3
    c.check_integrity()


def test_parent_becomes_evictable_after_its_children_go(cache):
    c, alloc = cache
    put(c, alloc, [1, 2, 3])
    put(c, alloc, [1, 2, 4])
    assert c.evict(5) == 4  # both leaves, then their shared parent
    assert c.total_size() == 0
    assert alloc.available_size() == 100
    c.check_integrity()


def test_statistics_count_recorded_lookups_in_tokens(cache):
    c, alloc = cache
    assert c.statistics().hit_rate == 0.0   # no lookup yet
    put(c, alloc, [1, 2, 3])
    c.record_lookup(c.match_prefix([1, 2, 9, 9]).length, 2)
    c.match_prefix([1, 2, 3])  # matching alone records nothing
    stats = c.statistics()
    assert (stats.hit_tokens, stats.miss_tokens) == (2, 2)
    assert stats.hit_rate == 0.5
    assert stats.total_size == 3 and stats.evictable_size == 3 and stats.protected_size == 0


def admit(cache: RadixCache, alloc: TokenSlotAllocator, key: list[int]):
    """What the scheduler does for a new request: lock its cached prefix and take slots of
    its own for the rest. Returns (node, locked_len, slots of all of ``key``)."""
    match = cache.match_prefix(key)
    cache.inc_lock_ref(match.node)
    own = alloc.alloc(len(key) - match.length)
    assert own is not None
    return match.node, match.length, torch.cat([match.slots, own])


def test_cache_finished_keeps_new_tokens_frees_duplicates_and_unlocks(cache):
    c, alloc = cache
    put(c, alloc, [1, 2])
    node, locked, slots = admit(c, alloc, [1, 2, 3, 4, 5])
    assert (locked, c.protected_size()) == (2, 2)
    put(c, alloc, [1, 2, 3])          # another request caches token 3 meanwhile
    free_before = alloc.available_size()
    c.cache_finished([1, 2, 3, 4, 5], slots, node=node, locked_len=locked)
    assert alloc.available_size() == free_before + 1     # its own slot of token 3
    contents = cache_contents(c)
    assert contents[(1, 2, 3)] != int(slots[2])           # the tree kept its own
    assert [contents[(1, 2, 3, 4)], contents[(1, 2, 3, 4, 5)]] == slots[3:].tolist()
    assert c.protected_size() == 0 and c.total_size() == 5
    assert alloc.available_size() + c.total_size() == 100
    c.check_integrity()


def test_cache_unfinished_moves_the_lock_to_what_was_computed(cache):
    c, alloc = cache
    put(c, alloc, [7, 8, 9])
    node, locked, slots = admit(c, alloc, [7, 8, 1, 2])   # a chunk computed [7, 8, 1, 2]
    match = c.cache_unfinished([7, 8, 1, 2], slots, node=node, locked_len=locked)
    assert match.length == 4 and match.slots.tolist() == slots.tolist()
    assert c.protected_size() == 4 and c.evictable_size() == 1     # [9] alone is evictable
    assert c.evict(100) == 1 and c.match_prefix([7, 8, 1, 2]).length == 4
    # The next chunk: tokens 3, 4 computed while another request cached [7, 8, 1, 2, 3].
    own = alloc.alloc(2)
    put(c, alloc, [7, 8, 1, 2, 3])
    slots = torch.cat([match.slots, own])
    again = c.cache_unfinished([7, 8, 1, 2, 3, 4], slots, node=match.node, locked_len=4)
    assert again.length == 6 and again.slots[5] == own[1] and again.slots[4] != own[0]
    assert c.protected_size() == 6 and c.evictable_size() == 0
    c.cache_finished([7, 8, 1, 2, 3, 4], again.slots, node=again.node, locked_len=6)
    assert c.protected_size() == 0
    assert alloc.available_size() + c.total_size() == 100
    c.check_integrity()


def test_a_disabled_cache_takes_nothing_and_frees_the_requests_slots():
    alloc = TokenSlotAllocator(10)
    c = RadixCache(alloc, disabled=True)
    node, locked, slots = admit(c, alloc, [1, 2, 3])
    assert (node, locked) == (c.root, 0)
    match = c.cache_unfinished([1, 2, 3], slots, node=node, locked_len=0)
    assert (match.node, match.length, match.slots.numel()) == (c.root, 0, 0)
    assert alloc.available_size() == 7                  # still the request's
    c.cache_finished([1, 2, 3], slots, node=node, locked_len=0)
    assert alloc.available_size() == 10 and c.total_size() == 0
    with pytest.raises(ValueError, match="slots"):
        c.cache_finished([1, 2], slots, node=node, locked_len=0)


def test_reset_frees_everything_and_refuses_while_locked(cache):
    c, alloc = cache
    put(c, alloc, [1, 2, 3])
    node = c.match_prefix([1, 2, 3]).node
    c.inc_lock_ref(node)
    with pytest.raises(RuntimeError, match="locked"):
        c.reset()
    c.dec_lock_ref(node)
    c.reset()
    assert c.total_size() == 0 and alloc.available_size() == 100
    assert c.statistics().node_count == 1
    c.check_integrity()


def test_disabled_cache_caches_nothing():
    alloc = TokenSlotAllocator(10)
    c = RadixCache(alloc, disabled=True)
    slots = alloc.alloc(3)
    assert c.insert([1, 2, 3], slots) == 0
    assert c.match_prefix([1, 2, 3]).length == 0
    assert c.total_size() == 0
    c.inc_lock_ref(c.match_prefix([1]).node)
    c.check_integrity()


def test_insert_rejects_mismatched_slots(cache):
    c, alloc = cache
    with pytest.raises(ValueError, match="slots"):
        c.insert([1, 2, 3], alloc.alloc(2))


def test_integrity_check_detects_a_cached_slot_that_is_free(cache):
    c, alloc = cache
    put(c, alloc, [1, 2, 3])
    alloc.free(c.match_prefix([1, 2, 3]).slots[:1])
    with pytest.raises(RuntimeError, match="free in the allocator"):
        c.check_integrity()


keys = st.lists(st.integers(0, 3), min_size=1, max_size=10)


class RadixMachine(RuleBasedStateMachine):
    """Random insert / match / lock / unlock / evict, and requests that lock their cached
    prefix, compute the rest and hand it to the cache (running or finished), against a
    dict-of-prefixes model."""

    SIZE = 48

    def __init__(self):
        super().__init__()
        self.alloc = TokenSlotAllocator(self.SIZE)
        self.cache = RadixCache(self.alloc)
        self.model: dict[tuple[int, ...], int] = {}
        self.locks: list[tuple[object, tuple[int, ...]]] = []
        # Running requests: [key, locked node, locked_len, slots of all of key].
        self.requests: list[list] = []

    def model_match(self, key: list[int]) -> int:
        n = 0
        while n < len(key) and tuple(key[:n + 1]) in self.model:
            n += 1
        return n

    @rule(key=keys)
    def insert(self, key):
        need = len(key)
        if self.alloc.available_size() < need:
            self.cache.evict(need - self.alloc.available_size())
            self.model = cache_contents(self.cache)
        slots = self.alloc.alloc(need)
        if slots is None:
            assert self.cache.evictable_size() < need
            return
        expected = self.model_match(key)
        cached = self.cache.insert(key, slots)
        assert cached == expected
        self.alloc.free(slots[:cached])
        for j in range(cached, len(key)):
            self.model[tuple(key[:j + 1])] = int(slots[j])

    @rule(key=keys, limit=st.integers(-1, 12))
    def match(self, key, limit):
        assert self.cache.match_length(key) == self.model_match(key)
        assert self.cache.match_length(key, limit) == self.model_match(key[:max(limit, 0)])
        res = self.cache.match_prefix(key)
        assert res.length == self.model_match(key)
        assert res.slots.tolist() == [self.model[tuple(key[:j + 1])] for j in range(res.length)]

    @rule(key=keys)
    def lock(self, key):
        res = self.cache.match_prefix(key)
        if res.length:
            self.cache.inc_lock_ref(res.node)
            self.locks.append((res.node, tuple(key[:res.length])))

    @precondition(lambda self: self.locks)
    @rule(index=st.integers(0, 1000))
    def unlock(self, index):
        node, _ = self.locks.pop(index % len(self.locks))
        self.cache.dec_lock_ref(node)

    @rule(key=keys)
    def admit(self, key):
        match = self.cache.match_prefix(key)
        self.cache.inc_lock_ref(match.node)
        need = len(key) - match.length
        if self.alloc.available_size() < need:
            self.cache.evict(need - self.alloc.available_size())
            self.model = cache_contents(self.cache)
        own = self.alloc.alloc(need)
        if own is None:
            self.cache.dec_lock_ref(match.node)
            return
        self.requests.append([key, match.node, match.length, torch.cat([match.slots, own])])

    def _hand_over(self, index: int, *, finished: bool) -> None:
        index %= len(self.requests)
        request = self.requests[index]
        key, node, locked_len, slots = request
        new_from = self.model_match(key)
        assert new_from >= locked_len
        if finished:
            del self.requests[index]
            self.cache.cache_finished(key, slots, node=node, locked_len=locked_len)
        else:
            match = self.cache.cache_unfinished(key, slots, node=node, locked_len=locked_len)
            assert match.length == len(key)
            request[1:] = [match.node, len(key), match.slots]
        for j in range(new_from, len(key)):
            self.model[tuple(key[:j + 1])] = int(slots[j])
        if not finished:
            assert request[3].tolist() == [self.model[tuple(key[:j + 1])] for j in range(len(key))]

    @precondition(lambda self: self.requests)
    @rule(index=st.integers(0, 1000))
    def cache_unfinished(self, index):
        self._hand_over(index, finished=False)

    @precondition(lambda self: self.requests)
    @rule(index=st.integers(0, 1000))
    def cache_finished(self, index):
        self._hand_over(index, finished=True)

    @rule(n=st.integers(0, 60))
    def evict(self, n):
        evictable = self.cache.evictable_size()
        before = len(self.model)
        freed = self.cache.evict(n)
        after = cache_contents(self.cache)
        assert freed >= min(n, evictable)
        assert freed == before - len(after)
        assert set(after) <= set(self.model)
        assert all(self.model[k] == v for k, v in after.items())
        self.model = after
        if freed < n:
            assert self.cache.evictable_size() == 0

    @invariant()
    def consistent(self):
        self.cache.check_integrity()
        assert cache_contents(self.cache) == self.model
        own = sum(len(key) - locked_len for key, _, locked_len, _ in self.requests)
        assert self.alloc.available_size() + self.cache.total_size() + own == self.SIZE
        held = [*self.locks, *((node, tuple(key[:n])) for key, node, n, _ in self.requests)]
        locked = {p[:j] for _, p in held for j in range(1, len(p) + 1)}
        assert all(p in self.model for p in locked)
        assert self.cache.protected_size() == len(locked)
        assert self.cache.evictable_size() == len(self.model) - len(locked)


RadixMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_radix_cache_matches_reference_model = RadixMachine.TestCase


def test_long_shared_prefixes_match_quickly():
    alloc = TokenSlotAllocator(200_000)
    c = RadixCache(alloc)
    prefix = list(range(1000))
    for i in range(64):
        put(c, alloc, prefix + [5000 + i] * 20)
    for i in range(64):
        res = c.match_prefix(prefix + [5000 + i] * 10 + [1])
        assert res.length == 1010
    c.check_integrity()
    assert torch.equal(c.match_prefix(prefix).slots, c.match_prefix(prefix + [7]).slots)
