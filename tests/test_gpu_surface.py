"""``logit_bias`` and prompt logprobs on CUDA, against plain-torch references.

A small dummy Llama is built once on the CPU and copied to the GPU, so the engine (default
attention backend, CUDA graphs on) and the reference (the model driver's exact torch
attention on the CPU copy, float32) compute the same weights. Tolerance: float32 on both
sides, but the GPU's attention kernels may round their dot products to TF32, so logprobs
agree within ``ATOL`` nats, and top alternatives are compared by value (ids may swap only
where the reference's values tie within that tolerance). Greedy tokens of two runs are
compared exactly only where both compute the same batch the same way (no prefix cache, one
request at a time); elsewhere they may part only where the top two (nearly) tie.
"""

from __future__ import annotations

import copy
import functools
import math
import random

import pytest

torch = pytest.importorskip("torch")
anyio = pytest.importorskip("anyio")

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
ATOL = 2e-3
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 2048, "hidden_size": 256,
    "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "max_position_embeddings": 4096, "tie_word_embeddings": False, "hidden_act": "silu",
    "eos_token_id": 2, "bos_token_id": 1,
}
PROMPT = [random.Random(0).randrange(3, CONFIG["vocab_size"]) for _ in range(96)]


@functools.cache
def models():
    """``(cpu_model, gpu_model, config)``: the same float32 dummy weights on both devices."""
    from aiolm.engine.loader import load_model

    cpu, config = load_model(CONFIG, load_format="dummy", dtype="float32", device="cpu", seed=0)
    gpu = copy.deepcopy(cpu).to(DEVICE)
    gpu.init_buffers()
    return cpu, gpu, config


def loaded():
    from aiolm.backends.engine import LoadedModel

    _, gpu, config = models()
    return LoadedModel(model=gpu, model_config=config, tokenizer=None,
                       device=torch.device(DEVICE), source="gpu-surface-llama",
                       load_format="dummy")


def reference(prompt: list[int]) -> torch.Tensor:
    """[len(prompt), vocab] raw logprobs on the CPU: row ``k`` is the distribution of the
    token after ``prompt[:k+1]``."""
    from model_driver import ModelDriver

    cpu, _, config = models()
    driver = ModelDriver(cpu, config)
    with torch.inference_mode():
        logits = driver.extend([(driver.new_request(), prompt)], return_logits="all")
    return torch.log_softmax(logits.float(), dim=-1)


def run(body, **engine_options):
    """Open an engine on the GPU model, run ``await body(engine)``, check nothing leaked."""
    from aiolm.backends.engine import Engine

    async def main():
        async with Engine(loaded(), device=DEVICE, max_total_tokens=16384,
                          **engine_options) as engine:
            result = await body(engine)
            assert (await engine.check_integrity()).idle
            return result

    return anyio.run(main)


GREEDY = {"max_tokens": 4, "ignore_eos": True, "temperature": 0.0}


def test_logit_bias_steers_greedy_decoding():
    async def body(engine):
        plain = await engine.generate(input_ids=PROMPT, **dict(GREEDY, top_logprobs=2))
        (first, _, lp_first), (runner_up, _, lp_runner_up) = plain.logprobs[0].top
        target = next(t for t in range(3, CONFIG["vocab_size"]) if t not in plain.token_ids)
        forced = await engine.generate(input_ids=PROMPT, **dict(GREEDY, logit_bias={target: 100}))
        banned = await engine.generate(input_ids=PROMPT, **dict(GREEDY, max_tokens=1,
                                                                 logit_bias={first: -100}))
        bias = lp_first - lp_runner_up + 1.0
        moved = await engine.generate(input_ids=PROMPT, **dict(
            GREEDY, max_tokens=1, logprobs=True, logit_bias={runner_up: bias}))
        return plain, target, forced, banned, moved, runner_up, lp_runner_up, bias

    # No prefix cache: every run computes the prompt's logits the same way.
    plain, target, forced, banned, moved, runner_up, lp_runner_up, bias = run(
        body, enable_radix_cache=False)
    assert plain.token_ids[0] != runner_up
    assert forced.token_ids == (target,) * 4
    assert banned.token_ids == (runner_up,)
    expected = lp_runner_up + bias - math.log1p(math.exp(lp_runner_up) * math.expm1(bias))
    assert moved.token_ids == (runner_up,)
    assert moved.logprobs[0].logprob == pytest.approx(expected, abs=1e-4)


