"""Tensor parallelism on two GPUs (NCCL, CUDA graphs on) against the one-GPU engine.

float32 models (the triton backend), so that the two ranks' partial sums differ from one
GPU's only in their reduction order: the same greedy tokens, logprobs within 1e-4. Then a
bfloat16 engine with the hybrid backend where flashinfer imports, and a killed worker.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

torch = pytest.importorskip("torch")

import anyio  # noqa: E402
from procs import spawned_children  # noqa: E402

import aiolm  # noqa: E402
from aiolm.engine.model_config import NAMED_CONFIGS  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")]

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [5, 6, 7, 8, 9, 10, 40, 41, 42], [300, 301],
           list(range(20, 120))]
TOKENS = 24


def _one_kv_head(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("gpu-one-kv-head")
    config = dict(NAMED_CONFIGS["tiny-llama"], num_key_value_heads=1, vocab_size=509)
    (directory / "config.json").write_text(json.dumps(config))
    return str(directory)


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-qwen3", "one-kv-head"])
def model(request, tmp_path_factory) -> str:
    return _one_kv_head(tmp_path_factory) if request.param == "one-kv-head" else request.param


def _engine(model: str, tp_size: int, **options) -> aiolm.Engine:
    options = {"dtype": "float32", "attention_backend": "triton", **options}
    return aiolm.Engine(model, load_format="dummy", device="cuda", tp_size=tp_size,
                        max_total_tokens=8192, max_running_requests=8, cuda_graphs=True,
                        seed=3, **options)


async def _run(engine: aiolm.Engine) -> list:
    async def one(prompt):
        return await engine.generate(input_ids=prompt, max_tokens=TOKENS, temperature=0.0,
                                     ignore_eos=True, top_logprobs=5)

    results = [await one(p) for p in PROMPTS]          # one at a time: batch-1 graphs
    async with anyio.create_task_group() as tg:        # together: larger graph buckets
        together: dict[int, object] = {}

        async def keep(i, prompt):
            together[i] = await one(prompt)

        for i, p in enumerate(PROMPTS):
            tg.start_soon(keep, i, p)
    return results + [together[i] for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def reference(model):
    async def run():
        async with _engine(model, 1) as engine:
            return await _run(engine)

    return anyio.run(run)


@pytest.mark.anyio
async def test_two_gpus_give_the_one_gpu_tokens_and_logprobs(model, reference):
    before = spawned_children()
    async with _engine(model, 2) as engine:
        assert engine._core.runner.graph_runner is not None
        results = await _run(engine)
    for got, want in zip(results, reference, strict=True):
        assert got.token_ids == want.token_ids
        for a, b in zip(got.logprobs, want.logprobs, strict=True):
            assert [t for t, _, _ in a.top] == [t for t, _, _ in b.top]
            assert [lp for *_, lp in a.top] == pytest.approx([lp for *_, lp in b.top], abs=1e-4)
    assert not (spawned_children() - before)


@pytest.mark.anyio
async def test_a_bfloat16_engine_on_two_gpus_serves_and_frees_its_memory():
    before = spawned_children()
    free_before = torch.cuda.mem_get_info(1)[0]
    async with aiolm.Engine("tiny-llama", load_format="dummy", device="cuda", tp_size=2,
                            dtype="bfloat16", max_running_requests=8,
                            max_total_tokens=8192) as engine:
        done = await engine.generate(input_ids=PROMPTS[3], max_tokens=TOKENS, ignore_eos=True)
        assert len(done.token_ids) == TOKENS
        report = await engine.check_integrity()
        assert report.running_requests == 0
    assert not (spawned_children() - before)
    # The worker's GPU is free again (its process is gone).
    assert torch.cuda.mem_get_info(1)[0] >= free_before - (64 << 20)


@pytest.mark.anyio
async def test_a_killed_gpu_worker_fails_requests_and_close_returns():
    before = spawned_children()
    engine = _engine("tiny-llama", 2)
    await engine.start()
    (worker,) = spawned_children() - before
    with pytest.raises(aiolm.BackendUnavailable, match="rank 1"):
        async with engine.stream(input_ids=PROMPTS[0], max_tokens=1900, ignore_eos=True) as s:
            async for chunk in s:
                if chunk.token_ids:
                    os.kill(worker, signal.SIGKILL)
    with pytest.raises(aiolm.BackendUnavailable):
        await engine.generate(input_ids=PROMPTS[1], max_tokens=2)
    with anyio.fail_after(60):
        await engine.aclose()
    assert not (spawned_children() - before)
