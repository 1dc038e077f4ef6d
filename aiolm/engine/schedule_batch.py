"""The scheduler's values: :class:`ScheduleBatch` (one pass's work),
:class:`SchedulerStatistics` (a snapshot) and :func:`check_fits`, aiolm's one admission
rule. :mod:`aiolm.engine.scheduler` re-exports them.
"""

from __future__ import annotations

import attrs
import torch

from ..errors import ContextLengthExceeded, OutOfMemory
from .forward_batch import ForwardMode
from .request import Req

__all__ = ["ScheduleBatch", "SchedulerStatistics", "check_fits"]


@attrs.define(eq=False, kw_only=True)
class ScheduleBatch:
    """One pass's work: request ``reqs[i]`` computes ``extend_lens[i]`` tokens after its
    first ``prefix_lens[i]``. ``out_cache_loc`` holds the new tokens' slots, request after
    request, already written into ``req_to_token``; ``sample_mask[i]`` says whether request
    ``i`` gets a sampled token (its computed tokens reach the end of ``all_ids``)."""

    mode: ForwardMode
    reqs: list[Req]
    prefix_lens: list[int]
    extend_lens: list[int]
    out_cache_loc: torch.Tensor
    sample_mask: list[bool]
    #: Set by :meth:`Scheduler.launched`: the batch's K/V already count as computed.
    launched: bool = False
    #: In an EXTEND batch, the requests from this index on are decode steps riding along
    #: (see ``Scheduler(mix_decode=True)``): like a decode pass, they are not cached now.
    decode_start: int | None = None


@attrs.frozen(kw_only=True)
class SchedulerStatistics:
    """A snapshot of the scheduler (the cache hit rate is the radix cache's:
    ``cache.statistics().hit_rate``, of each request's prompt at its first admission)."""

    running: int
    waiting: int
    free_slots: int
    total_slots: int
    evictable_size: int
    protected_size: int
    retractions: int
    new_token_ratio: float


def check_fits(prompt_len: int, max_tokens: int, *, context_len: int, kv_slots: int) -> None:
    """Refuse a request that could never run: aiolm's one admission rule.

    Every token of the finished sequence counts against the context, its last (sampled)
    token too, as OpenAI counts it: ``ContextLengthExceeded`` when ``prompt_len +
    max_tokens`` exceed ``context_len``. The last sampled token is never fed back, so it
    never takes a KV slot: ``OutOfMemory`` when ``prompt_len + max_tokens - 1`` (the prompt
    alone when ``max_tokens`` is 0) exceed the ``kv_slots`` of the whole pool.
    """
    total = prompt_len + max_tokens
    if total > context_len:
        raise ContextLengthExceeded(
            f"the prompt has {prompt_len} tokens and max_tokens is {max_tokens}: {total} "
            f"tokens exceed the context of {context_len}")
    peak = max(prompt_len, total - 1)
    if peak > kv_slots:
        raise OutOfMemory(
            f"the request needs {peak} KV slots; the engine has {kv_slots} (raise "
            "max_total_tokens)")
