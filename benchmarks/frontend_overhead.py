"""The frontend's own overhead: ``run_batch`` of N five-primitive programs on a zero-delay
ScriptedBackend, in µs per primitive (goal: <= 30 µs).

    .venv/bin/python benchmarks/frontend_overhead.py [--n 10000] [--async-backend trio] [--profile]

The scripted model does almost no work, so the time is the program layer's: compiling
exprs, the per-state stream task, building requests, reading chunks, variables, and
``run_batch``'s scheduling. The backend's own share is measured separately (the same
requests sent straight to the backend) and printed beside it.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import anyio

from aiolm import gen, program, select
from aiolm.backends import GenerateRequest, ScriptedBackend

PRIMITIVES = 5


@program
async def five(s, i: int):
    s += f"Q{i}: name a color.\n"                     # 1 text
    s += gen("color", max_tokens=4, stop="\n")        # 2 gen
    s += "\nIs it warm? "                             # 3 text
    s += select("warm", choices=["yes", "no"])        # 4 select
    s += gen("why", max_tokens=8)                     # 5 gen


def reply(prompt: str) -> str:
    return "red\nbecause it is the color of fire"


async def batch(n: int, concurrency: int) -> tuple[float, ScriptedBackend]:
    backend = ScriptedBackend(reply)
    start = time.perf_counter()
    states = await five.run_batch([{"i": i} for i in range(n)], backend=backend, max_concurrency=concurrency)
    elapsed = time.perf_counter() - start
    errors = [s.error for s in states if s.error is not None]
    if errors:
        raise errors[0]
    return elapsed, backend


async def backend_only(recorded: ScriptedBackend) -> float:
    """The time the scripted backend itself takes for the same requests."""
    backend = ScriptedBackend(reply)
    requests = recorded.requests
    start = time.perf_counter()
    for request in requests:
        async with backend.stream(request) as chunks:
            async for _ in chunks:
                pass
    for request in requests[::2]:  # one select per two gens, scored on a same-sized prompt
        await backend.score(GenerateRequest(prompt=request.prompt), ["yes", "no"])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="programs (default 10000)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--async-backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--profile", action="store_true", help="print the top functions (cProfile)")
    args = parser.parse_args()

    async def measure() -> tuple[float, float]:
        await batch(min(args.n, 500), args.concurrency)  # warm up caches and code paths
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
        elapsed, backend = await batch(args.n, args.concurrency)
        if args.profile:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return elapsed, await backend_only(backend)

    elapsed, backend_s = anyio.run(measure, backend=args.async_backend)
    prims = args.n * PRIMITIVES
    total_us = elapsed / prims * 1e6
    backend_us = backend_s / prims * 1e6
    print(f"{args.n} programs x {PRIMITIVES} primitives on {args.async_backend}, "
          f"max_concurrency={args.concurrency}: {elapsed:.2f} s")
    print(f"total {total_us:.1f} µs/primitive = frontend {total_us - backend_us:.1f} "
          f"+ scripted backend {backend_us:.1f}  (goal: frontend <= 30)")


if __name__ == "__main__":
    main()
