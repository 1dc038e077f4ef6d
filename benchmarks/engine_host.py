"""The engine's host work per step, on the CPU: a decode step beside its forward pass, and
one scheduling pass over a long waiting queue.

1. ``decode``: a tiny random-weight Llama (2 layers, hidden 64) with SmolLM2's real
   tokenizer (49,152 tokens; so detokenization and stop checks do real work), ``--batch``
   greedy requests decoding together with a stop string that never matches. Each loop
   iteration of the engine is timed, and the model's forward pass inside it; the host's
   share is the rest (scheduling, batch building, sampling, the matchers, stop checks,
   detokenization, events, statistics), and its CPU time in the engine thread is the part
   that is its own work (the rest is waiting for the GIL while the event loop hands tokens
   to the streams). Medians over the steps where every request decodes, for ``overlap``
   off and on.
2. ``schedule``: a :class:`~aiolm.engine.scheduler.Scheduler` (no model) with ``--waiting``
   requests waiting (prompts of 200-400 tokens over 50 shared few-shot prefixes) and as
   many running as its KV pool of 30,720 slots admits (about 100): each pass tries
   admission, finds no room, and builds a decode batch, as a loaded server's does. The
   median time of one ``schedule()`` per policy.
3. ``select``: what ``select`` spends encoding its prompt (a few-shot chat prompt of about
   2,000 SmolLM2 tokens, the chat's messages literal text) for 2, 4 and 10 choices: every
   ``prompt + choice`` encoded whole (before), against
   :meth:`~aiolm.engine.tokenizer.Tokenizer.encode_continuations` (the prompt encoded
   twice, each choice with the prompt's last word). Medians of 20 runs, side by side.

Usage::

    .venv/bin/python benchmarks/engine_host.py [--only decode|schedule|select] [--batch 1,8,32]
        [--steps 64] [--waiting 10000] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any

import anyio
import torch

TINY = {"architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2,
        "tie_word_embeddings": True}


def tiny_model() -> Any:
    """The tiny Llama with SmolLM2's tokenizer, as a ``LoadedModel``."""
    from aiolm.engine.default_model import default_model_path
    from aiolm.engine.loaded import LoadedModel
    from aiolm.engine.loader import load_model
    from aiolm.engine.tokenizer import Tokenizer

    module, config = load_model(TINY, load_format="dummy", dtype="float32", device="cpu", seed=0)
    return LoadedModel(model=module, model_config=config,
                       tokenizer=Tokenizer.from_pretrained(default_model_path()),
                       device=torch.device("cpu"), source="tiny-chat", load_format="dummy")


