"""``aiolm bench serving``: latency under load, as SGLang's ``bench_serving`` measures it.

Requests arrive at a Poisson rate (each rate in ``--rates``; ``inf`` sends them all at once)
with random token-id prompts of ``--input-len`` tokens and ``--output-len`` tokens to
generate (lengths drawn uniformly from ``[len * range_ratio, len]``; the end of text is
ignored so every request makes its full output). Against the engine in-process
(``--backend engine``) or through ``aiolm serve`` started as a subprocess on the same engine
flags and read with the ``openai`` client (``--backend server``). Per rate:

- **TTFT**, time to first token: from the request's arrival to its first streamed token;
- **ITL**, inter-token latency: the gaps between a request's streamed chunks after its first;
- **E2E**, end-to-end latency: arrival to the last token;

each as p50 and p99, with the output throughput (generated tokens / the time from the first
arrival to the last finish). The report names the rate at which p99 TTFT crosses 1 s
(interpolated between the measured rates). Nothing is compared with a peer here: the
transformers peer has no server.

    aiolm bench serving --model tiny-llama --load-format dummy --rates 4,16,inf --requests 64
    aiolm bench serving --backend server --rates 1,2,4 --out serving.json --plot serving.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import anyio
import attrs

__all__ = ["RequestTiming", "ServingRequest", "make_requests", "serving_main", "summarize"]

#: The p99 time to first token the report's crossing rate is about (seconds).
TTFT_BOUND = 1.0


@attrs.frozen
class ServingRequest:
    input_ids: tuple[int, ...]
    max_tokens: int
    arrival: float          # seconds after the run's start


@attrs.define
class RequestTiming:
    arrival: float
    first: float | None = None          # absolute perf_counter times
    chunks: list[float] = attrs.Factory(list)
    tokens: int = 0
    error: str | None = None


def make_requests(count: int, *, input_len: int, output_len: int, range_ratio: float,
                  vocab_size: int, rate: float, seed: int = 0) -> list[ServingRequest]:
    """``count`` requests with Poisson arrivals at ``rate`` per second (``inf``: all at 0)."""
    if count < 1 or input_len < 1 or output_len < 1:
        raise ValueError("requests, input_len and output_len must be >= 1")
    if not 0.0 < range_ratio <= 1.0:
        raise ValueError(f"range_ratio: expected a value in (0, 1], got {range_ratio}")
    if not rate > 0:
        raise ValueError(f"rate: expected a rate > 0 (or inf), got {rate}")
    rng = random.Random(seed)
    t = 0.0
    out = []
    for _ in range(count):
        n_in = rng.randint(max(1, int(input_len * range_ratio)), input_len)
        n_out = rng.randint(max(1, int(output_len * range_ratio)), output_len)
        # Ids away from 0..9, where special tokens usually sit.
        ids = tuple(rng.randrange(10, vocab_size) for _ in range(n_in))
        out.append(ServingRequest(input_ids=ids, max_tokens=n_out, arrival=t))
        if math.isfinite(rate):
            t += rng.expovariate(rate)
    return out


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(timings: Sequence[RequestTiming], start: float) -> dict[str, Any]:
    """p50/p99 of TTFT, ITL and E2E (milliseconds), throughput, failures."""
    done = [t for t in timings if t.error is None and t.first is not None]
    ttft = [t.first - (start + t.arrival) for t in done]
    e2e = [t.chunks[-1] - (start + t.arrival) for t in done]
    itl = [b - a for t in done for a, b in zip(t.chunks, t.chunks[1:], strict=False)]
    end = max((t.chunks[-1] for t in done), default=start)
    tokens = sum(t.tokens for t in done)

    def ms(values: list[float], q: float) -> float | None:
        p = _percentile(values, q)
        return None if p is None else round(p * 1e3, 2)

    return {
        "requests": len(timings), "failed": len(timings) - len(done),
        "errors": sorted({t.error for t in timings if t.error})[:5],
        "duration_s": round(end - start, 3), "output_tokens": tokens,
        "output_tok_per_s": round(tokens / (end - start), 1) if end > start else None,
        "request_per_s": round(len(done) / (end - start), 2) if end > start else None,
        "ttft_p50_ms": ms(ttft, 0.5), "ttft_p99_ms": ms(ttft, 0.99),
        "itl_p50_ms": ms(itl, 0.5), "itl_p99_ms": ms(itl, 0.99),
        "e2e_p50_ms": ms(e2e, 0.5), "e2e_p99_ms": ms(e2e, 0.99),
    }


async def _drive(requests: Sequence[ServingRequest], one: Any) -> tuple[list[RequestTiming], float]:
    """Start each request at its arrival time; ``one(request, timing)`` streams it."""
    timings = [RequestTiming(arrival=r.arrival) for r in requests]
    start = time.perf_counter()

    async def send(i: int) -> None:
        delay = start + requests[i].arrival - time.perf_counter()
        if delay > 0:
            await anyio.sleep(delay)
        try:
            await one(requests[i], timings[i])
        except Exception as exc:  # a failed request is counted, not fatal to the run
            timings[i].error = f"{type(exc).__name__}: {exc}"

    async with anyio.create_task_group() as tg:
        for i in range(len(requests)):
            tg.start_soon(send, i)
    return timings, start


async def run_engine(engine: Any, requests: Sequence[ServingRequest]) -> dict[str, Any]:
    """The requests against an in-process ``aiolm.Engine``."""

    async def one(req: ServingRequest, timing: RequestTiming) -> None:
        async with engine.stream(input_ids=list(req.input_ids), max_tokens=req.max_tokens,
                                 ignore_eos=True, temperature=0.0) as chunks:
            async for chunk in chunks:
                if chunk.token_ids:
                    now = time.perf_counter()
                    timing.first = timing.first or now
                    timing.chunks.append(now)
                    timing.tokens += len(chunk.token_ids)

    timings, start = await _drive(requests, one)
    return summarize(timings, start)


async def run_server(base_url: str, model: str, requests: Sequence[ServingRequest]) -> dict[str, Any]:
    """The requests through an OpenAI-compatible server, read with the ``openai`` client."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0,
                                timeout=600.0)

    async def one(req: ServingRequest, timing: RequestTiming) -> None:
        stream = await client.completions.create(
            model=model, prompt=list(req.input_ids), max_tokens=req.max_tokens, stream=True,
            temperature=0.0, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        async for chunk in stream:
            # Every chunk with a choice is a step's output: with a model that has no
            # tokenizer (dummy weights) its text is empty, yet it carries the step's tokens.
            if chunk.choices and (chunk.choices[0].text or chunk.choices[0].finish_reason is None):
                now = time.perf_counter()
                timing.first = timing.first or now
                timing.chunks.append(now)
            if chunk.usage is not None:
                timing.tokens = chunk.usage.completion_tokens
        if timing.first is None:
            raise RuntimeError("the stream carried no output")

    try:
        timings, start = await _drive(requests, one)
    finally:
        await client.close()
    return summarize(timings, start)


def crossing_rate(rows: Sequence[dict[str, Any]], bound_ms: float = TTFT_BOUND * 1e3) -> float | None:
    """The arrival rate at which p99 TTFT reaches ``bound_ms``, linearly interpolated
    between the finite measured rates; None when no measured rate reaches it."""
    finite = sorted((r for r in rows if math.isfinite(r["rate"]) and r["ttft_p99_ms"] is not None),
                    key=lambda r: r["rate"])
    prev = None
    for row in finite:
        if row["ttft_p99_ms"] >= bound_ms:
            if prev is None:
                return row["rate"]
            span = row["ttft_p99_ms"] - prev["ttft_p99_ms"]
            frac = (bound_ms - prev["ttft_p99_ms"]) / span if span > 0 else 1.0
            return round(prev["rate"] + frac * (row["rate"] - prev["rate"]), 3)
        prev = row
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """``aiolm serve`` in a subprocess on the given engine flags, until closed."""

    def __init__(self, engine_argv: Sequence[str], startup_timeout: float = 300.0) -> None:
        self.port = _free_port()
        cmd = [sys.executable, "-m", "aiolm", "serve", "--host", "127.0.0.1",
               "--port", str(self.port), "--log-level", "warning", *engine_argv]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._wait(startup_timeout)

    def _wait(self, timeout: float) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"aiolm serve exited with status {self.proc.returncode} "
                                   "before it was ready")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.25)
        self.close()
        raise RuntimeError(f"aiolm serve was not ready after {timeout:.0f} s")

    def model_id(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"{self.base_url}/models", timeout=10) as r:
            return json.load(r)["data"][0]["id"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aiolm bench serving",
        description="Latency under Poisson arrivals (TTFT, ITL, E2E p50/p99; output "
                    "throughput) against the engine in-process or through aiolm serve. "
                    "Every other flag is an engine flag (aiolm serve --help lists them).")
    p.add_argument("--backend", choices=["engine", "server"], default="engine")
    p.add_argument("--rates", default="1,2,4,8,inf",
                   help="arrival rates in requests/s, comma-separated; inf: all at once")
    p.add_argument("--requests", type=int, default=200, help="requests per rate")
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--range-ratio", type=float, default=0.5,
                   help="lengths are drawn from [len * ratio, len] (default %(default)s)")
    p.add_argument("--bench-seed", type=int, default=0, help="seeds the requests")
    p.add_argument("--out", default=None, help="write the results as JSON")
    p.add_argument("--plot", default=None, help="write a PNG of latency against rate")
    return p


