"""The ``generate`` hooks of the transformers peer: the engine's rules as logits processors
and a stopping criterion (batch 1; they run on the peer's worker thread)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from transformers import LogitsProcessor, StoppingCriteria

from ..backends.base import Chunk

if TYPE_CHECKING:
    import threading

    from ..constraints.base import Matcher
    from ..engine.stopping import StopChecker
    from ..sampling import SamplingParams

__all__ = ["BanBeforeMin", "ConstraintMask", "StopRules"]


class BanBeforeMin(LogitsProcessor):
    """Until ``min_tokens`` exist, ban the stop token ids and (unless ``ignore_eos``) EOS,
    exactly as the engine's sampler does."""

    def __init__(self, prompt_len: int, sampling: SamplingParams, eos_token_ids: Iterable[int]) -> None:
        banned = set(sampling.stop_token_ids)
        if not sampling.ignore_eos:
            banned.update(eos_token_ids)
        self._prompt_len = prompt_len
        self._min = sampling.min_tokens
        self._banned = sorted(banned)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._banned and input_ids.shape[1] - self._prompt_len < self._min:
            scores = scores.clone()
            scores[:, [t for t in self._banned if t < scores.shape[1]]] = -torch.inf
        return scores


class ConstraintMask(LogitsProcessor):
    """Allow only the tokens the constraint's matcher allows (advanced by every new token)."""

    def __init__(self, matcher: Matcher, prompt_len: int) -> None:
        self._matcher = matcher
        self._prompt_len = prompt_len
        self._seen = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        start = self._prompt_len + self._seen
        for token in input_ids[0, start:].tolist():
            self._matcher.advance(token)
        self._seen = input_ids.shape[1] - self._prompt_len
        vocab = scores.shape[1]
        row = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
        self._matcher.fill_next_token_mask(row)
        bits = (row.to(torch.int64)[:, None] >> torch.arange(32)) & 1
        allowed = bits.flatten()[:vocab].bool().to(scores.device)
        return scores.masked_fill(~allowed, -torch.inf)


class StopRules(StoppingCriteria):
    """Feed each new token to the engine's :class:`StopChecker`, stream the safe text, and
    stop when it says so (or when the caller has left, ``stop`` set)."""

    def __init__(self, checker: StopChecker, prompt_len: int, out_ids: list[int],
                 emit: Callable[[Chunk], None], stop: threading.Event) -> None:
        self._checker = checker
        self._prompt_len = prompt_len
        self._out = out_ids
        self._emit = emit
        self._stop = stop
        self._fed = 0

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        new = input_ids[0, self._prompt_len + self._fed:].tolist()
        self._fed += len(new)
        update = self._checker.feed(new)
        taken = new[: update.consumed]
        self._out.extend(taken)
        if update.text or taken:
            self._emit(Chunk(text=update.text, token_ids=tuple(taken)))
        done = self._checker.finished or self._stop.is_set()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)
