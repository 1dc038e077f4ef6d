"""Load at a size CI affords: clients that leave, programs cancelled mid-fork and a KV pool
too small for its requests all leave the engine idle, with its KV accounting intact.

- ``test_clients_that_leave_midway_...``: 100 requests (streamed and whole, completions and
  chat, ``n`` 1–2) at concurrency 30 through a real uvicorn server; a fifth of the clients
  leave midway (a stream closed after a few chunks, a whole request cancelled), each of
  them asking for far more tokens than the rest. Every answer that completes is
  well-formed; afterwards the engine is idle, has finished exactly the completed choices
  (a request whose client left is aborted, not run to its end) and is intact.
- ``test_programs_with_forks_cancelled_...``: 50 programs with forks and selects straight
  on the Engine, a tenth cancelled at random points.
- ``test_greedy_outputs_survive_retraction``: concurrent requests that outgrow a small
  KV pool are retracted and recomputed, and each greedy output equals the same request
  run alone.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Iterator
from typing import Any

import anyio
import attrs
import httpx
import pytest
from openai_server import running

from aiolm import Engine, gen, program, select
from aiolm.backends.engine import LoadedModel
from aiolm.bench.models import load_for_bench
from aiolm.server import create_app

pytestmark = pytest.mark.anyio

MODEL = "tiny-llama"
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
SEED = 20
REQUESTS, CONCURRENCY, LEAVING = 100, 30, 20
LONG = 1200          # max_tokens of a request whose client leaves: unmissable if not aborted
WORDS = ["The capital of France is", "def fib(n):", "Once upon a time", "1, 2, 3,", "¿Qué tal?"]


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return load_for_bench(MODEL, load_format="dummy", device="cpu")


async def wait_idle(engine: Engine, timeout: float = 10.0) -> None:
    """Wait until the engine has nothing running or queued (``TimeoutError`` after ``timeout``)."""
    with anyio.fail_after(timeout):
        while (s := engine.statistics()).running_requests or s.queued_requests:
            await anyio.sleep(0.01)


async def assert_intact(engine: Engine) -> None:
    """The engine is idle and its KV accounting holds (no slot or lock leaked)."""
    await wait_idle(engine)
    with anyio.fail_after(10):
        report = await engine.check_integrity()
    assert report.idle and report.request_slots == 0 and report.locked_tokens == 0, report


# ------------------------------------------------------- (a) clients that leave midway


@attrs.frozen(kw_only=True)
class Job:
    """One client: its request, and whether (and when) it leaves before the answer ends."""

    route: str
    body: dict[str, Any]
    leave: bool = False
    keep: int = 0            # a stream that leaves reads this many events first
    after_s: float = 0.0     # a whole request that leaves is cancelled after this long

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def n(self) -> int:
        return int(self.body.get("n", 1))


def jobs(seed: int) -> list[Job]:
    rng = random.Random(seed)
    leaving = set(rng.sample(range(REQUESTS), LEAVING))
    out = []
    for i in range(REQUESTS):
        route = rng.choice([COMPLETIONS, CHAT])
        text = f"{rng.choice(WORDS)} #{i}"
        body: dict[str, Any] = {
            "model": MODEL, "n": rng.choice([1, 1, 2]), "ignore_eos": True,
            "return_token_ids": True, "seed": i, "temperature": rng.choice([0, 0.8]),
            "max_tokens": LONG if i in leaving else rng.randint(8, 24),
            "stream": rng.random() < 0.5,
        }
        if route == COMPLETIONS:
            body["prompt"] = text
        else:
            body["messages"] = [{"role": "user", "content": text}]
        if body["stream"] and rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
        out.append(Job(route=route, body=body, leave=i in leaving, keep=rng.randint(1, 3),
                       after_s=rng.uniform(0.02, 0.1)))
    return out


@attrs.define(eq=False)
class Served:
    """A server over a fresh engine; ``problem`` is set (by the lifespan, as the server
    stops) when the engine was not idle and intact by then."""

    url: str
    engine: Engine
    problem: str | None = "the server did not stop"


@contextlib.contextmanager
def serve(tiny: LoadedModel, **engine_options: Any) -> Iterator[Served]:
    engine = Engine(tiny, **engine_options)
    served = Served(url="", engine=engine)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> Any:
        async with engine:
            yield
            try:
                await assert_intact(engine)
            except Exception as exc:  # an assertion, a dead engine, a timeout: reported
                served.problem = f"{type(exc).__name__}: {exc}"
            else:
                served.problem = None

    with running(create_app(engine, lifespan=lifespan)) as url:
        served.url = url.removesuffix("/v1")
        yield served


def check_whole(job: Job, answer: httpx.Response) -> int:
    """Check a completed whole answer; returns its completion tokens."""
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["object"] == ("text_completion" if job.route == COMPLETIONS else "chat.completion")
    assert [c["index"] for c in body["choices"]] == list(range(job.n))
    for c in body["choices"]:
        assert c["finish_reason"] == "length"
        assert len(c["token_ids"]) == job.body["max_tokens"]
        assert isinstance(c["text"] if job.route == COMPLETIONS else c["message"]["content"], str)
    usage = body["usage"]
    assert usage["completion_tokens"] == job.n * job.body["max_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    return usage["completion_tokens"]


def check_stream(job: Job, events: list[str]) -> int:
    """Check a completed stream's ``data:`` payloads; returns its completion tokens."""
    assert events[-1] == "[DONE]", events[-3:]
    ids: dict[int, list[int]] = {}
    finish: dict[int, str] = {}
    usage = None
    for event in events[:-1]:
        chunk = json.loads(event)
        assert "error" not in chunk, chunk
        if chunk.get("usage"):
            usage = chunk["usage"]
        for c in chunk["choices"]:
            ids.setdefault(c["index"], []).extend(c.get("token_ids", []))
            if c["finish_reason"] is not None:
                assert c["index"] not in finish, "a choice finished twice"
                finish[c["index"]] = c["finish_reason"]
    assert sorted(ids) == list(range(job.n))
    assert all(len(v) == job.body["max_tokens"] for v in ids.values())
    assert finish == {i: "length" for i in range(job.n)}
    if job.body.get("stream_options"):
        assert usage is not None and usage["completion_tokens"] == job.n * job.body["max_tokens"]
    return job.n * job.body["max_tokens"]