def _rates(text: str) -> list[float]:
    try:
        rates = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise SystemExit(f"aiolm bench serving: --rates: expected numbers or inf, "
                         f"got {text!r}") from None
    if not rates or any(not r > 0 for r in rates):
        raise SystemExit(f"aiolm bench serving: --rates: each rate must be > 0, got {text!r}")
    return rates


def _engine_options(engine_argv: list[str]) -> dict[str, Any]:
    from ..cli import add_engine_arguments

    p = argparse.ArgumentParser(prog="aiolm bench serving", add_help=False)
    add_engine_arguments(p)
    return vars(p.parse_args(engine_argv))


async def _run(args: argparse.Namespace, engine_argv: list[str]) -> dict[str, Any]:
    from ..backends.engine import Engine

    rates = _rates(args.rates)
    rows: list[dict[str, Any]] = []
    server = None
    engine = None
    try:
        if args.backend == "server":
            server = await anyio.to_thread.run_sync(_Server, engine_argv)
            model = await anyio.to_thread.run_sync(server.model_id)
            vocab = 500  # random ids valid in any served vocabulary (tiny test models': 512)
        else:
            engine = Engine(**_engine_options(engine_argv))
            await engine.start()
            vocab = engine.tokenizer.vocab_size if engine.tokenizer is not None else 256
        _print_header()
        for rate in rates:
            requests = make_requests(args.requests, input_len=args.input_len,
                                     output_len=args.output_len, range_ratio=args.range_ratio,
                                     vocab_size=vocab, rate=rate, seed=args.bench_seed)
            if server is not None:
                row = await run_server(server.base_url, model, requests)
            else:
                row = await run_engine(engine, requests)
                await engine.flush_cache()  # each rate starts from a cold cache
            row = {"rate": rate, **row}
            rows.append(row)
            _print_row(row)
    finally:
        if engine is not None:
            await engine.aclose()
        if server is not None:
            server.close()
    return {"backend": args.backend, "requests_per_rate": args.requests,
            "input_len": args.input_len, "output_len": args.output_len,
            "range_ratio": args.range_ratio, "engine_args": engine_argv, "rows": rows,
            "p99_ttft_1s_rate": crossing_rate(rows)}


