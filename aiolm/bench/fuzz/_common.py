"""What the fuzzer's programs share: the limits they are drawn within, a program's shape,
the mismatch a program raises when an output breaks a rule, and the random draws of text
and sampling."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import attrs

from ..synth import sentence, words

if TYPE_CHECKING:
    from ...backends.base import Completion
    from ...backends.engine import Engine
    from ...program import ProgramState
    from .run import _Run


class _Mismatch(Exception):
    """A program's output broke a rule it must keep (a constraint, a token count)."""


@attrs.frozen(kw_only=True)
class _Limits:
    """What programs may ask of this engine."""

    #: Longest prompt + max_tokens: the model's context, or the KV pool if smaller.
    context: int
    vocab: int
    max_new_tokens: int
    #: The most prompt tokens one pass computes (prompts are chunked beyond it); 0: unknown.
    chunk: int = 0

    @classmethod
    def of(cls, engine: Engine, max_new_tokens: int) -> _Limits:
        # NOTE: the model's context, vocabulary and prefill chunk are not public on Engine;
        # the core holds them as plain attributes (the values its request validation uses).
        core = engine._require_core()
        pool = engine.statistics().total_kv_slots
        return cls(context=min(core.context_len, pool), vocab=core.vocab_size,
                   max_new_tokens=max_new_tokens,
                   chunk=core.runner.chunked_prefill_size or 0)


@attrs.frozen(kw_only=True)
class _Greedy:
    """A greedy request a program ran in the mix, to re-run alone after the round."""

    index: int
    input_ids: tuple[int, ...]
    max_tokens: int
    completion: Completion


#: A program's coroutine: ``body(run, index)``.
_Body = Callable[["_Run", int], Awaitable[None]]
#: One step of a frontend program, applied to a state (or a fork branch).
_Op = Callable[["ProgramState", "_Run"], Awaitable[None]]


@attrs.frozen(kw_only=True)
class _Program:
    label: str
    body: _Body


def _prefix(rng: random.Random) -> str:
    """A program's opening text: half the time one of a few prefixes shared across
    programs (cache hits, in-batch prefix sharing), else a few words of its own."""
    if rng.random() < 0.5:
        return sentence(random.Random(rng.randrange(4)), 24) + "\n"
    return sentence(rng, rng.randint(1, 6)) + "\n"


def _text(rng: random.Random) -> str:
    """A few words of text before a generation; sometimes odd characters."""
    text = words(rng, rng.randint(1, 8))
    if rng.random() < 0.15:
        text += rng.choice([" é ü ß", " 🙂 ok", "\n\t", ' "quoted"', " {json: 1}"])
    return text


def _sampling(rng: random.Random) -> dict[str, Any]:
    if rng.random() < 0.5:
        return {"temperature": 0.0}
    out: dict[str, Any] = {"temperature": rng.choice([0.5, 1.0, 1.5]), "seed": rng.randrange(2**31)}
    if rng.random() < 0.4:
        key, value = rng.choice([("top_p", 0.9), ("top_k", 20), ("min_p", 0.05),
                                 ("frequency_penalty", 0.8), ("presence_penalty", -0.5)])
        out[key] = value
    return out


def _greedy_sampling(max_tokens: int) -> dict[str, Any]:
    return {"temperature": 0.0, "max_tokens": max_tokens, "ignore_eos": True,
            "logprobs": True, "top_logprobs": 2}
