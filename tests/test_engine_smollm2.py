"""The engine end to end on the embedded SmolLM2-135M-Instruct (CPU; slow).

The weights load once per session (``tests/smollm2.py``); each test opens a cheap Engine
over them, so every async test runs on asyncio and trio.
"""

from __future__ import annotations

import anyio
import pytest
import smollm2
import torch
from conformance import CHECKS

from aiolm import assistant, gen, program, select, system, user
from aiolm.backends.base import GenerateRequest
from aiolm.backends.engine import Engine, LoadedModel

pytestmark = [pytest.mark.slow, pytest.mark.anyio]


@pytest.fixture(scope="module")
def smol() -> LoadedModel:
    model, config = smollm2.model()
    return LoadedModel(model=model, model_config=config, tokenizer=smollm2.tokenizer(),
                       device=torch.device("cpu"), source=smollm2.gguf_path(),
                       load_format="auto")


def engine(smol: LoadedModel, **options) -> Engine:
    options.setdefault("max_total_tokens", 8192)
    return Engine(smol, **options)


@program
async def capital(s):
    s += user("What is the capital of France?")
    s += assistant(gen("answer", max_tokens=24))


@program
async def capital_choice(s):
    s += user("What is the capital of France?")
    s += assistant("The capital of France is " + select("city", choices=["London", "Paris"]))


@program
async def three_facts(s):
    s += system("You are a helpful assistant.")
    s += user("Tell me about Paris.")
    async with s.fork(3) as forks:
        forks += lambda i: assistant(f"Fact {i + 1}:" + gen("fact", max_tokens=8, stop="\n"))
    forks.join()


async def test_capital_of_france_is_paris(smol):
    async with engine(smol) as eng:
        state = await capital.run(backend=eng)
    assert "Paris" in state["answer"]
    assert state.meta("answer").finish_reason == "stop"


async def test_select_picks_paris_over_london(smol):
    async with engine(smol) as eng:
        state = await capital_choice.run(backend=eng)
    assert state["city"] == "Paris"
    assert "The capital of France is Paris<|im_end|>" in state.text()


async def test_select_methods_agree_on_an_easy_choice(smol):
    async with engine(smol) as eng:
        prompt = eng.chat_template.prefix["user"] + "What is the capital of France?" \
            + eng.chat_template.suffix["user"] + eng.chat_template.prefix["assistant"] \
            + "The capital of France is"
        prefix = GenerateRequest(prompt=prompt)
        results = {m: await eng.score(prefix, [" London", " Paris", " Rome"], m)
                   for m in ("token_length_normalized", "greedy", "unconditional_normalized")}
    assert {r.index for r in results.values()} == {1}
    unc = results["unconditional_normalized"].unconditional_logprobs
    assert unc is not None and [len(u) for u in unc] == [1, 1, 1]


async def test_fork3_program_hits_the_prefix_cache(smol):
    async with engine(smol) as eng:
        state = await three_facts.run(backend=eng)
        stats = eng.statistics()
    assert len(state["fact"]) == 3
    assert stats.cache_hit_rate > 0
    assert all(m.cached_tokens > 0 for m in state.meta("fact"))


async def test_stop_string_split_across_tokens_ends_the_text(smol):
    async with engine(smol) as eng:
        prompt = eng.chat_template.prefix["user"] + "What is the capital of France?" \
            + eng.chat_template.suffix["user"] + eng.chat_template.prefix["assistant"]
        free = await eng.generate(prompt, max_tokens=16)
        assert "France is Paris" in free.text
        stopped = await eng.generate(prompt, max_tokens=16, stop="ce is Par")
    assert stopped.finish_reason == "stop"
    assert stopped.matched_stop == "ce is Par"
    assert stopped.text == free.text[: free.text.index("ce is Par")]


async def test_aborting_a_stream_frees_its_slots(smol):
    async with engine(smol) as eng:
        async with eng.stream("Write a long story about a dragon.", max_tokens=200,
                              ignore_eos=True) as chunks:
            async for chunk in chunks:
                if chunk.token_ids:
                    break
        await eng.flush_cache()
        stats = eng.statistics()
    assert stats.running_requests == 0
    assert stats.free_kv_slots == stats.total_kv_slots


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
async def test_frontend_conformance_programs_pass_on_the_engine(smol, check, anyio_backend):
    async with engine(smol) as eng:
        await check(eng)
        with anyio.fail_after(10):
            await eng.flush_cache()
        stats = eng.statistics()
    assert stats.running_requests == 0 and stats.queued_requests == 0
    assert stats.protected_kv_tokens == 0