_COLUMNS = ("rate", "output_tok_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
            "itl_p99_ms", "e2e_p50_ms", "e2e_p99_ms", "failed")


def _print_header() -> None:
    print(" ".join(f"{c:>16}" for c in _COLUMNS))


def _print_row(row: dict[str, Any]) -> None:
    print(" ".join(f"{'-' if row[c] is None else str(row[c]):>16}" for c in _COLUMNS), flush=True)


def plot(results: dict[str, Any], path: str) -> None:
    """p50/p99 TTFT, ITL and E2E against the finite arrival rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if math.isfinite(r["rate"])]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, name in zip(axes, ("ttft", "itl", "e2e"), strict=True):
        for q, style in (("p50", "o-"), ("p99", "s--")):
            ax.plot([r["rate"] for r in rows], [r[f"{name}_{q}_ms"] for r in rows], style,
                    label=q)
        ax.set_title(name.upper())
        ax.set_xlabel("arrival rate (requests/s)")
        ax.set_ylabel("ms")
        ax.legend()
    fig.suptitle(f"aiolm bench serving ({results['backend']}, {results['requests_per_rate']} "
                 f"requests a rate, in {results['input_len']} / out {results['output_len']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def serving_main(argv: Sequence[str]) -> int:
    args, engine_argv = build_parser().parse_known_args(list(argv))
    results = anyio.run(_run, args, engine_argv)
    cross = results["p99_ttft_1s_rate"]
    print(f"p99 TTFT crosses {TTFT_BOUND:.0f} s at "
          + (f"{cross} requests/s" if cross is not None else "no measured rate"))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2, default=str)
    if args.plot:
        plot(results, args.plot)
    return 1 if any(r["failed"] for r in results["rows"]) else 0