class _Timed:
    """Wraps the model: the wall and thread CPU time of each forward pass."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.times: list[tuple[float, float]] = []

    def __call__(self, batch: Any) -> Any:
        start, cpu = time.perf_counter(), time.thread_time()
        out = self.model(batch)
        self.times.append((time.perf_counter() - start, time.thread_time() - cpu))
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


async def decode_step(loaded: Any, batch: int, steps: int, *, overlap: bool,
                      threads: int) -> dict[str, float]:
    """Median times (ms) of an engine step with ``batch`` decoding: wall, the forward pass,
    the host's share (wall minus forward), and the host's own CPU time in the engine thread
    (its CPU time minus the forward's: without the time it waits for the GIL, which the
    event loop's thread holds while it hands the previous step's tokens to the streams)."""
    from aiolm.backends.engine import Engine

    prompts = [[1000 + 17 * i + j for j in range(24)] for i in range(batch)]
    async with Engine(loaded, num_threads=threads, max_total_tokens=8192,
                      overlap=overlap) as eng:
        core = eng._core
        timed = _Timed(core.runner.model)
        core.runner.model = timed
        loop_times: list[tuple[float, float, int]] = []
        run_once = core._run_once

        def timed_run_once() -> bool:
            before = len(timed.times)
            start, cpu = time.perf_counter(), time.thread_time()
            more = run_once()
            loop_times.append((time.perf_counter() - start, time.thread_time() - cpu,
                               len(timed.times) - before))
            return more

        core._run_once = timed_run_once

        async def one(ids: list[int]) -> None:
            await eng.generate(input_ids=ids, max_tokens=steps, ignore_eos=True,
                               stop=["qqqqzzzz"])

        async with anyio.create_task_group() as tg:
            for ids in prompts:
                tg.start_soon(one, ids)
        core.runner.model = timed.model
    steps_seen = []
    fwd = iter(timed.times)
    for wall, cpu, passes in loop_times:
        spent = [next(fwd) for _ in range(passes)]
        if passes == 1:
            steps_seen.append((wall, cpu, *spent[0]))
    # Decode steps: skip the prefill passes at the start and the last few at the end.
    body = steps_seen[batch + 2:-4]

    def median_ms(values: Any) -> float:
        return 1e3 * statistics.median(values)

    return {"wall_ms": median_ms(w for w, *_ in body),
            "forward_ms": median_ms(f for _, _, f, _ in body),
            "host_ms": median_ms(w - f for w, _, f, _ in body),
            "host_cpu_ms": median_ms(c - fc for _, c, _, fc in body), "steps": len(body)}


def schedule_pass(policy: str, waiting: int, running: int = 64, passes: int = 30,
                  seed: int = 0) -> dict[str, float]:
    """Median ms of one ``schedule()`` with ``waiting`` requests queued and a full pool."""
    from aiolm.cache.pool import ReqToTokenPool, TokenSlotAllocator
    from aiolm.cache.radix import RadixCache
    from aiolm.engine.request import Req
    from aiolm.engine.scheduler import Scheduler
    from aiolm.sampling import SamplingParams

    rng = random.Random(seed)
    prefixes = [[rng.randrange(5, 30000) for _ in range(150)] for _ in range(50)]
    alloc = TokenSlotAllocator(running * 480)
    cache = RadixCache(alloc)
    sched = Scheduler(cache=cache, allocator=alloc, policy=policy,
                      req_to_token_pool=ReqToTokenPool(running + 64, 1024),
                      max_running_requests=running + 64, chunked_prefill_size=None,
                      max_prefill_tokens=1 << 20)
    for i in range(running + waiting):
        ids = rng.choice(prefixes) + [rng.randrange(5, 30000) for _ in range(rng.randint(50, 250))]
        sched.add(Req(rid=f"r{i}", input_ids=ids, sampling=SamplingParams(max_tokens=128)))
    times: list[float] = []
    token = 7
    while len(times) < passes:
        start = time.perf_counter()
        batch = sched.schedule()
        times.append(time.perf_counter() - start)
        assert batch is not None
        for req, sampled in zip(batch.reqs, batch.sample_mask, strict=True):
            if sampled:   # every computed request gets a token; none finishes
                req.output_ids.append(token)
        sched.process_result(batch)
    st = sched.statistics()
    steady = times[3:]
    return {"pass_ms": 1e3 * statistics.median(steady), "max_ms": 1e3 * max(steady),
            "running": st.running, "waiting": st.waiting}


def select_encoding(choices: int, repeats: int = 20) -> dict[str, float]:
    """Milliseconds to encode a select's prompt with each of ``choices`` choices: whole
    (``encode(prompt + choice)`` each, and the prompt alone), and by
    ``encode_continuations``; the two alternate, medians of ``repeats``."""
    from aiolm.engine.default_model import default_model_path
    from aiolm.engine.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(default_model_path())
    rng = random.Random(0)
    words = ["the", "answer", "question", "is", "a", "of", "river", "42", "Paris", "blue"]
    messages = [{"role": "system", "content": "You answer with one word."}]
    for _ in range(40):
        messages.append({"role": "user", "content": " ".join(rng.choices(words, k=20)) + "?"})
        messages.append({"role": "assistant", "content": rng.choice(words)})
    messages.append({"role": "user", "content": "Is the sky blue?"})
    prompt = tok.render_chat(messages)   # the messages marked literal, as a program's chat
    options = [f" {w}" for w in rng.choices(words, k=choices)]
    whole, split = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        expected = (tok.encode(prompt), [tok.encode(prompt + c) for c in options])
        t1 = time.perf_counter()
        got = tok.encode_continuations(prompt, options)
        t2 = time.perf_counter()
        if got != expected:
            raise AssertionError("encode_continuations differs from the whole encodings")
        whole.append(t1 - t0)
        split.append(t2 - t1)
    return {"prompt_tokens": len(expected[0]), "whole_ms": 1e3 * statistics.median(whole),
            "continuations_ms": 1e3 * statistics.median(split)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["decode", "schedule", "select"])
    parser.add_argument("--batch", default="1,8,32", help="decode batch sizes")
    parser.add_argument("--steps", type=int, default=64, help="decode tokens per request")
    parser.add_argument("--waiting", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=1, help="the engine's torch threads")
    parser.add_argument("--overlap", choices=["off", "on", "both"], default="both")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    if args.only in (None, "decode"):
        loaded = tiny_model()
        modes = {"off": [False], "on": [True], "both": [False, True]}[args.overlap]
        for batch in (int(b) for b in args.batch.split(",")):
            for overlap in modes:
                name = f"decode-bs{batch}-overlap-{'on' if overlap else 'off'}"
                fig = anyio.run(lambda b=batch, o=overlap: decode_step(
                    loaded, b, args.steps, overlap=o, threads=args.threads))
                results[name] = fig
                print(f"{name:28s} step {fig['wall_ms']:7.3f} ms  forward "
                      f"{fig['forward_ms']:7.3f} ms  host {fig['host_ms']:7.3f} ms  host CPU "
                      f"{fig['host_cpu_ms']:7.3f} ms ({fig['steps']} steps)", flush=True)
    if args.only in (None, "schedule"):
        for policy in ("lpm", "dfs-weight", "fcfs"):
            fig = schedule_pass(policy, args.waiting)
            results[f"schedule-{policy}-{args.waiting}"] = fig
            print(f"schedule {policy:10s} {args.waiting} waiting: {fig['pass_ms']:8.3f} ms a "
                  f"pass (max {fig['max_ms']:.3f}; {fig['running']} running)", flush=True)
    if args.only in (None, "select"):
        for choices in (2, 4, 10):
            fig = select_encoding(choices)
            results[f"select-encode-{choices}"] = fig
            print(f"select, {choices:2d} choices, {fig['prompt_tokens']} prompt tokens: whole "
                  f"{fig['whole_ms']:6.2f} ms, encode_continuations "
                  f"{fig['continuations_ms']:6.2f} ms", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
