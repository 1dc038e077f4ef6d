"""How :meth:`aiolm.Engine.score` turns the scoring requests' results into a
:class:`~aiolm.backends.base.ScoreResult`: each continuation's token logprobs and greedy
run, the choice by ``method`` and the usage of the conditional pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .base import ScoreResult, Usage, choose_by_method

if TYPE_CHECKING:
    from ..engine.core import RequestOutput

__all__ = ["score_result"]


def score_result(method: str, conts: Sequence[Sequence[int]], shared: int,
                 cond_final: list[RequestOutput], unc_final: list[RequestOutput]) -> ScoreResult:
    """The result of scoring ``conts`` (each continuation's token ids, after the first
    ``shared`` tokens) from the final events of their conditional requests (``cond_final``,
    one per non-empty continuation, in order) and, for ``unconditional_normalized``, of
    their unconditional ones (``unc_final``, after one context token; else empty)."""

    def per_choice(results: list[RequestOutput], start: int) -> list[list[tuple[float, bool]]]:
        it = iter(results)
        out = []
        for c in conts:
            if not c:
                out.append([])
                continue
            scores = {p: (lp, g) for p, lp, g in next(it).scores}
            out.append([scores[start + k] for k in range(len(c))])
        return out

    cond = per_choice(cond_final, shared)
    token_logprobs = [[lp for lp, _ in c] for c in cond]
    greedy = [next((k for k, (_, g) in enumerate(c) if not g), len(c)) for c in cond]
    unc_logprobs = None
    if unc_final:
        unc_logprobs = [[lp for lp, _ in c] for c in per_choice(unc_final, 1)]
    index, normalized = choose_by_method(method, token_logprobs, greedy_matches=greedy,
                                         unconditional_logprobs=unc_logprobs)
    usage = Usage(prompt_tokens=sum(f.usage.prompt_tokens for f in cond_final if f.usage),
                  cached_tokens=sum(f.usage.cached_tokens for f in cond_final if f.usage))
    return ScoreResult(
        index=index, normalized_logprobs=normalized,
        token_logprobs=tuple(tuple(c) for c in token_logprobs),
        unconditional_logprobs=None if unc_logprobs is None
        else tuple(tuple(c) for c in unc_logprobs),
        usage=usage,
    )
