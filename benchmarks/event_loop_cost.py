"""The event loop's CPU time per generated token, for ``Engine.generate``, ``Engine.stream``
and a program's ``gen`` (the async side of the engine: delivery of each step's events).

``python benchmarks/event_loop_cost.py [--requests 128] [--tokens 64] [--rounds 2]`` runs the
tiny random Llama of the tests on the CPU with every request at once and prints, per mode and
round, the main thread's CPU time (``time.thread_time``) divided by the tokens generated. The
engine thread's own work is not counted: this is what competes with it for the GIL. Compare
two versions by running this script from each checkout, alternated.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import aiolm  # noqa: E402
from aiolm import gen, program  # noqa: E402


@program
async def _complete(s, prompt: str, n: int):
    s += prompt
    s += gen("out", max_tokens=n, ignore_eos=True)


async def _main(args: argparse.Namespace) -> None:
    from mini_model import load_tiny

    rnd = random.Random(0)
    words = ["hello", "world", "fox", "dog", "the"]
    prompts = [" ".join(rnd.choice(words) for _ in range(30)) for _ in range(args.requests)]
    n = args.tokens
    async with aiolm.Engine(load_tiny(), max_running_requests=args.requests,
                            num_threads=1) as engine:

        async def generate(p: str) -> None:
            await engine.generate(p, max_tokens=n, ignore_eos=True)

        async def stream(p: str) -> None:
            async with engine.stream(p, max_tokens=n, ignore_eos=True) as chunks:
                async for _ in chunks:
                    pass

        async def run_all(one) -> None:
            async with anyio.create_task_group() as tg:
                for p in prompts:
                    tg.start_soon(one, p)

        modes = {
            "generate": lambda: run_all(generate),
            "stream": lambda: run_all(stream),
            "program": lambda: _complete.run_batch([dict(prompt=p, n=n) for p in prompts],
                                                   backend=engine,
                                                   max_concurrency=args.requests),
        }
        await modes["generate"]()  # warm up
        for r in range(args.rounds):
            for name, run in modes.items():
                cpu = time.thread_time()
                await run()
                per_token = (time.thread_time() - cpu) / (len(prompts) * n) * 1e6
                print(f"round {r} {name:9s} event-loop CPU {per_token:6.2f} us/token", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    anyio.run(_main, parser.parse_args())


if __name__ == "__main__":
    main()
