"""Tensor parallelism on the CPU: two gloo processes give the single-process engine's results.

Every engine here is ``tp_size=2`` over tiny random models (a worker process per engine, so
each test opens as few as it can: one engine checks tokens, logprobs, the prefix cache,
cancellation and shutdown). The single-process references are computed once per model, in
this process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import anyio
import pytest
import torch
from procs import alive, spawned_children

import aiolm
from aiolm.backends.engine import LoadedModel
from aiolm.engine.config import EngineConfig
from aiolm.engine.loader import load_model
from aiolm.engine.model_config import NAMED_CONFIGS
from aiolm.engine.parallel import TPGroup, check_tensor_parallel, kv_head_range, local_heads

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [5, 6, 7, 8, 9, 10, 40, 41, 42], [300, 301]]
TOKENS = 8


def _gqa_replicated(tmp_path_factory) -> str:
    """A tiny Llama with one KV head: with two ranks the head is replicated on both."""
    directory = tmp_path_factory.mktemp("one-kv-head")
    config = dict(NAMED_CONFIGS["tiny-llama"], num_key_value_heads=1, vocab_size=509)
    (directory / "config.json").write_text(json.dumps(config))
    return str(directory)


@pytest.fixture(scope="module", params=["one-kv-head", "tiny-qwen3", "tiny-qwen2"])
def model(request, tmp_path_factory) -> str:
    """A Llama whose one KV head is replicated (and whose vocabulary is padded), Qwen3 (q/k
    norms), Qwen2 (q/k/v biases, the LM head tied to the embedding)."""
    if request.param == "one-kv-head":
        return _gqa_replicated(tmp_path_factory)
    return request.param


def _engine(model: str, tp_size: int) -> aiolm.Engine:
    return aiolm.Engine(model, load_format="dummy", device="cpu", tp_size=tp_size,
                        max_total_tokens=2048, seed=3)


async def _greedy(engine: aiolm.Engine, prompt: list[int]) -> aiolm.backends.base.Completion:
    return await engine.generate(input_ids=prompt, max_tokens=TOKENS, temperature=0.0,
                                 ignore_eos=True, top_logprobs=5)


@pytest.fixture(scope="module")
def reference(model):
    """The single-process engine's greedy tokens and top logprobs for PROMPTS."""
    async def run():
        async with _engine(model, 1) as engine:
            return [await _greedy(engine, p) for p in PROMPTS]

    return anyio.run(run)


def _top(completion) -> list[list[tuple[int, float]]]:
    return [[(t, lp) for t, _text, lp in entry.top] for entry in completion.logprobs]


@pytest.mark.anyio
async def test_two_ranks_give_the_single_process_tokens_and_logprobs(model, reference):
    before = spawned_children()
    async with _engine(model, 2) as engine:
        workers = spawned_children() - before
        assert len(workers) == 1
        results = [await _greedy(engine, p) for p in PROMPTS]
        for got, want in zip(results, reference, strict=True):
            assert got.token_ids == want.token_ids
            for got_top, want_top in zip(_top(got), _top(want), strict=True):
                assert [t for t, _ in got_top] == [t for t, _ in want_top]
                assert [lp for _, lp in got_top] == pytest.approx([lp for _, lp in want_top],
                                                                  abs=1e-4)
        # The second prompt shares six tokens with the first: a prefix-cache hit.
        assert results[1].usage.cached_tokens >= 6
        again = await _greedy(engine, PROMPTS[0])
        assert again.token_ids == reference[0].token_ids
        assert again.usage.cached_tokens == len(PROMPTS[0]) - 1
        # Leaving a stream early aborts the request and frees its slots (rank 0 keeps the
        # slot accounting of every rank).
        async with engine.stream(input_ids=PROMPTS[2], max_tokens=500, ignore_eos=True) as s:
            async for chunk in s:
                if chunk.token_ids:
                    break
        await engine.flush_cache()
        report = await engine.check_integrity()
        assert report.idle and report.request_slots == 0
    assert not (spawned_children() - before)
    assert not any(alive(pid) for pid in workers)


@pytest.mark.anyio
async def test_a_killed_worker_fails_requests_with_backend_unavailable():
    before = spawned_children()
    engine = _engine("tiny-llama", 2)
    await engine.start()
    (worker,) = spawned_children() - before
    with pytest.raises(aiolm.BackendUnavailable, match="rank 1"):
        async with engine.stream(input_ids=PROMPTS[0], max_tokens=1500, ignore_eos=True) as s:
            async for chunk in s:
                if chunk.token_ids:
                    os.kill(worker, signal.SIGKILL)
    with pytest.raises(aiolm.BackendUnavailable, match="rank 1"):
        await engine.generate(input_ids=PROMPTS[1], max_tokens=2)
    with anyio.fail_after(30):
        await engine.aclose()
    assert not (spawned_children() - before)


_ORPHAN_SCRIPT = """
import anyio, aiolm

async def main():
    engine = aiolm.Engine("tiny-llama", load_format="dummy", device="cpu", tp_size=2,
                          max_total_tokens=1024)
    await engine.start()
    print(engine._core.runner.workers.pids()[0], flush=True)
    await anyio.sleep(60)

if __name__ == "__main__":
    anyio.run(main)
"""


