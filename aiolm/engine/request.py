"""One generation request as the engine loop sees it: plain state, no behaviour.

THE INVARIANT (shared by prefill, chunked prefill, retraction-recompute and jump-forward):
a request's tokens are :attr:`Req.all_ids`; K/V exist for the first ``kv_len`` of them
(``req_to_token[req_pool_idx, :kv_len]``). When ``num_missing == 1`` the request needs a
DECODE step; when more, an EXTEND of (up to a chunk of) the missing tokens. Sampling
happens only when an extend reaches the end of ``all_ids``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from ..sampling import SamplingParams

if TYPE_CHECKING:
    from ..cache.radix import TreeNode
    from ..constraints.base import Matcher

__all__ = ["Req"]


@attrs.define(eq=False, kw_only=True)
class Req:
    """A request's tokens, sampling parameters and engine-side bookkeeping.

    Written by the scheduler (``req_pool_idx``, ``kv_len``, ``alloc_len``, ``locked_len``,
    ``cached_len``, ``last_node``, ``arrival``, ``overtaken``, ``retractions``) and by the
    runtime (``output_ids``, ``finish_reason``, ``matcher``; ``return_all_logits`` and
    ``max_prefix_match`` once a request that generates has its prompt's scores).
    """

    rid: str
    input_ids: list[int]
    sampling: SamplingParams = attrs.field(factory=SamplingParams)
    output_ids: list[int] = attrs.field(factory=list)
    matcher: Matcher | None = None
    #: Scoring: the runner returns the logprobs of every computed token whose next token is
    #: known, not just the last logits (the request is still sampled if ``max_tokens > 0``).
    return_all_logits: bool = False
    #: At most this many leading tokens may come from the prefix cache (scoring needs the
    #: logits from that position on); ``None`` means no limit beyond ``len(all_ids) - 1``.
    max_prefix_match: int | None = None
    #: A caller's own data (the runtime's stream handle, say); the scheduler never reads it.
    user_data: Any = None

    finish_reason: str | None = None
    req_pool_idx: int | None = None
    #: Tokens whose K/V are computed and in the pool.
    kv_len: int = 0
    #: Tokens with slots in ``req_to_token`` (``kv_len`` plus those of the pass in flight).
    alloc_len: int = 0
    #: Leading tokens whose slots belong to the radix tree (locked through ``last_node``);
    #: the request owns the slots of ``locked_len .. alloc_len``.
    locked_len: int = 0
    #: Prompt tokens that came from the radix cache at first admission (usage.cached_tokens).
    cached_len: int = 0
    last_node: TreeNode | None = None
    #: Monotone arrival counter, set by ``Scheduler.add``.
    arrival: int = 0
    #: Scheduling passes in which later-arrived requests were admitted while this one waited.
    overtaken: int = 0
    #: Times the request was admitted (more than once after retraction).
    admissions: int = 0
    #: Times the request was retracted to free KV memory.
    retractions: int = 0

    @property
    def all_ids(self) -> list[int]:
        """Prompt then output tokens (a new list)."""
        return self.input_ids + self.output_ids

    @property
    def seq_len(self) -> int:
        """``len(all_ids)`` without building the list."""
        return len(self.input_ids) + len(self.output_ids)

    @property
    def num_missing(self) -> int:
        """Tokens of ``all_ids`` whose K/V are not computed yet."""
        return len(self.input_ids) + len(self.output_ids) - self.kv_len

    @property
    def needs_extend(self) -> bool:
        """True when more than one token is missing (prefill, chunk, recompute, jump-forward)."""
        return self.num_missing > 1

    @property
    def needs_decode(self) -> bool:
        """True when exactly the last token is missing."""
        return self.num_missing == 1

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def remaining_tokens(self) -> int:
        """Output tokens still allowed by ``max_tokens``."""
        return max(0, self.sampling.max_tokens - len(self.output_ids))
