"""``aiolm bench serving``: Poisson arrivals, latency percentiles, the 1 s TTFT crossing, and
a tiny run against the engine in-process and through ``aiolm serve``."""

from __future__ import annotations

import json
import math

import pytest

from aiolm.bench.serving import (
    RequestTiming,
    crossing_rate,
    make_requests,
    run_engine,
    summarize,
)


def test_requests_arrive_as_a_seeded_poisson_process_with_lengths_in_range():
    reqs = make_requests(400, input_len=40, output_len=20, range_ratio=0.5, vocab_size=100,
                         rate=8.0, seed=3)
    assert reqs == make_requests(400, input_len=40, output_len=20, range_ratio=0.5,
                                 vocab_size=100, rate=8.0, seed=3)
    assert all(20 <= len(r.input_ids) <= 40 and 10 <= r.max_tokens <= 20 for r in reqs)
    assert all(10 <= t < 100 for r in reqs for t in r.input_ids)
    gaps = [b.arrival - a.arrival for a, b in zip(reqs, reqs[1:], strict=False)]
    assert all(g >= 0 for g in gaps)
    # Mean gap of an exponential at rate 8 is 1/8 s; 399 gaps put the mean well within 20%.
    assert abs(sum(gaps) / len(gaps) - 1 / 8) < 0.025
    burst = make_requests(5, input_len=4, output_len=2, range_ratio=1.0, vocab_size=50,
                          rate=math.inf)
    assert [r.arrival for r in burst] == [0.0] * 5


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rate": 0.0}, "rate"), ({"range_ratio": 0.0}, "range_ratio"), ({"input_len": 0}, ">= 1"),
])
def test_bad_request_shapes_are_refused_by_name(kwargs, message):
    args = {"input_len": 8, "output_len": 4, "range_ratio": 0.5, "vocab_size": 50, "rate": 1.0}
    with pytest.raises(ValueError, match=message):
        make_requests(3, **(args | kwargs))


def test_summary_percentiles_and_throughput_from_known_timings():
    start = 100.0
    timings = [
        # arrives at 0, first token at 0.1 s, then every 0.05 s: 4 tokens
        RequestTiming(arrival=0.0, first=100.1, chunks=[100.1, 100.15, 100.2, 100.25], tokens=4),
        RequestTiming(arrival=0.5, first=100.8, chunks=[100.8, 100.9], tokens=2),
        RequestTiming(arrival=0.6, error="RuntimeError: boom"),
    ]
    s = summarize(timings, start)
    assert s["requests"] == 3 and s["failed"] == 1 and s["errors"] == ["RuntimeError: boom"]
    assert s["output_tokens"] == 6 and s["duration_s"] == pytest.approx(0.9)
    assert s["output_tok_per_s"] == pytest.approx(6 / 0.9, abs=0.1)
    assert s["ttft_p50_ms"] == pytest.approx(200.0)        # ttfts 100 and 300 ms
    assert s["ttft_p99_ms"] == pytest.approx(298.0)
    assert s["itl_p50_ms"] == pytest.approx(50.0)          # gaps 50, 50, 50, 100 ms
    assert s["e2e_p99_ms"] == pytest.approx(398.5)   # e2e 250 and 400 ms


def test_crossing_rate_interpolates_between_measured_rates():
    rows = [{"rate": 1.0, "ttft_p99_ms": 200.0}, {"rate": 2.0, "ttft_p99_ms": 600.0},
            {"rate": 4.0, "ttft_p99_ms": 1400.0}, {"rate": math.inf, "ttft_p99_ms": 9000.0}]
    assert crossing_rate(rows) == pytest.approx(3.0)
    assert crossing_rate(rows[:2]) is None
    assert crossing_rate([{"rate": 1.0, "ttft_p99_ms": 1500.0}]) == 1.0


@pytest.mark.anyio
async def test_engine_run_completes_every_request_with_its_full_output():
    import aiolm

    reqs = make_requests(12, input_len=24, output_len=6, range_ratio=0.5, vocab_size=256,
                         rate=200.0, seed=1)
    async with aiolm.Engine(model="tiny-llama", load_format="dummy") as engine:
        s = await run_engine(engine, reqs)
    assert s["failed"] == 0 and s["output_tokens"] == sum(r.max_tokens for r in reqs)
    assert 0 < s["ttft_p50_ms"] <= s["ttft_p99_ms"] <= s["e2e_p99_ms"]
    assert s["itl_p50_ms"] is not None and s["output_tok_per_s"] > 0


@pytest.mark.slow
def test_cli_through_aiolm_serve_writes_results_and_plot(tmp_path):
    from aiolm.bench.cli import bench_main

    out, png = tmp_path / "serving.json", tmp_path / "serving.png"
    code = bench_main(["serving", "--backend", "server", "--rates", "8,inf", "--requests", "4",
                         "--input-len", "16", "--output-len", "4", "--out", str(out),
                         "--plot", str(png)])
    assert code == 0
    results = json.loads(out.read_text())
    assert [r["rate"] for r in results["rows"]] == [8.0, math.inf]
    assert all(r["failed"] == 0 and r["output_tokens"] >= 4 for r in results["rows"])
    assert png.stat().st_size > 10_000
