"""``aiolm bench --backend ray``: the plan, the figures and the goals (no Ray), the command
line's checks, and one tiny run of two tiny-llama replicas on a local Ray instance."""

from __future__ import annotations

import math

import pytest

from aiolm.bench import few_shot
from aiolm.bench.cli import bench_main
from aiolm.bench.ray_bench import (
    SINGLE,
    SINGLE_TOTAL_KV,
    RayBenchSpec,
    _figures,
    _goals,
    _measured_inputs,
    _summary,
    format_report,
    run_ray_bench,
)


def test_few_shot_subjects_override_interleaves_them():
    inputs = few_shot.make_inputs("small", 0, subjects=8)
    shape = few_shot.SHAPES["small"]
    assert len(inputs) == 8 * shape.questions_per_subject
    prefixes = [i["examples"] for i in inputs]
    assert len(set(prefixes[:8])) == 8 and prefixes[8:16] == prefixes[:8]     # interleaved
    assert few_shot.make_inputs("small", 0) == few_shot.make_inputs("small", 0, subjects=None)
    with pytest.raises(ValueError, match="subjects"):
        few_shot.make_inputs("small", 0, subjects=0)


def test_spec_rotates_the_order_each_round_and_checks_its_fields():
    spec = RayBenchSpec(rounds=3)
    rounds = [spec.configurations(k) for k in range(5)]
    assert rounds[0] == [("cache-aware", 2), ("round-robin", 2), ("power-of-two", 2), (SINGLE, 1),
                         (SINGLE_TOTAL_KV, 1)]
    assert [r[0][0] for r in rounds] == ["cache-aware", "round-robin", "power-of-two", SINGLE,
                                         SINGLE_TOTAL_KV]
    assert RayBenchSpec(single=False, routings=("round-robin",)).configurations(5) == [("round-robin", 2)]
    # One replica: the single engine's pool is already all of it.
    assert RayBenchSpec(replicas=1, routings=("cache-aware",)).configurations(0) == [
        ("cache-aware", 1), (SINGLE, 1)]
    for bad, match in (({"replicas": 0}, "replicas"), ({"rounds": 0}, "rounds"),
                       ({"routings": ("random",)}, "routings"), ({"routings": ()}, "routings"),
                       ({"workloads": ("nope",)}, "unknown"), ({"workloads": ("serving-ttft",)}, "unknown"),
                       ({"workloads": ("react",), "subjects": 8}, "subjects"),
                       ({"size": "huge"}, "size"), ({"max_concurrency": 0}, "max_concurrency"),
                       ({"replica_max_total_tokens": 0}, "replica_max_total_tokens"),
                       ({"replica_max_total_tokens": 1.5}, "replica_max_total_tokens")):
        with pytest.raises(ValueError, match=match):
            RayBenchSpec(**bad)


def test_replica_kv_pool_overrides_the_workload_and_the_total_kv_engine_gets_all_of_them():
    workload = few_shot.WORKLOAD
    default = workload.engine_kwargs("small")["max_total_tokens"]
    assert RayBenchSpec().engine_kwargs(workload) == workload.engine_kwargs("small")
    assert RayBenchSpec().engine_kwargs(workload, total_kv=True)["max_total_tokens"] == 2 * default
    spec = RayBenchSpec(replicas=3, replica_max_total_tokens=1600)
    assert spec.engine_kwargs(workload)["max_total_tokens"] == 1600
    assert spec.engine_kwargs(workload, total_kv=True)["max_total_tokens"] == 4800


def test_shuffle_reorders_the_same_programs_the_same_way_each_time():
    plain = _measured_inputs(RayBenchSpec(subjects=8), "few-shot")
    shuffled = _measured_inputs(RayBenchSpec(subjects=8, shuffle=True), "few-shot")
    assert shuffled != plain
    assert sorted(map(repr, shuffled)) == sorted(map(repr, plain))
    assert shuffled == _measured_inputs(RayBenchSpec(subjects=8, shuffle=True), "few-shot")
    # The strict cycle: over two round-robin replicas each would see only half the subjects.
    assert {i["examples"] for i in plain[0::2]}.isdisjoint(i["examples"] for i in plain[1::2])
    assert not {i["examples"] for i in shuffled[0::2]}.isdisjoint(i["examples"] for i in shuffled[1::2])


def _stats(prompt: int, cached: int, finished: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "cached_tokens": cached, "finished_requests": finished,
            "completion_tokens": finished}


