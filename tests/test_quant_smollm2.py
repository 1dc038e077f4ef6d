"""The quantized default on the embedded SmolLM2 (its Q4_1 GGUF kept 4-bit) against the
exact float engine on the same file (CPU; slow).

Agreement is measured with teacher forcing: the float engine generates 32 greedy tokens
for each of 20 prompts; the quantized engine then reads each prompt followed by those
tokens, and a position agrees when its greedy choice there (the top prompt logprob) is the
float engine's token. Up to a prompt's first divergence this is exactly position-by-position
equality of the two greedy outputs; after it each position is still judged on the float
engine's context, so one near-tie does not count every later token as wrong. The same pass
gives the quantized logprob of each float token, compared with the float engine's own.
"""

from __future__ import annotations

import anyio
import pytest
import smollm2
import torch
from conformance import CHECKS

from aiolm.backends.engine import Engine, LoadedModel
from aiolm.engine.layers.quant import Int4Linear, Int8Linear

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
    "The three primary colors are", "To make a cup of tea, first", "Water boils at",
    "The largest planet in the solar system is", "In 1492, Christopher Columbus",
    "A haiku about autumn:\n", "import numpy as np\n\n", "The quick brown fox",
    "Photosynthesis is the process by which", "The best way to learn a language is",
    "SELECT name FROM users WHERE", "Dear hiring manager,\n", "1, 2, 3, 5, 8, 13,",
    "The meaning of life is", "Q: What is 12 times 7?\nA:",
    "<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n", "Shakespeare wrote",
]
TOKENS = 32
MIN_AGREEMENT = 0.95
# Observed on this file: max 0.24 nats, mean 0.034 (the int8 LM head and the bfloat16
# activations of the kernels; the int4 layers are the file's own Q4_1 weights).
MAX_LOGPROB_DIFF = 0.6
MAX_MEAN_LOGPROB_DIFF = 0.1


@pytest.fixture(scope="module")
def float_model() -> LoadedModel:
    model, config = smollm2.model()
    return LoadedModel(model=model, model_config=config, tokenizer=smollm2.tokenizer(),
                       device=torch.device("cpu"), source=smollm2.gguf_path(),
                       load_format="auto")


@pytest.fixture(scope="module")
def quantized_model() -> LoadedModel:
    return LoadedModel.load(smollm2.gguf_path(), device="cpu")  # the default: "auto"


async def gather(eng: Engine, requests: list[dict]) -> list:
    results: list = [None] * len(requests)

    async def one(i: int) -> None:
        results[i] = await eng.generate(**requests[i])

    async with anyio.create_task_group() as tg:
        for i in range(len(requests)):
            tg.start_soon(one, i)
    return results


def test_auto_keeps_the_q4_1_file_4_bit(quantized_model):
    layers = quantized_model.model.model.layers
    assert all(isinstance(layer.mlp.gate_up_proj, Int4Linear) for layer in layers)
    assert all(isinstance(layer.self_attn.qkv_proj, Int4Linear) for layer in layers)
    assert isinstance(quantized_model.model.lm_head, Int8Linear)


async def test_quantized_greedy_tokens_agree_with_the_float_engine(float_model,
                                                                  quantized_model):
    async with Engine(float_model, max_total_tokens=8192) as eng:
        reference = await gather(eng, [
            {"prompt": p, "max_tokens": TOKENS, "ignore_eos": True, "logprobs": True}
            for p in PROMPTS])
    async with Engine(quantized_model, max_total_tokens=8192) as eng:
        tokenizer = quantized_model.tokenizer
        forced = await gather(eng, [
            {"input_ids": tokenizer.encode(p) + list(ref.token_ids), "max_tokens": 1,
             "prompt_logprobs": True, "top_logprobs": 1}
            for p, ref in zip(PROMPTS, reference, strict=True)])
        free = await gather(eng, [{"prompt": p, "max_tokens": TOKENS, "ignore_eos": True}
                                  for p in PROMPTS])
    agree = 0
    diffs: list[float] = []
    for ref, out in zip(reference, forced, strict=True):
        for quant, exact in zip(out.prompt_logprobs[-TOKENS:], ref.logprobs, strict=True):
            agree += quant.top[0][0] == exact.token_id
            diffs.append(abs(quant.logprob - exact.logprob))
    total = len(PROMPTS) * TOKENS
    same_prefix = sum(next((i for i, (a, b) in enumerate(zip(r.token_ids, q.token_ids,
                                                              strict=True)) if a != b), TOKENS)
                      for r, q in zip(reference, free, strict=True))
    figures = (f"teacher-forced agreement {agree}/{total} = {agree / total:.1%} (bar "
               f"{MIN_AGREEMENT:.0%}); free-running outputs equal up to the first divergence "
               f"on {same_prefix / total:.1%} of tokens; logprob difference max "
               f"{max(diffs):.3f}, mean {sum(diffs) / total:.4f} nats")
    assert agree / total >= MIN_AGREEMENT, figures
    assert max(diffs) <= MAX_LOGPROB_DIFF, figures
    assert sum(diffs) / total <= MAX_MEAN_LOGPROB_DIFF, figures


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
async def test_conformance_programs_pass_on_the_quantized_default(quantized_model, check):
    async with Engine(quantized_model, max_total_tokens=8192) as eng:
        await check(eng)
        with anyio.fail_after(10):
            await eng.flush_cache()
        stats = eng.statistics()
    assert stats.running_requests == 0 and stats.queued_requests == 0