def test_a_bias_applies_only_to_its_own_row_of_a_batch():
    async def body(engine):
        alone = await engine.generate(input_ids=PROMPT, **dict(GREEDY, top_logprobs=2))
        target = next(t for t in range(3, CONFIG["vocab_size"]) if t not in alone.token_ids)
        results = {}

        async def one(name, **options):
            results[name] = await engine.generate(input_ids=PROMPT, **dict(GREEDY, **options))

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, "plain")
            tg.start_soon(functools.partial(one, "biased", logit_bias={target: 100}))
        return alone, target, results

    alone, target, results = run(body)
    assert results["biased"].token_ids == (target,) * 4
    assert target not in results["plain"].token_ids
    for i, (a, b) in enumerate(zip(alone.token_ids, results["plain"].token_ids, strict=True)):
        if a != b:  # batched with another row, the GEMMs may round differently
            top = {t: lp for t, _, lp in alone.logprobs[i].top}
            assert b in top and top[a] - top[b] <= ATOL
            break


def test_sampling_with_logit_bias_never_syncs_the_host():
    from aiolm.engine.sampler import Sampler
    from aiolm.sampling import SamplingParams

    class Req:
        def __init__(self, rid, sampling):
            self.rid, self.sampling, self.output_ids = rid, sampling, []

    vocab = CONFIG["vocab_size"]
    sampler = Sampler(vocab_size=vocab, device=DEVICE, seed=0, eos_token_ids=[2])
    reqs = [Req("a", SamplingParams(logit_bias={5: 100.0, 6: -3.0}, top_logprobs=2)),
            Req("b", SamplingParams(logprobs=True))]
    logits = torch.randn(2, vocab, device=DEVICE)
    info = sampler.prepare(reqs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sampler.sample(logits, info)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out.next_ids.tolist() == [5, int(logits[1].argmax())]


def assert_prompt_logprobs_match(entries, prompt, ref, top):
    assert len(entries) == len(prompt) and entries[0] is None
    for k, entry in enumerate(entries[1:], start=1):
        row = ref[k - 1]
        assert entry.token_id == prompt[k]
        assert entry.logprob == pytest.approx(row[prompt[k]].item(), abs=ATOL)
        assert len(entry.top) == top
        assert [lp for _, _, lp in entry.top] == pytest.approx(row.topk(top).values.tolist(),
                                                               abs=ATOL)
        for token, _, lp in entry.top:
            assert lp == pytest.approx(row[token].item(), abs=ATOL)


def test_prompt_logprobs_match_a_cpu_forward_cached_or_not():
    async def body(engine):
        fresh = await engine.generate(input_ids=PROMPT, prompt_logprobs=True,
                                      **dict(GREEDY, top_logprobs=3))
        # Now the prompt is in the radix cache; it is computed again all the same.
        cached = await engine.generate(input_ids=PROMPT, prompt_logprobs=True,
                                       **dict(GREEDY, top_logprobs=3))
        scored = await engine.generate(input_ids=PROMPT, prompt_logprobs=True, max_tokens=0,
                                       top_logprobs=1)
        plain = await engine.generate(input_ids=PROMPT, **GREEDY)
        return fresh, cached, scored, plain

    fresh, cached, scored, plain = run(body)
    ref = reference(PROMPT)
    assert_prompt_logprobs_match(fresh.prompt_logprobs, PROMPT, ref, top=3)
    assert_prompt_logprobs_match(cached.prompt_logprobs, PROMPT, ref, top=3)
    assert_prompt_logprobs_match(scored.prompt_logprobs, PROMPT, ref, top=1)
    # Both computed the whole prompt alone; the plain run read it from the cache.
    assert fresh.token_ids == cached.token_ids and len(plain.token_ids) == 4
    assert cached.usage.cached_tokens == 0 and plain.usage.cached_tokens == len(PROMPT) - 1
    assert scored.finish_reason == "length" and scored.token_ids == ()
    assert scored.usage.completion_tokens == 0


def test_a_float32_model_gets_triton_attention_and_flashinfer_is_refused_for_it():
    from aiolm.backends.engine import Engine

    async def main():
        async with Engine(loaded(), device=DEVICE, max_total_tokens=4096) as engine:
            assert engine._core.runner.attention_backend == "triton"
        for backend in ("flashinfer", "hybrid"):
            with pytest.raises(ValueError, match="attention_backend: .* float16 or bfloat16"):
                async with Engine(loaded(), device=DEVICE, attention_backend=backend,
                                  max_total_tokens=4096):
                    pass

    anyio.run(main)
