"""The benchmark workloads and harness, on the scripted backend (fast, no model)."""

from __future__ import annotations

import json

import pytest

from aiolm.backends import ScriptedBackend
from aiolm.bench import ALL_WORKLOADS, WORKLOADS
from aiolm.bench.cli import bench_main
from aiolm.bench.harness import measure, ratios, run_workload, variants
from aiolm.bench.judge import DIMENSIONS
from aiolm.bench.recording import RecordingBackend
from aiolm.bench.results import write_json
from aiolm.bench.targets import EngineTarget, ScriptedTarget, scripted_reply
from aiolm.bench.workload import RunOptions
from aiolm.constraints import JSONSchema

SCRIPTED = list(WORKLOADS)


@pytest.mark.parametrize("name", list(ALL_WORKLOADS))
def test_inputs_are_seeded_and_sized(name):
    w = ALL_WORKLOADS[name]
    tiny = w.make_inputs("tiny", 0)
    assert tiny == w.make_inputs("tiny", 0)
    assert tiny != w.make_inputs("tiny", 1)
    assert len(w.make_inputs("small", 0)) >= len(tiny) >= 1
    with pytest.raises(ValueError, match="size"):
        w.make_inputs("huge", 0)


def test_few_shot_interleaves_subjects():
    inputs = WORKLOADS["few-shot"].make_inputs("small", 0)
    prefixes = [i["examples"] for i in inputs]
    assert prefixes[0] != prefixes[1]                   # neighbours come from different subjects
    assert len(set(prefixes)) == WORKLOADS["few-shot"].shape("small").subjects


