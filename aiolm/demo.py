"""``aiolm demo``: a real structured program on the embedded model, with cache statistics."""

from __future__ import annotations

import time

import aiolm
from aiolm import assistant, gen, program, select, system, user


@program
async def trip_planner(s, city: str):
    s += system("You are a concise travel assistant. Answer in one short sentence.")
    s += user("Which city is the capital of France?")
    s += assistant(select("capital", choices=["London", "Paris", "Berlin"]))
    s += user(f"What is {city} famous for?")
    s += assistant(gen("famous", max_tokens=40, stop="\n"))
    aspects = ["food", "museums", "parks"]
    async with s.fork(len(aspects)) as forks:
        for f, aspect in zip(forks, aspects, strict=True):
            f += user(f"Name one thing to enjoy in {city} for {aspect}.")
            f += assistant(gen("tip", max_tokens=32, stop="\n"))
    forks.join()


async def run_demo(model: str | None = None, device: str = "auto") -> None:
    t0 = time.perf_counter()
    async with aiolm.Engine(model, device=device) as engine:
        t1 = time.perf_counter()
        print(f"loaded {engine.model_name} in {t1 - t0:.1f} s")
        answer = await engine.generate("The capital of France is", max_tokens=8)
        print(f"completion: 'The capital of France is{answer.text}'")
        state = await trip_planner.run(city="Paris", backend=engine)
        print(f"capital:    {state['capital']}")
        print(f"famous:     {state['famous'].strip()}")
        for aspect, tip in zip(["food", "museums", "parks"], state["tip"], strict=True):
            print(f"tip ({aspect}): {tip.strip()}")
        stats = engine.statistics()
        print(
            f"\nengine: {stats.prompt_tokens} prompt tokens, {stats.cached_tokens} served from "
            f"the radix cache (hit rate {stats.cache_hit_rate:.0%}), "
            f"{stats.completion_tokens} generated, in {time.perf_counter() - t1:.1f} s"
        )