@attrs.define(eq=False)
class Results:
    """What the clients saw: choices and tokens of completed answers, clients that left."""

    completed_choices: int = 0
    completed_tokens: int = 0
    left_midway: int = 0


async def leave_stream(url: str, job: Job) -> None:
    """Open ``job``'s stream on a bare TCP connection, read ``job.keep`` events, hang up."""
    # NOTE: not httpx: leaving its stream early on trio leaves httpx's nested async
    # generators unfinished, which trio reports (an error under -W error).
    host, port = httpx.URL(url).host, httpx.URL(url).port
    body = json.dumps(job.body).encode()
    head = (f"POST {job.route} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    received = b""
    async with await anyio.connect_tcp(host, port) as connection:
        await connection.send(head.encode() + body)
        while b"\r\n\r\n" not in received:
            received += await connection.receive()
        assert received.startswith(b"HTTP/1.1 200"), received[:300]
        while received.count(b"data: ") < job.keep:
            received += await connection.receive()
    assert b"[DONE]" not in received


async def run_job(client: httpx.AsyncClient, job: Job, results: Results) -> None:
    if job.stream and job.leave:
        await leave_stream(str(client.base_url), job)
        results.left_midway += 1
        return
    if job.stream:
        events: list[str] = []
        async with client.stream("POST", job.route, json=job.body) as answer:
            assert answer.status_code == 200, await answer.aread()
            async for line in answer.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        tokens = check_stream(job, events)
    else:
        with anyio.move_on_after(job.after_s if job.leave else 60) as scope:
            answer = await client.post(job.route, json=job.body)
        if scope.cancelled_caught:
            assert job.leave, "a whole request took over 60 s"
            results.left_midway += 1
            return
        assert not job.leave, f"a {LONG}-token request ended within {job.after_s:.2f} s"
        tokens = check_whole(job, answer)
    results.completed_choices += job.n
    results.completed_tokens += tokens


async def test_clients_that_leave_midway_leave_the_engine_idle_and_intact(tiny):
    todo = jobs(SEED)
    results = Results()
    limiter = anyio.CapacityLimiter(CONCURRENCY)
    # NOTE: no keep-alive: the test server answers a reused connection ~40 ms late (Nagle).
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=0)
    with serve(tiny, max_total_tokens=8192) as served:
        async with httpx.AsyncClient(base_url=served.url, limits=limits, timeout=60) as client:

            async def one(job: Job) -> None:
                async with limiter:
                    await run_job(client, job, results)

            with anyio.fail_after(120):
                async with anyio.create_task_group() as tg:
                    for job in todo:
                        tg.start_soon(one, job)
        await wait_idle(served.engine)
        stats = served.engine.statistics()
    assert results.left_midway == LEAVING
    # Exactly the completed choices finished: every request whose client left was aborted.
    assert stats.finished_requests == results.completed_choices
    assert stats.completion_tokens == results.completed_tokens
    assert served.problem is None, served.problem
    print(f"\n[load] {REQUESTS} requests, {results.left_midway} left midway, "
          f"{results.completed_choices} choices completed ({results.completed_tokens} tokens), "
          f"{stats.forward_passes} forward passes")


# ------------------------------------------------ (b) programs cancelled mid-fork


