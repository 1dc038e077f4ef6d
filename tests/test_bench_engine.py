"""The benchmark workloads on a tiny dummy engine and on the transformers peer (CPU).

The weights (``tiny-llama``, random) and the bench tokenizer load once per module; each
test opens its own engines over them (an engine belongs to one event loop).
"""

from __future__ import annotations

import json

import pytest

from aiolm.bench import WORKLOADS
from aiolm.bench.cli import bench_main
from aiolm.bench.harness import plan, run_plan
from aiolm.bench.targets import EngineTarget, HFTarget

pytest.importorskip("torch")
pytest.importorskip("transformers")

ENGINE_KWARGS = {"device": "cpu", "max_total_tokens": 8192}
LOCAL = list(WORKLOADS)


@pytest.fixture(scope="module")
def loaded():
    from aiolm.bench.models import load_for_bench

    return load_for_bench("tiny-llama", load_format="dummy", device="cpu")


@pytest.mark.anyio
async def test_every_workload_runs_on_a_tiny_dummy_engine(loaded, tmp_path):
    target = EngineTarget(loaded, **ENGINE_KWARGS)
    steps = plan([WORKLOADS[n] for n in LOCAL], target, size="tiny")
    try:
        results = await run_plan(steps, size="tiny")
    finally:
        await target.aclose()
    assert [r["name"] for r in results] == LOCAL
    for r in results:
        assert r["errors"] == {}, r["name"]
        figures = r["runs"]["aiolm"]
        assert figures["programs"] == len(WORKLOADS[r["name"]].make_inputs("tiny", 0))
        assert figures["completion_tokens"] > 0 or r["name"] == "select"
        assert figures["forward_passes"] > 0


@pytest.mark.anyio
async def test_prefix_sharing_workloads_hit_the_cache_near_the_dfs_optimum(loaded):
    target = EngineTarget(loaded, **ENGINE_KWARGS)
    steps = plan([WORKLOADS["tree-of-thought"], WORKLOADS["judge"]], target, size="tiny",
                 ablations=["radix"])
    try:
        results = await run_plan(steps, size="tiny")
    finally:
        await target.aclose()
    for r in results:
        on, off = r["runs"]["aiolm"], r["runs"]["radix-off"]
        assert 0 < on["optimal_hit_rate"] < 1
        assert on["cache_hit_rate"] > 0
        assert 0 < on["hit_rate_vs_optimal"] <= 1.0 + 1e-9
        assert off["cache_hit_rate"] == 0.0
        assert off["optimal_hit_rate"] == pytest.approx(on["optimal_hit_rate"])


@pytest.mark.anyio
async def test_transformers_peer_generates_what_the_engine_generates(loaded):
    from aiolm.backends.base import GenerateRequest
    from aiolm.backends.engine import Engine
    from aiolm.bench.hf_backend import HFBackend
    from aiolm.sampling import SamplingParams

    peer = HFBackend(loaded)
    fixed = GenerateRequest(prompt="Question: the time of year", sampling=SamplingParams(
        max_tokens=10, min_tokens=10, ignore_eos=True))
    stopped = GenerateRequest(prompt="Thought 1: people way day", sampling=SamplingParams(
        max_tokens=16, stop=["e"]))
    async with Engine(loaded, device="cpu") as engine:
        assert peer.chat_template == engine.chat_template
        for request in (fixed, stopped):
            ours, theirs = await engine.generate(request), await peer.generate(request)
            assert theirs.text == ours.text
            assert theirs.token_ids == ours.token_ids
            assert theirs.finish_reason == ours.finish_reason
            assert theirs.usage.completion_tokens == ours.usage.completion_tokens
        choices = [" alpha beta", " gamma", " delta epsilon zeta"]
        ours = await engine.score(fixed, choices)
        theirs = await peer.score(fixed, choices)
        assert theirs.index == ours.index
        assert theirs.normalized_logprobs == pytest.approx(ours.normalized_logprobs, rel=1e-4)


@pytest.mark.anyio
async def test_transformers_peer_runs_a_constrained_program(loaded):
    w = WORKLOADS["json-decode"]
    peer = HFTarget(EngineTarget(loaded, **ENGINE_KWARGS))
    async with peer.open({}) as backend:
        states = await w.program.run_batch(w.make_inputs("tiny", 0), backend=backend)
    for st in states:
        assert st.error is None
        schema = w.make_inputs("tiny", 0)[0]["schema"]
        assert set(json.loads(st["record"])) == set(schema["properties"])


def test_cli_on_a_dummy_model_writes_every_variant(tmp_path):
    out = tmp_path / "r.json"
    code = bench_main(["few-shot", "json-decode", "--dummy", "tiny-llama", "--device", "cpu",
                       "--size", "tiny", "--peer", "hf", "--peer-programs", "1", "--ablate", "all",
                       "--no-progress",
                       "--out", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["device"]["kind"] == "cpu"
    assert doc["config"]["backend"]["model"] == "tiny-llama"
    few_shot, json_decode = doc["workloads"]
    assert list(few_shot["runs"]) == ["aiolm", "radix-off", "fcfs", "hf"]
    assert set(few_shot["ratios"]) == {"aiolm/radix-off", "aiolm/fcfs", "aiolm/hf"}
    assert list(json_decode["runs"]) == ["aiolm", "jump-forward-off", "mix-decode-off", "hf"]
    assert few_shot["runs"]["radix-off"]["cache_hit_rate"] == 0.0
    assert few_shot["runs"]["aiolm"]["programs"] == 4
    assert few_shot["runs"]["hf"]["programs"] == 1              # --peer-programs 1


@pytest.fixture(scope="module")
def smollm2():
    from aiolm.bench.models import load_for_bench

    pytest.importorskip("gguf")
    return load_for_bench(None, device="cpu")


@pytest.mark.slow
@pytest.mark.anyio
async def test_transformers_peer_sees_the_engines_chat_prompts_on_smollm2(smollm2):
    from aiolm import assistant, gen, program, system, user
    from aiolm.backends.engine import Engine
    from aiolm.bench.hf_backend import HFBackend

    loaded, peer = smollm2, HFBackend(smollm2)

    @program
    async def ask(s):
        s += system("You are a helpful assistant.")
        s += user("What is the capital of France?")
        s += assistant(gen("answer", max_tokens=12))

    async with Engine(loaded, device="cpu") as engine:
        assert peer.chat_template == engine.chat_template
        assert peer.chat_template.name == "model"           # SmolLM2's own template
        ours = await ask.run(backend=engine)
    theirs = await ask.run(backend=peer)
    assert theirs["answer"] == ours["answer"]
    assert "Paris" in ours["answer"]
