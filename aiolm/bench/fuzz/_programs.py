"""Each kind of fuzz program (frontend programs, greedy requests compared after the round,
bursts that overfill the KV pool, dropped streams, prompts at the context limit, cache
flushes, cancellations), the mix they are drawn from, and :func:`_build`."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio

from ...constraints import JSONSchema, Regex
from ._common import (
    _Greedy,
    _greedy_sampling,
    _Limits,
    _Mismatch,
    _prefix,
    _Program,
    _sampling,
    _text,
)
from ._frontend import _frontend, _json_schema
from .report import first_greedy_mismatch

if TYPE_CHECKING:
    from ...backends.base import Completion
    from .run import _Run


def _build(rng: random.Random, lim: _Limits) -> _Program:
    """One random program, drawn from ``rng`` alone (all randomness is drawn here)."""
    kind = rng.choices(list(_KINDS), weights=[w for w, _ in _KINDS.values()])[0]
    return _KINDS[kind][1](rng, lim)


def _prompt_ids(rng: random.Random, lim: _Limits, n: int) -> list[int]:
    """``n`` token ids; half the time after a prefix shared with other programs."""
    shared: list[int] = []
    if rng.random() < 0.5:
        pool = random.Random(rng.randrange(3))
        shared = [pool.randrange(lim.vocab) for _ in range(min(n // 2, 256))]
    return shared + [rng.randrange(lim.vocab) for _ in range(n - len(shared))]


def _check_completion(done: Completion, *, prompt_len: int, max_tokens: int,
                      ignore_eos: bool) -> None:
    """Raise :class:`_Mismatch` if ``done`` breaks a rule any completion keeps."""
    n = len(done.token_ids)
    problems = []
    if n > max_tokens or (ignore_eos and (n != max_tokens or done.finish_reason != "length")):
        problems.append(f"{n} tokens, finish {done.finish_reason!r} for max_tokens={max_tokens}"
                        f"{' and ignore_eos' if ignore_eos else ''}")
    if done.usage.prompt_tokens != prompt_len or done.usage.completion_tokens != n:
        problems.append(f"usage {done.usage} for a {prompt_len}-token prompt and {n} tokens")
    if done.logprobs and [lp.token_id for lp in done.logprobs] != list(done.token_ids):
        problems.append("logprobs are not those of the generated tokens")
    if problems:
        raise _Mismatch("; ".join(problems))


def _long_prompt(rng: random.Random, lim: _Limits) -> _Program:
    """A token-id prompt that leaves room for just ``max_tokens`` (and a small margin)."""
    max_tokens = rng.randint(1, lim.max_new_tokens)
    n = max(1, lim.context - max_tokens - rng.randint(0, 8))
    ids = _prompt_ids(rng, lim, n)
    sampling = _sampling(rng)

    async def body(run: _Run, index: int) -> None:
        run.requests += 1
        done = await run.engine.generate(input_ids=ids, max_tokens=max_tokens, **sampling)
        _check_completion(done, prompt_len=n, max_tokens=max_tokens, ignore_eos=False)

    return _Program(label=f"long-prompt({n}+{max_tokens})", body=body)


async def _greedy_in_mix(run: _Run, ids: list[int], max_tokens: int) -> Completion:
    """Run a greedy request (with top-2 logprobs) and check its shape."""
    run.requests += 1
    done = await run.engine.generate(input_ids=ids, **_greedy_sampling(max_tokens))
    _check_completion(done, prompt_len=len(ids), max_tokens=max_tokens, ignore_eos=True)
    return done


def _greedy(rng: random.Random, lim: _Limits) -> _Program:
    """A greedy request whose output the round compares with the same request run alone
    (sometimes of 0 tokens: a prefill only; sometimes one token either side of a multiple
    of the prefill chunk, where a prompt's last chunk is one token or none)."""
    max_tokens = rng.randint(0, lim.max_new_tokens)
    n = rng.randint(1, 96)
    room = lim.context - max_tokens - 1
    if lim.chunk and room > lim.chunk and rng.random() < 0.3:
        n = lim.chunk * rng.randint(1, room // lim.chunk) + rng.choice((-1, 0, 1))
    ids = _prompt_ids(rng, lim, max(1, min(n, room)))

    async def body(run: _Run, index: int) -> None:
        done = await _greedy_in_mix(run, ids, max_tokens)
        run.greedy.append(_Greedy(index=index, input_ids=tuple(ids), max_tokens=max_tokens,
                                  completion=done))

    return _Program(label=f"greedy({len(ids)}+{max_tokens})", body=body)


def _burst(rng: random.Random, lim: _Limits) -> _Program:
    """3–8 greedy requests at once whose outputs together outgrow the KV pool by half (up
    to ``16 * max_new_tokens`` tokens each), so decoding them retracts some and recomputes
    them later. The second half repeats the first: the later twin, retracted first, must
    agree with the earlier one; the first request is also compared with itself run alone."""
    k = rng.randint(3, 8)
    firsts = [_prompt_ids(rng, lim, rng.randint(1, 32)) for _ in range(math.ceil(k / 2))]
    prompts = firsts + firsts[: k - len(firsts)]
    lengths = [max(1, min(16 * lim.max_new_tokens, math.ceil(1.5 * lim.context / k),
                          lim.context - len(ids))) for ids in prompts]

    async def body(run: _Run, index: int) -> None:
        results: list[Any] = [None] * k

        async def one(i: int) -> None:
            results[i] = await _greedy_in_mix(run, prompts[i], lengths[i])

        async with anyio.create_task_group() as tg:
            for i in range(k):
                tg.start_soon(one, i)
        run.greedy.append(_Greedy(index=index, input_ids=tuple(prompts[0]),
                                  max_tokens=lengths[0], completion=results[0]))
        for twin in range(len(firsts), k):
            problem = first_greedy_mismatch(results[twin - len(firsts)], results[twin], run.margin)
            if problem is not None:
                raise _Mismatch(f"request {twin} vs its twin {twin - len(firsts)}: {problem}")

    return _Program(label=f"burst({k}x{max(lengths)})", body=body)


def _dropped_stream(rng: random.Random, lim: _Limits) -> _Program:
    """A stream left after ``keep`` of its chunks (the exit aborts it); sometimes under a
    constraint that cannot finish before ``max_tokens`` (an abort mid-grammar)."""
    max_tokens = rng.randint(2, max(2, lim.max_new_tokens))
    keep = rng.randint(1, max_tokens - 1)
    prompt: dict[str, Any] = ({"prompt": _prefix(rng) + _text(rng)} if rng.random() < 0.5
                              else {"input_ids": _prompt_ids(rng, lim, rng.randint(1, 64))})
    constraint = None
    if rng.random() < 0.3:
        constraint = rng.choice([Regex(f"[a-z ]{{{max_tokens},}}"),
                                 JSONSchema(_json_schema(rng)[0])])
    sampling = _sampling(rng)

    async def body(run: _Run, index: int) -> None:
        run.requests += 1
        got = 0
        async with run.engine.stream(**prompt, max_tokens=max_tokens, ignore_eos=True,
                                     constraint=constraint, **sampling) as chunks:
            async for chunk in chunks:
                got += 1
                if got == keep and chunk.finish_reason is None:
                    run.dropped_streams += 1
                    break

    label = f"dropped-stream({keep}/{max_tokens}{', constrained' if constraint else ''})"
    return _Program(label=label, body=body)


def _flush(rng: random.Random, lim: _Limits) -> _Program:
    """``engine.flush_cache()`` while other programs run (it may evict only unlocked
    prefixes), after a random short delay."""
    delay = rng.uniform(0.0, 0.02)

    async def body(run: _Run, index: int) -> None:
        await anyio.sleep(delay)
        freed = await run.engine.flush_cache()
        if not isinstance(freed, int) or freed < 0:
            raise _Mismatch(f"flush_cache returned {freed!r}, not a count of freed tokens")

    return _Program(label=f"flush({delay * 1000:.0f} ms)", body=body)


def _cancelled(rng: random.Random, lim: _Limits) -> _Program:
    """Another kind of program, cancelled after a random short delay."""
    delay = rng.uniform(0.0, 0.05)
    kind = rng.choices([k for k in _KINDS if k != "cancel"],
                       weights=[w for k, (w, _) in _KINDS.items() if k != "cancel"])[0]
    inner = _KINDS[kind][1](rng, lim)

    async def body(run: _Run, index: int) -> None:
        with anyio.move_on_after(delay) as scope:
            await inner.body(run, index)
        if scope.cancelled_caught:
            run.cancelled += 1

    return _Program(label=f"cancel({delay * 1000:.0f} ms, {inner.label})", body=body)


#: Each kind of program: its weight in the mix and how to build one.
_KINDS: dict[str, tuple[float, Callable[[random.Random, _Limits], _Program]]] = {
    "frontend": (45, _frontend),
    "greedy": (12, _greedy),
    "burst": (5, _burst),
    "dropped-stream": (12, _dropped_stream),
    "long-prompt": (8, _long_prompt),
    "flush": (2, _flush),
    "cancel": (20, _cancelled),
}