PROGRAMS, CANCELLED = 50, 5


def fork_program(rng: random.Random, index: int) -> tuple[Any, dict[str, Any]]:
    """A program: a head ``gen``, a fork of 2–4 branches (each a ``gen``, sometimes a nested
    fork), then sometimes a ``select``; and what its finished state must hold."""
    k = rng.randint(2, 4)
    nested = rng.random() < 0.3
    choose = rng.random() < 0.5
    head, leaf = rng.randint(1, 6), rng.randint(1, 8)
    opener = f"{rng.choice(WORDS)} (program {index})"

    async def body(s: Any) -> None:
        s += opener + gen("head", max_tokens=head)
        async with s.fork(k) as forks:
            forks += lambda j: f" / branch {j}:" + gen("leaf", max_tokens=leaf)
            if nested:
                async with forks[0].fork(2) as inner:
                    inner += lambda j: f" / inner {j}:" + gen("deep", max_tokens=2)
                inner.join()
        forks.join()
        if choose:
            s += " So:" + select("verdict", ["yes", "no", "maybe not"])

    expect = {"k": k, "nested": nested, "choose": choose}
    return program(body), expect


def check_state(state: Any, expect: dict[str, Any]) -> None:
    assert isinstance(state["head"], str)
    leaves = state["leaf"]
    assert len(leaves) == expect["k"] and all(isinstance(v, str) for v in leaves)
    if expect["nested"]:
        assert len(state["deep"]) == expect["k"] and len(state["deep"][0]) == 2
    if expect["choose"]:
        assert state["verdict"] in ("yes", "no", "maybe not")


async def test_programs_with_forks_cancelled_at_random_points_leave_the_engine_intact(tiny):
    rng = random.Random(SEED)
    cancelled = set(rng.sample(range(PROGRAMS), CANCELLED))
    made = [fork_program(rng, i) for i in range(PROGRAMS)]
    delays = [rng.uniform(0.0, 0.08) for _ in range(PROGRAMS)]
    finished, cut = 0, 0
    limiter = anyio.CapacityLimiter(16)
    async with Engine(tiny, max_total_tokens=2048) as engine:

        async def one(i: int) -> None:
            nonlocal finished, cut
            prog, expect = made[i]
            async with limiter:
                if i in cancelled:
                    with anyio.move_on_after(delays[i]) as scope:
                        await prog.run(backend=engine, temperature=0.7)
                    cut += scope.cancelled_caught
                    return
                check_state(await prog.run(backend=engine, temperature=0.7), expect)
                finished += 1

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for i in range(PROGRAMS):
                    tg.start_soon(one, i)
        await assert_intact(engine)
        # The engine still serves after the cancellations.
        done = await engine.generate("After the storm", max_tokens=4, ignore_eos=True)
        assert len(done.token_ids) == 4
    assert finished == PROGRAMS - CANCELLED
    assert cut >= 1, "no program was cancelled midway; the delays are too long"
    print(f"\n[programs] {PROGRAMS} programs, {cut} of {CANCELLED} cancelled midway")


# ----------------------------------------------------------- (c) retraction


async def test_greedy_outputs_survive_retraction(tiny):
    """Twelve greedy requests whose outputs together need about four times a 512-slot pool
    (a third sharing a prompt prefix) run at once; the scheduler retracts and recomputes
    some, and each output equals the same request run alone on a roomy engine."""
    rng = random.Random(SEED)
    shared = [rng.randrange(512) for _ in range(12)]
    prompts = [[rng.randrange(512) for _ in range(rng.randint(16, 40))] for _ in range(8)]
    prompts += [shared + [rng.randrange(512) for _ in range(rng.randint(4, 20))] for _ in range(4)]
    lengths = [rng.randint(120, 200) for _ in prompts]
    greedy = dict(temperature=0, ignore_eos=True)

    async with Engine(tiny, max_total_tokens=4096) as roomy:
        alone = []
        for ids, n in zip(prompts, lengths, strict=True):
            alone.append((await roomy.generate(input_ids=ids, max_tokens=n, **greedy)).token_ids)
            await roomy.flush_cache()   # each runs from scratch

    together: list[Any] = [None] * len(prompts)
    async with Engine(tiny, max_total_tokens=512) as small:

        async def one(i: int) -> None:
            done = await small.generate(input_ids=prompts[i], max_tokens=lengths[i], **greedy)
            together[i] = done.token_ids

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for i in range(len(prompts)):
                    tg.start_soon(one, i)
        retractions = small.statistics().retractions
        await assert_intact(small)
    assert retractions > 0
    for i, (a, b) in enumerate(zip(alone, together, strict=True)):
        assert list(b) == list(a), f"request {i} differs once retracted"
    print(f"\n[retraction] {len(prompts)} requests, {retractions} retractions")