def test_workers_exit_when_the_engine_process_is_killed(tmp_path):
    script = tmp_path / "engine.py"
    script.write_text(_ORPHAN_SCRIPT)
    with subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                          text=True) as parent:
        try:
            worker = int(parent.stdout.readline())
            assert alive(worker)
        finally:
            parent.kill()
    deadline = time.monotonic() + 20
    while alive(worker):
        assert time.monotonic() < deadline, "the worker outlived its engine's process"
        time.sleep(0.1)


def test_each_rank_loads_its_own_rows_of_the_single_process_weights(tmp_path_factory):
    path = _gqa_replicated(tmp_path_factory)
    whole, _ = load_model(path, load_format="dummy", seed=5)
    ranks = [load_model(path, load_format="dummy", seed=5, tp=TPGroup(rank=r, size=2))[0]
             for r in range(2)]
    full = dict(whole.named_parameters())
    parts = [dict(m.named_parameters()) for m in ranks]
    d = 16
    for layer in range(2):
        qkv = f"model.layers.{layer}.self_attn.qkv_proj.weight"
        q, k, v = full[qkv].split([4 * d, d, d])
        for r in range(2):
            # Two of the four query heads each; the one KV head on both ranks.
            assert torch.equal(parts[r][qkv], torch.cat([q[2 * d * r: 2 * d * (r + 1)], k, v]))
        o = f"model.layers.{layer}.self_attn.o_proj.weight"
        assert torch.equal(torch.cat([parts[0][o], parts[1][o]], dim=1), full[o])
        down = f"model.layers.{layer}.mlp.down_proj.weight"
        assert torch.equal(torch.cat([parts[0][down], parts[1][down]], dim=1), full[down])
    # 509 vocabulary rows: 255 per rank, the last rank's tail padded with a zero row.
    emb = "model.embed_tokens.weight"
    assert parts[0][emb].shape == parts[1][emb].shape == (255, 64)
    assert torch.equal(torch.cat([parts[0][emb], parts[1][emb][:254]]), full[emb])
    assert not parts[1][emb][254].any()


def test_a_safetensors_checkpoint_is_read_rank_by_rank(tmp_path):
    from safetensors.torch import save_file

    whole, config = load_model("tiny-qwen3", load_format="dummy", seed=2)
    tensors = {name: p.detach().clone() for name, p in whole.named_parameters()}
    hf = {}
    for name, t in tensors.items():
        if name.endswith("qkv_proj.weight"):
            base = name.removesuffix("qkv_proj.weight")
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), t.split([64, 32, 32]),
                                  strict=True):
                hf[f"{base}{proj}.weight"] = part.contiguous()
        elif name.endswith("gate_up_proj.weight"):
            base = name.removesuffix("gate_up_proj.weight")
            gate, up = t.chunk(2)
            hf[f"{base}gate_proj.weight"], hf[f"{base}up_proj.weight"] = gate, up
        else:
            hf[name] = t
    save_file(hf, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(NAMED_CONFIGS["tiny-qwen3"]))
    from_file, _ = load_model(str(tmp_path), tp=TPGroup(rank=1, size=2))
    dummy, _ = load_model("tiny-qwen3", load_format="dummy", seed=2, tp=TPGroup(rank=1, size=2))
    for (name, a), (_, b) in zip(from_file.named_parameters(), dummy.named_parameters(),
                                 strict=True):
        assert torch.equal(a, b), name


def test_heads_split_evenly_or_kv_heads_replicate():
    assert local_heads(32, 8, 2) == (16, 4)
    assert local_heads(64, 8, 8) == (8, 1)
    assert local_heads(64, 4, 8) == (8, 1)
    assert [kv_head_range(r, 8, 4) for r in range(8)] == [(r // 2, 1) for r in range(8)]
    with pytest.raises(ValueError, match="tp_size: 3 does not divide the model's 32"):
        local_heads(32, 8, 3)
    with pytest.raises(ValueError, match="tp_size: 4 neither divides"):
        local_heads(12, 6, 4)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tp_size": 0}, "tp_size: must be >= 1"),
    ({"tp_size": 2, "quantization": "int8"}, "quantization: 'int8' does not combine"),
    ({"tp_size": 2, "compile": True}, "compile: .* does not combine with tp_size=2"),
])
def test_options_that_do_not_combine_with_tensor_parallelism_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(model="tiny-llama", load_format="dummy", **kwargs)


def test_models_without_a_sharded_implementation_are_refused():
    from aiolm.engine.model_config import ModelConfig

    with pytest.raises(ValueError, match="tp_size: .*MixtralForCausalLM needs tp_size=1"):
        check_tensor_parallel(ModelConfig.named("tiny-mixtral"), 2)
    with pytest.raises(ValueError, match="intermediate_size"):
        check_tensor_parallel(ModelConfig.from_hf(dict(NAMED_CONFIGS["tiny-llama"],
                                                       intermediate_size=129)), 2)
    loaded = LoadedModel.load("tiny-llama", load_format="dummy", device="cpu")
    with pytest.raises(ValueError, match="tp_size: each tensor-parallel rank loads its own"):
        aiolm.Engine(loaded, tp_size=2)


def test_serve_takes_tp_as_the_tp_size_flag():
    from aiolm.server.cli import build_parser, engine_options

    parser = build_parser()
    assert engine_options(parser.parse_args(["--tp", "2"]))["tp_size"] == 2
    assert engine_options(parser.parse_args(["--tp-size", "4"]))["tp_size"] == 4
