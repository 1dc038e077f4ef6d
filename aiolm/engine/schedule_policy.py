"""The waiting-queue orders of the scheduler's policies: ``lpm``, ``dfs-weight``, ``fcfs``.

Pure functions of the waiting requests (and, for ``lpm``, the radix cache); the scheduler
puts aged requests before whatever these return. Ordering costs a prefix match (``lpm``) or
a sort of the token lists (``dfs-weight``) per request, so the scheduler asks only while at
most ``cache_aware_limit`` requests wait; above that (and for ``fcfs``) it takes its queue,
kept in arrival order, as it is.
"""

from __future__ import annotations

import bisect

from ..cache.radix import RadixCache
from ..sequences import common_prefix_length
from .config import SCHEDULE_POLICIES as POLICIES
from .request import Req

__all__ = ["POLICIES", "dfs_weight_order", "order_by_policy"]


def order_by_policy(policy: str, reqs: list[Req], cache: RadixCache) -> list[Req]:
    """``reqs`` in the admission order of ``policy`` (a new list).

    ``lpm``: longest cached prefix first (capped at ``len(all_ids) - 1`` like admission),
    ties by arrival; ``dfs-weight``: :func:`dfs_weight_order`; ``fcfs``: arrival order.
    """
    if policy == "fcfs":
        return sorted(reqs, key=lambda r: r.arrival)
    if policy == "lpm":
        match_length = cache.match_length
        keyed = [(-match_length(r.all_ids, r.seq_len - 1), r.arrival, r) for r in reqs]
        keyed.sort(key=lambda t: (t[0], t[1]))
        return [t[2] for t in keyed]
    if policy == "dfs-weight":
        return dfs_weight_order(reqs)
    raise ValueError(f"policy: expected one of {', '.join(POLICIES)}, got {policy!r}")


def dfs_weight_order(reqs: list[Req]) -> list[Req]:
    """The paper's DFS-weight order of ``reqs`` over the prefix tree of their ``all_ids``.

    A node's weight is the number of requests in its subtree; the tree is walked in DFS
    pre-order (requests ending at a node come before its children), heavier children first,
    ties to the child holding the earliest arrival. Built from the sorted sequences (each
    subtree is a contiguous range; children are split off by binary search), so the cost is
    about O(n log n) list comparisons, never a token-by-token trie.
    """
    items = sorted(((r.all_ids, r.arrival, r) for r in reqs), key=lambda t: (t[0], t[1]))
    n = len(items)
    # Sparse table for the earliest arrival of any contiguous range of ``items``.
    table = [[t[1] for t in items]]
    width = 1
    while 2 * width <= n:
        prev = table[-1]
        table.append([min(prev[i], prev[i + width]) for i in range(n - 2 * width + 1)])
        width *= 2

    def earliest(lo: int, hi: int) -> int:
        k = (hi - lo).bit_length() - 1
        return min(table[k][lo], table[k][hi - (1 << k)])

    out: list[Req] = []
    stack = [(0, n)] if n else []   # every waiting request may be aged: none left here
    while stack:
        lo, hi = stack.pop()
        if hi - lo == 1:
            out.append(items[lo][2])
            continue
        depth = common_prefix_length(items[lo][0], items[hi - 1][0])
        while lo < hi and len(items[lo][0]) == depth:
            out.append(items[lo][2])
            lo += 1
        runs = []
        while lo < hi:
            token = items[lo][0][depth]
            end = bisect.bisect_right(items, token, lo, hi, key=lambda t: t[0][depth])
            runs.append((lo - end, earliest(lo, end), lo, end))
            lo = end
        runs.sort()
        stack.extend((s, e) for _, _, s, e in reversed(runs))
    return out
