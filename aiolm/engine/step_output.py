"""What one forward pass of the :class:`~aiolm.engine.runner.ModelRunner` produces.

:class:`LaunchedStep` (a pass queued on the device, until it is fetched) and
:class:`StepOutput` (its results on the host: :class:`SampledToken` per sampled row,
:class:`ScoredTokens` per scoring row). :mod:`aiolm.engine.runner` re-exports them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
import torch

if TYPE_CHECKING:
    from .scheduler import ScheduleBatch

__all__ = ["LaunchedStep", "SampledToken", "ScoredTokens", "StepOutput"]


@attrs.frozen(kw_only=True)
class SampledToken:
    """The token sampled for one request, with its logprob and top alternatives if asked."""

    token_id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


@attrs.frozen(kw_only=True)
class ScoredTokens:
    """Raw logprobs of known tokens of a scoring request computed in one pass.

    ``logprobs[k]`` is the logprob of token ``first + k`` of ``all_ids`` given the tokens
    before it; ``greedy[k]`` whether that token was also the argmax; ``top[k]`` (when the
    request asks for ``top_logprobs``, else empty) the most likely ``(token_id, logprob)``
    at that position, most likely first.
    """

    first: int
    logprobs: tuple[float, ...]
    greedy: tuple[bool, ...]
    top: tuple[tuple[tuple[int, float], ...], ...] = ()


@attrs.define(eq=False, kw_only=True)
class StepOutput:
    """What one forward pass produced, on the host, keyed by row of the scheduled batch.

    ``failed``: rows left unsampled because preparing their sampling failed, with the error
    (the request must end with it; the other rows were sampled as if it were not there).
    """

    sampled: dict[int, SampledToken] = attrs.field(factory=dict)
    scored: dict[int, ScoredTokens] = attrs.field(factory=dict)
    failed: dict[int, Exception] = attrs.field(factory=dict)


@attrs.define(eq=False, kw_only=True)
class LaunchedStep:
    """A pass queued on the device by :meth:`ModelRunner.launch`, until :meth:`ModelRunner.fetch`.

    ``sample_rows``: the batch rows sampled, in the order of ``next_ids`` (a sampled token
    of row ``sample_rows[j]`` is ``next_ids[j]``, which a placeholder ``-1 - j`` stands
    for). ``host``: the results, being copied to the host; ``ready``: the CUDA event the
    copy completes (None on the CPU, where the results are ready).
    """

    batch: ScheduleBatch
    sample_rows: list[int]
    next_ids: torch.Tensor | None
    sample_out: Any
    score_spans: list[tuple[int, int, int, list[int]]]
    score_top: int
    failed: dict[int, Exception]
    host: list[torch.Tensor]
    ready: Any = None