def test_figures_are_the_replicas_deltas_and_the_goals_compare_them():
    before = {"a": _stats(100, 10, 2), "b": _stats(50, 0, 1)}
    after = {"a": _stats(400, 250, 6), "b": _stats(250, 100, 5), "c": _stats(100, 0, 2)}
    run = _figures(before, after, programs=10, wall=4.0)
    assert run["programs_per_s"] == 2.5 and run["requests"] == 4 + 4 + 2
    assert run["replicas"]["a"] == {"requests": 4, "prompt_tokens": 300, "cached_tokens": 240,
                                    "cache_hit_rate": 0.8, "kv_slots": None}
    assert run["replicas"]["c"]["prompt_tokens"] == 100                    # a replacement: from 0
    assert run["cache_hit_rate"] == pytest.approx((240 + 100) / (300 + 200 + 100))
    assert math.isnan(_figures({}, {"a": _stats(0, 0, 0)}, 1, 1.0)["cache_hit_rate"])

    def run_of(configuration, pps, prompt, cached):
        return {"configuration": configuration, "programs_per_s": pps, "prompt_tokens": prompt,
                "cached_tokens": cached, "cache_hit_rate": cached / prompt}

    runs = [run_of("cache-aware", 3.0, 100, 80), run_of("cache-aware", 5.0, 100, 90),
            run_of("round-robin", 2.0, 100, 40), run_of(SINGLE, 2.0, 100, 90),
            run_of(SINGLE_TOTAL_KV, 2.0, 100, 85)]
    summary = _summary(runs)
    assert summary["cache-aware"]["programs_per_s"] == 4.0                # the median
    assert summary["cache-aware"]["cache_hit_rate"] == pytest.approx(0.85)  # pooled
    goals = _goals(summary)
    assert goals["hit_rate_vs_single"]["value"] == pytest.approx(0.85 / 0.9)
    assert goals["hit_rate_vs_single"]["met"] is False
    assert goals["hit_rate_vs_single_total_kv"]["value"] == pytest.approx(1.0)
    assert goals["hit_rate_vs_single_total_kv"]["met"] is True
    assert goals["programs_per_s_vs_round_robin"] == {"value": 2.0, "goal": 1.5, "met": True}
    assert _goals({"round-robin": summary["round-robin"]}) == {}


# Ray Serve's own modules warn on import (pydantic deprecations); not ours to fix.
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::PendingDeprecationWarning")
@pytest.mark.parametrize("argv, message", [
    (["few-shot", "--backend", "ray", "--suite", "cpu"], "--suite"),
    (["few-shot", "--backend", "ray", "--ablate", "radix"], "--ablate"),
    (["few-shot", "--backend", "ray", "--routing", "round-robin", "--compare-routing"], "not both"),
    (["few-shot", "--backend", "ray", "--replicas", "0"], "replicas"),
    (["few-shot", "--backend", "ray", "--replica-max-total-tokens", "0"], "replica_max_total_tokens"),
    (["react", "--backend", "ray", "--subjects", "8"], "subjects"),
])
def test_command_line_errors_name_the_option(argv, message, capsys):
    pytest.importorskip("ray")
    with pytest.raises(SystemExit) as exit_:
        bench_main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::PendingDeprecationWarning")
def test_two_tiny_replicas_report_per_replica_hit_rates():
    pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'aiolm[ray]')")
    spec = RayBenchSpec(size="tiny", replicas=2, routings=("cache-aware",), single=False,
                        model="tiny-llama", load_format="dummy", device="cpu", num_cpus=2,
                        replica_max_total_tokens=3000)
    document = run_ray_bench(spec)
    [record] = document["workloads"]
    [run] = record["runs"]
    programs = len(few_shot.make_inputs("tiny", 0))
    assert run["configuration"] == "cache-aware" and run["programs"] == programs
    assert len(run["replicas"]) == 2
    assert run["max_total_tokens"] == 3000
    assert set(run["warmup_requests"]) == set(run["replicas"])             # each one warmed up
    assert all(n > 0 for n in run["warmup_requests"].values()), (run["warmup_requests"],
                                                                 run.get("routing_decisions"))
    assert all(r["kv_slots"] == 3000 for r in run["replicas"].values())    # the pool reached them
    assert len(record["prompts"]["prefix_tokens"]) == 2 and min(record["prompts"]["prefix_tokens"]) > 0
    assert run["requests"] == sum(r["requests"] for r in run["replicas"].values()) == programs
    assert run["prompt_tokens"] == sum(r["prompt_tokens"] for r in run["replicas"].values()) > 0
    # Two subjects, two questions each: each subject's second question finds its prefix.
    assert 0 < run["cache_hit_rate"] < 1
    assert record["summary"]["cache-aware"]["programs_per_s"] == run["programs_per_s"] > 0
    assert "cache-aware" in format_report(document)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::PendingDeprecationWarning")
def test_router_counts_in_flight_prompts_as_held_until_they_complete():
    pytest.importorskip("ray.serve")
    from aiolm.serve_ray.router import CacheAwareRouter

    router = CacheAwareRouter.__new__(CacheAwareRouter)   # its state only: no Serve here
    router.initialize_state()
    h = (1, 2, 3, 4)
    router._remember("q1", "r0", h)
    router._remember("q2", "r0", h[:2])
    assert router._sent.match(h) == {"r0": 4}
    router._release("q1")
    assert router._sent.match(h) == {"r0": 2}                 # q2 still holds two blocks
    router._remember("q2", "r1", h[:2])                       # retried elsewhere
    assert router._sent.match(h) == {"r1": 2}
    router._release("q2")
    router._release("unknown")
    assert router._sent.match(h) == {} and not router._sent_count