@pytest.mark.anyio
@pytest.mark.parametrize("name", SCRIPTED)
async def test_workload_runs_end_to_end_on_scripted_backend(name, tmp_path):
    result = await run_workload(WORKLOADS[name], ScriptedTarget(), size="tiny")
    assert result["errors"] == {}
    figures = result["runs"]["aiolm"]
    assert figures["programs"] == len(WORKLOADS[name].make_inputs("tiny", 0))
    assert figures["requests"] >= figures["programs"]
    assert figures["programs_per_s"] > 0
    assert figures["prompt_tokens"] > 0
    write_json({"workloads": [result]}, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["workloads"][0]["name"] == name


@pytest.mark.anyio
async def test_tree_of_thought_issues_one_request_per_node():
    w = WORKLOADS["tree-of-thought"]
    shape = w.shape("tiny")
    backend = RecordingBackend(ScriptedBackend(scripted_reply))
    await measure(w, backend, w.make_inputs("tiny", 0)[:1], RunOptions(), tokenize=str.split)
    nodes = sum(shape.width ** level for level in range(1, shape.levels + 1))
    generated = [r for r in backend.requests if r.kind == "generate"]
    assert len(generated) == nodes + 1                  # every thought, then the answer


@pytest.mark.anyio
async def test_recording_backend_keeps_prompt_tokens_and_usage():
    inner = ScriptedBackend(lambda prompt: " yes")
    rec = RecordingBackend(inner)
    from aiolm import gen, program, select

    @program
    async def ask(s):
        s += "Is it ok?" + gen("a", max_tokens=2)
        s += " Sure?" + select("b", choices=[" yes", " no"])

    await ask.run(backend=rec)
    kinds = [r.kind for r in rec.requests]
    assert kinds == ["generate", "score", "score", "score"]  # the prefix, then each choice
    assert rec.calls == 2
    assert rec.requests[0].tokens == (0, 1, 2)         # "Is", "it", "ok?" as word ids
    assert rec.usage_totals().completion_tokens == 1
    assert rec.statistics().calls == 1                  # the inner backend's own extras


def test_scripted_reply_satisfies_the_json_workload_schemas():
    w = WORKLOADS["json-decode"]
    for inputs in w.make_inputs("small", 0):
        schema = inputs["schema"]
        prompt = "fill in a JSON record with this schema: " + json.dumps(schema) + "\n\ndoc\n\nRecord: "
        assert JSONSchema(schema).matches_text(scripted_reply(prompt))


def test_ratios_say_how_much_better_aiolm_is():
    runs = {"aiolm": {"programs_per_s": 6.0, "requests": 2}, "radix-off": {"programs_per_s": 2.0, "requests": 10}}
    assert ratios("programs_per_s", runs) == {"aiolm/radix-off": 3.0}
    assert ratios("requests", runs) == {"aiolm/radix-off": 5.0}     # fewer calls is better


def test_variants_follow_the_workload_and_target():
    few_shot = WORKLOADS["few-shot"]
    engine = EngineTarget("tiny-llama", load_format="dummy")
    names = [v.name for v in variants(few_shot, engine, ["radix", "schedule", "jump-forward"], None)]
    assert names == ["aiolm", "radix-off", "fcfs"]
    scripted = [v.name for v in variants(few_shot, ScriptedTarget(), ["radix"], None)]
    assert scripted == ["aiolm"]                         # nothing to switch off on a script


def test_bench_cli_writes_well_formed_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = bench_main(["few-shot", "react", "--backend", "scripted", "--size", "tiny",
                       "--no-progress", "--out", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["format"] == "aiolm-bench/1"
    assert doc["device"]["kind"] == "cpu"
    assert doc["config"]["size"] == "tiny"
    assert [w["name"] for w in doc["workloads"]] == ["few-shot", "react"]
    assert doc["workloads"][0]["runs"]["aiolm"]["programs"] == 4
    assert "few-shot" in capsys.readouterr().out


def test_bench_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        bench_main(["no-such-workload", "--backend", "scripted"])
    with pytest.raises(SystemExit):
        bench_main(["--backend", "scripted"])           # neither a workload nor a suite
    assert "unknown workload" in capsys.readouterr().err


@pytest.mark.anyio
async def test_api_speculation_saves_calls_and_keeps_the_fields():
    from aiolm.bench.api_spec import FIELDS, SPEC_TOKENS, extract_fields
    from aiolm.bench.openai_bridge import served_as_openai

    inputs = WORKLOADS["api-spec"].make_inputs("tiny", 0)
    fields, calls = {}, {}
    for spec in (None, SPEC_TOKENS):
        server_side = RecordingBackend(ScriptedBackend(scripted_reply))
        async with served_as_openai(server_side, spec_tokens=spec) as api:
            states = await extract_fields.run_batch(inputs, backend=api, raise_errors=True)
        fields[spec] = [[st[f] for f in FIELDS] for st in states]
        calls[spec] = server_side.calls
    assert fields[SPEC_TOKENS] == fields[None]
    assert calls[None] == len(inputs) * len(FIELDS)
    assert calls[None] / calls[SPEC_TOKENS] >= 2.5


@pytest.mark.anyio
async def test_optimal_hit_rate_is_computed_over_the_requests_a_fork_issues():
    from aiolm import gen, program
    from aiolm.bench.workload import Workload

    @program
    async def branches(s):
        s += "a b c"
        async with s.fork(2) as forks:
            forks[0] += " d" + gen("x", max_tokens=1)
            forks[1] += " e" + gen("x", max_tokens=1)

    w = Workload(name="t", summary="", program=branches, make_inputs=lambda size, seed: [{}],
                 shape=lambda size: None, vs_optimal=True)
    figures = await measure(w, ScriptedBackend(lambda prompt: " z"), [{}], RunOptions(),
                            tokenize=str.split)
    # The requests: the shared prefix (a fork's prefill), then a b c d and a b c e:
    # 11 prompt tokens, 5 distinct ones in their prefix tree.
    assert figures["optimal_hit_rate"] == pytest.approx(1 - 5 / 11)
    assert figures["hit_rate_vs_optimal"] == 0.0            # the scripted backend caches nothing


def test_plan_groups_runs_by_engine_settings_or_by_workload():
    from aiolm.bench.harness import plan
    from aiolm.bench.targets import HFTarget

    engine = EngineTarget("tiny-llama", load_format="dummy")
    chosen = [WORKLOADS["select"], WORKLOADS["react"]]
    grouped = plan(chosen, engine, size="tiny", ablations=["radix"], peer=HFTarget(engine))
    names = [(st.workload.name, st.variant.name) for st in grouped]
    assert names == [("select", "aiolm"), ("react", "aiolm"), ("select", "radix-off"),
                     ("react", "radix-off"), ("select", "hf"), ("react", "hf")]
    side_by_side = plan(chosen, engine, size="tiny", ablations=["radix"], peer=HFTarget(engine),
                        by_workload=True)
    assert [(st.workload.name, st.variant.name) for st in side_by_side] == [
        ("select", "aiolm"), ("select", "radix-off"), ("select", "hf"),
        ("react", "aiolm"), ("react", "radix-off"), ("react", "hf")]


def test_gpu_suite_is_delegated_with_its_own_options(monkeypatch, tmp_path):
    import subprocess

    from aiolm.bench import cli

    script = tmp_path / "benchmarks" / "gpu_suite.py"
    script.parent.mkdir()
    script.write_text("")
    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert cli.bench_main(["--suite", "gpu", "--out", "results", "--budget", "400"]) == 0
    assert calls[0][1:] == [str(script), "--out", "results", "--budget", "400"]


@pytest.mark.anyio
async def test_programs_run_through_the_openai_server_when_asked():
    from aiolm.bench.harness import plan, run_plan

    steps = plan([WORKLOADS["judge"], WORKLOADS["multi-turn"]], ScriptedTarget(), size="tiny",
                 via_openai=True)
    judge, chat = await run_plan(steps, size="tiny")
    assert judge["errors"] == chat["errors"] == {}
    shape = WORKLOADS["judge"].shape("tiny")
    # Counted at the server: each essay's verdicts and its score (fork prefills stay client-side).
    assert judge["runs"]["aiolm"]["requests"] == shape.programs * (len(DIMENSIONS) + 1)
    # Each turn streamed through the server (one request each), its first piece timed in the run.
    turns, streamed = WORKLOADS["multi-turn"].shape("tiny"), chat["runs"]["aiolm"]
    assert streamed["requests"] == turns.programs * turns.turns
    for figure in ("ttft_first_turn_ms", "ttft_later_turns_ms"):
        assert 0 < streamed[figure] < 1000 * streamed["wall_s"], figure


def test_the_shared_prefix_ablation_runs_only_where_the_run_turned_it_on():
    from aiolm.bench.harness import variants
    from aiolm.bench.image_qa import WORKLOAD as IMAGE_QA
    from aiolm.bench.targets import EngineTarget

    def names(target):
        return [v.name for v in variants(IMAGE_QA, target, ["radix", "shared-prefix"], None)]

    assert names(EngineTarget("tiny-llava", load_format="dummy", device="cpu")) == [
        "aiolm", "radix-off"]
    on = EngineTarget("tiny-llava", load_format="dummy", device="cpu",
                      shared_prefix_min_tokens=256)
    assert names(on) == ["aiolm", "radix-off", "shared-prefix-off"]
    off = [v for v in variants(IMAGE_QA, on, ["shared-prefix"], None) if v.name != "aiolm"]
    assert off[0].engine_kwargs == {"shared_prefix_min_tokens": 0}
    assert on.describe()["shared_prefix_min_tokens"] == 256
    # Unset on CUDA: the engine decides (on for multi-head models), so the ablation runs;
    # set to 0, it is off already.
    assert EngineTarget("tiny-llava", load_format="dummy", device="cuda").supports(
        "shared-prefix")
    assert not EngineTarget("tiny-llava", load_format="dummy", device="cuda",
                            shared_prefix_min_tokens=0).supports("shared-prefix")


def test_the_bench_takes_the_shared_prefix_option():
    from aiolm.bench.cli import _make_target, build_parser

    args = build_parser().parse_args(["image-qa", "--shared-prefix-min-tokens", "256"])
    assert args.shared_prefix_min_tokens == 256
    assert build_parser().parse_args(["image-qa"]).shared_prefix_min_tokens is None
    off = build_parser().parse_args(["image-qa", "--shared-prefix-min-tokens", "0"])
    assert _make_target(off, "tiny-llava").base_kwargs == {"shared_prefix_min_tokens": 0}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["image-qa", "--shared-prefix-min-tokens", "-1"])


def test_the_gpu_suite_runs_only_the_workloads_asked(tmp_path):
    """``benchmarks/gpu_suite.py --dry-run --workloads throughput --skip ablations`` (tiny
    Llama on the CPU): the throughput figure and nothing else of aiolm's; an unknown
    workload is a usage error naming it."""
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_suite.py"
    skips = [a for s in ("tests", "limits", "peer", "sanitizer", "soak", "ablations")
             for a in ("--skip", s)]
    done = subprocess.run([sys.executable, str(script), "--dry-run", "--out", str(tmp_path),
                           "--budget", "120", *skips, "--workloads", "throughput"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_results.json").read_text())
    record = result["sections"]["aiolm"]["result"]["torch"]
    assert record["throughput"]["out_tok_s"] > 0
    assert not {"decode_bs1", "prefill_8k", "few_shot"} & set(record)
    assert "radix_off" not in result["sections"]["aiolm"]["result"]
    bad = subprocess.run([sys.executable, str(script), "--dry-run", "--out", str(tmp_path),
                          "--workloads", "throughput,warp-drive"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--workloads: unknown warp-drive" in bad.stderr
