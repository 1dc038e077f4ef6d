"""A CUDA fault in one benchmark variant: the plan stops in that process and the rest runs
in a fresh one (the fault injected by ``AIOLM_BENCH_INJECT_CUDA_FAULT``; scripted backend)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import attrs
import pytest

from aiolm.bench import WORKLOADS
from aiolm.bench.harness import (
    INJECT_FAULT_ENV,
    ContextLost,
    InjectedCudaFault,
    cuda_context_lost,
    merge_records,
    plan,
    run_plan,
)
from aiolm.bench.targets import ScriptedTarget

THREE = ["few-shot", "select", "react"]


def _steps(workloads=None):
    return plan(workloads or [WORKLOADS[n] for n in THREE], ScriptedTarget(), size="tiny", by_workload=True)


def test_an_ordinary_error_is_not_a_lost_context():
    assert not cuda_context_lost(ValueError("no such field 'answer'"))


def test_an_injected_fault_is_a_lost_context_however_it_is_wrapped():
    fault = InjectedCudaFault("CUDA error: an illegal memory access was encountered")
    assert cuda_context_lost(fault)
    try:
        try:
            raise fault
        except InjectedCudaFault as exc:
            raise RuntimeError("the program failed") from exc
    except RuntimeError as wrapped:
        assert cuda_context_lost(wrapped)
    assert cuda_context_lost(ExceptionGroup("a task group", [ValueError("x"), fault]))


def _fake_torch(*, initialized: bool, synchronize_fails: bool = False):
    def synchronize():
        if synchronize_fails:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    cuda = types.SimpleNamespace(is_initialized=lambda: initialized, synchronize=synchronize)
    return types.SimpleNamespace(cuda=cuda)


def test_a_sticky_fault_counts_only_once_cuda_is_initialised(monkeypatch):
    sticky = RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(initialized=False))
    assert not cuda_context_lost(sticky)                  # no context to lose
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(initialized=True))
    assert cuda_context_lost(sticky)                      # the text names a sticky fault
    assert not cuda_context_lost(RuntimeError("CUDA out of memory"))
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(initialized=True, synchronize_fails=True))
    assert cuda_context_lost(ValueError("whatever raised, the device is gone"))


def test_torch_is_never_imported_to_answer(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert not cuda_context_lost(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert "torch" not in sys.modules


@pytest.mark.anyio
async def test_run_plan_stops_at_a_lost_context_and_keeps_what_ran_before(monkeypatch):
    monkeypatch.setenv(INJECT_FAULT_ENV, "select/aiolm")
    ran = []
    with pytest.raises(ContextLost) as info:
        await run_plan(_steps(), size="tiny", on_step_done=lambda step: ran.append(step.name))
    lost = info.value
    assert ran == ["few-shot/aiolm", "select/aiolm"]      # react never ran
    assert (lost.index, lost.next_step, lost.not_run) == (1, 2, ["react/aiolm"])
    few_shot, select = lost.records
    assert few_shot["runs"]["aiolm"]["programs"] == len(WORKLOADS["few-shot"].make_inputs("tiny", 0))
    assert select["runs"] == {}
    assert select["errors"]["aiolm"] == lost.error
    assert lost.error.startswith("CUDA context lost: InjectedCudaFault: CUDA error: an illegal memory access")


@pytest.mark.anyio
async def test_run_plan_goes_on_after_an_ordinary_error():
    async def fails(backend, inputs, options):
        raise ValueError("the program needs an 'answer' field")

    broken = attrs.evolve(WORKLOADS["select"], runner=fails)
    few_shot, select, react = await run_plan(
        _steps([WORKLOADS["few-shot"], broken, WORKLOADS["react"]]), size="tiny")
    assert select["errors"] == {"aiolm": "ValueError: the program needs an 'answer' field"}
    assert "aiolm" in few_shot["runs"] and "aiolm" in react["runs"]


@pytest.mark.anyio
async def test_run_plan_from_a_step_skips_the_steps_before_it():
    def no_inputs(size, seed):
        raise AssertionError("the inputs of a skipped step were made")

    skipped = attrs.evolve(WORKLOADS["few-shot"], make_inputs=no_inputs)
    records = await run_plan(_steps([skipped, WORKLOADS["select"], WORKLOADS["react"]]), size="tiny",
                             start=2)
    assert [r["name"] for r in records] == ["react"]
    assert records[0]["errors"] == {}


def test_merge_records_joins_variants_and_recomputes_ratios():
    def record(name, runs, errors):
        return {"name": name, "headline": "programs_per_s", "runs": runs, "errors": errors, "ratios": {}}

    before = [record("few-shot", {"aiolm": {"programs_per_s": 6.0}}, {}),
              record("select", {}, {"aiolm": "CUDA context lost: ..."})]
    after = [record("react", {"aiolm": {"programs_per_s": 1.0}}, {}),
             record("few-shot", {"radix-off": {"programs_per_s": 2.0}}, {})]
    merged = merge_records([before, after], order=THREE)
    assert [r["name"] for r in merged] == THREE
    assert list(merged[0]["runs"]) == ["aiolm", "radix-off"]
    assert merged[0]["ratios"] == {"aiolm/radix-off": 3.0}
    assert merged[1]["errors"] == {"aiolm": "CUDA context lost: ..."}


def _bench(tmp_path: Path, inject: str) -> tuple[int, dict, str]:
    out = tmp_path / "r.json"
    env = {**os.environ, INJECT_FAULT_ENV: inject}
    done = subprocess.run(
        [sys.executable, "-m", "aiolm.cli", "bench", *THREE, "--backend", "scripted", "--size", "tiny",
         "--no-progress", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=120, check=False)
    return done.returncode, json.loads(out.read_text()), done.stderr


def test_bench_runs_the_steps_after_a_cuda_fault_in_a_fresh_process(tmp_path):
    code, doc, stderr = _bench(tmp_path, "few-shot/aiolm")
    assert code == 1
    few_shot, select, react = doc["workloads"]
    assert few_shot["runs"] == {}
    assert few_shot["errors"]["aiolm"].startswith("CUDA context lost: InjectedCudaFault")
    assert doc["context_lost"] == [
        {"workload": "few-shot", "variant": "aiolm", "error": few_shot["errors"]["aiolm"]}]
    for record in (select, react):
        assert record["errors"] == {}
        assert record["runs"]["aiolm"]["programs"] == len(WORKLOADS[record["name"]].make_inputs("tiny", 0))
    assert "running steps 1.. in a fresh process" in stderr


def test_bench_resumes_again_when_the_fresh_process_faults_too(tmp_path):
    code, doc, _ = _bench(tmp_path, "few-shot/aiolm,select/aiolm")
    assert code == 1
    assert [(f["workload"], f["variant"]) for f in doc["context_lost"]] == [
        ("few-shot", "aiolm"), ("select", "aiolm")]
    assert doc["workloads"][2]["runs"]["aiolm"]["programs"] > 0


def test_steps_of_a_fresh_process_that_died_are_recorded_as_not_run(monkeypatch):
    from aiolm.bench import cli

    commands = []

    def dies(command, check):
        commands.append(command)
        return subprocess.CompletedProcess(command, -9)

    monkeypatch.setattr(cli.subprocess, "run", dies)
    run = cli._Run(steps=[("few-shot", "aiolm"), ("select", "aiolm"), ("react", "aiolm")], next_step=1,
                   results=[], limits={}, config={"size": "tiny", "workloads": THREE}, device={},
                   context_lost=[])
    handoff = cli._run_in_child([*THREE, "--backend", "scripted", "--resume-out", "old.json"], run)
    assert commands[0][-4:-1] == ["--resume-step", "1", "--resume-out"]
    assert "old.json" not in commands[0]
    assert [r["name"] for r in handoff["workloads"]] == ["select", "react"]
    for record in handoff["workloads"]:
        assert record["errors"]["aiolm"].startswith("not run: the fresh process for steps 1.. exited with code -9")


def test_resume_options_are_hidden():
    from aiolm.bench.cli import build_parser

    assert "resume" not in build_parser().format_help()
