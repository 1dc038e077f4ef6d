"""Plain operations on sequences (token-id lists, strings), shared by every layer.

Imports nothing: the radix cache, the tokenizer, the backends and the chat templates all use
it, so that each rule is written once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

__all__ = ["common_prefix_length"]

_S = TypeVar("_S", bound=Sequence)


def common_prefix_length(a: _S, b: _S, b_start: int = 0) -> int:
    """Length of the common prefix of ``a`` and ``b[b_start:]``.

    ``a`` and ``b`` are of one type (two strings, two lists, two tuples): slices of
    different types never compare equal. A binary search over slice comparisons, which run
    in C: O(n log n) machine work but only O(log n) Python steps, much faster than an
    element loop for the long token runs of the radix cache.
    """
    hi = min(len(a), len(b) - b_start)
    if hi <= 0:
        return 0
    if a[:hi] == b[b_start:b_start + hi]:
        return hi
    lo = 0
    hi -= 1  # invariant: a[:lo] matches, a[:hi + 1] does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[b_start + lo:b_start + mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
