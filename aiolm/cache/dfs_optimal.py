"""The offline DFS-optimal prefix-cache hit rate of a set of requests (the SGLang paper's bound).

With a cache at least as large as the largest request and the requests taken in DFS order
over their prefix tree, every distinct tree token is computed exactly once, so

    hit rate = 1 - (distinct tree tokens) / (total prompt tokens).

The benchmarks divide an engine's achieved hit rate by this.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..sequences import common_prefix_length

__all__ = ["distinct_prefix_tokens", "dfs_optimal_hit_rate"]


def distinct_prefix_tokens(requests: Sequence[Sequence[int]]) -> int:
    """Tokens of the prefix tree (trie) of ``requests``: the number of distinct prefixes."""
    seqs = sorted(list(r) for r in requests)
    total = 0
    prev: list[int] = []
    for seq in seqs:
        # In sorted order, a sequence's new trie nodes are those past its common prefix
        # with the previous sequence.
        total += len(seq) - common_prefix_length(prev, seq)
        prev = seq
    return total


def dfs_optimal_hit_rate(requests: Sequence[Sequence[int]], *,
                         compute_last_token: bool = False) -> float:
    """The best achievable prompt-token hit rate of ``requests`` (0.0 for no tokens).

    ``compute_last_token=True`` accounts for engines that always compute at least a
    request's last token (to get its logits): each duplicate of an earlier request then
    costs one token.
    """
    total = sum(len(r) for r in requests)
    if total == 0:
        return 0.0
    computed = distinct_prefix_tokens(requests)
    if compute_last_token:
        computed += len(requests) - len({tuple(r) for r in requests})
    return 1.0 - computed / total
