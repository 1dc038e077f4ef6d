"""``aiolm bench --backend ray``: program workloads through aiolm replicas on Ray Serve.

    aiolm bench few-shot --backend ray --replicas 2 --compare-routing --subjects 8 --rounds 5 \
        --replica-max-total-tokens 2000 --shuffle --concurrency 4

One local Ray instance; for each routing (``cache-aware``, ``round-robin``,
``power-of-two``) an application of ``--replicas`` engine replicas
(:func:`aiolm.serve_ray.build_app`) is deployed fresh (cold caches), the workload's programs
run on :class:`aiolm.OpenAI` against Serve's HTTP endpoint (so each program run carries its
session key, as a user's would), and the application is deleted again. Before the
measured programs, tiny warm-up programs (no prefix shared with them) run until every
replica has served one: the replicas' first forward passes, the ingress, its handle and the
router's index are warm, and the KV pools hold little besides. A single engine (one
replica, the same engine settings, the same KV pool) is measured the same way, as the hit
rate to compare with, and, with more than one replica, a single engine whose KV pool is all
the replicas' pools together (``single-engine-total-kv``): what one big cache would hit.
With ``--rounds K`` every configuration runs K times, the order rotated each round, so that
the drift of a shared machine falls on all of them alike.

Routing pays where the replicas' caches together hold the working set but one replica's does
not: ``--replica-max-total-tokens`` sizes each replica's KV pool (default: the workload's own
budget). ``--shuffle`` sends the programs in a seeded random order: a strict cycle of the
subjects over round-robin replicas (8 subjects, 2 replicas) hands each replica the same
half of them, a partition that no real traffic provides.

Figures per run: ``programs_per_s`` (client side, from the first program's start to the last
one's end), and from the replicas' own engine statistics (their difference over the measured
programs, after a warm-up): per replica and overall ``prompt_tokens``, ``cached_tokens``,
``cache_hit_rate``, ``requests``, and per replica its KV pool (``kv_slots``). The goals
(issue 17): cache-aware's overall hit rate within 5% of the single engine's
(``hit_rate_vs_single >= 0.95``; ``hit_rate_vs_single_total_kv`` against the single engine
of all the pools together), and cache-aware at least 1.5x round-robin's programs/s.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import socket
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import attrs

__all__ = ["APP_NAME", "GOAL_HIT_RATE_VS_SINGLE", "GOAL_SPEEDUP_VS_ROUND_ROBIN", "ROUTING_ORDER",
           "SINGLE", "SINGLE_TOTAL_KV", "RayBenchSpec", "ray_bench_main", "run_ray_bench"]

#: The routings compared by ``--compare-routing``, in the first round's order.
ROUTING_ORDER = ("cache-aware", "round-robin", "power-of-two")
#: The single engine's configuration name in the results.
SINGLE = "single-engine"
#: A single engine with the KV pool of all the replicas together.
SINGLE_TOTAL_KV = "single-engine-total-kv"
#: The Serve application's name (and the model id its endpoint answers to).
APP_NAME = "aiolm-bench"
GOAL_HIT_RATE_VS_SINGLE = 0.95
GOAL_SPEEDUP_VS_ROUND_ROBIN = 1.5
_MODEL_FACTORY = "aiolm.bench.models:load_for_bench"
#: The most warm-up batches run to reach every replica.
_WARMUP_ATTEMPTS = 4
_STAT_KEYS = ("prompt_tokens", "cached_tokens", "finished_requests", "completion_tokens")


@attrs.frozen(kw_only=True)
class RayBenchSpec:
    """What to run: ``workloads`` (names of run-batch text workloads) of ``size``, with
    ``subjects`` overriding few-shot's subject count; each of ``routings`` on ``replicas``
    replicas (and the single engine unless ``single`` is False), ``rounds`` times.
    ``model``/``load_format`` as ``aiolm bench``'s ``--model``/``--dummy``; ``device`` the
    replicas' device; ``num_cpus`` the local Ray instance's CPUs (default: at least one per
    replica); ``max_concurrency`` the programs in flight (default: the workload's).
    ``replica_max_total_tokens`` is each engine's KV pool in tokens (default: the workload's
    ``max_total_tokens``); ``shuffle`` runs the programs in a random order (seeded by
    ``seed``) instead of the workload's."""

    workloads: tuple[str, ...] = ("few-shot",)
    size: str = "small"
    seed: int = 0
    replicas: int = 2
    routings: tuple[str, ...] = ROUTING_ORDER
    rounds: int = 1
    subjects: int | None = None
    single: bool = True
    model: str | None = None
    load_format: str = "auto"
    device: str = "auto"
    imbalance: int = 4
    num_cpus: int | None = None
    max_concurrency: int | None = None
    replica_max_total_tokens: int | None = None
    shuffle: bool = False

    def __attrs_post_init__(self) -> None:
        from . import WORKLOADS
        from .synth import SIZES

        for name, value in (("replicas", self.replicas), ("rounds", self.rounds)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive integer (got {value!r})")
        if self.size not in SIZES:
            raise ValueError(f"size: one of {', '.join(SIZES)} (got {self.size!r})")
        unknown = [r for r in self.routings if r not in ROUTING_ORDER]
        if unknown or not self.routings:
            raise ValueError(f"routings: one or more of {', '.join(ROUTING_ORDER)} (got {list(self.routings)})")
        if not self.workloads:
            raise ValueError("workloads: name at least one")
        for name in self.workloads:
            workload = WORKLOADS.get(name)
            if workload is None:
                raise ValueError(f"workload {name!r}: unknown; choose from {', '.join(WORKLOADS)}")
            if workload.runner is not None or workload.via_openai:
                raise ValueError(f"workload {name!r}: it runs its own client, not run_batch on "
                                 "aiolm.OpenAI; --backend ray runs the others")
        if self.subjects is not None and "few-shot" not in self.workloads:
            raise ValueError("subjects: only the few-shot workload has subjects")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency: must be at least 1 (got {self.max_concurrency})")
        pool = self.replica_max_total_tokens
        if pool is not None and (isinstance(pool, bool) or not isinstance(pool, int) or pool < 1):
            raise ValueError(f"replica_max_total_tokens: must be a positive integer (got {pool!r})")

    def configurations(self, round_index: int) -> list[tuple[str, int]]:
        """``(name, replicas)`` of the runs of round ``round_index``: the routings rotated by
        the round (and the single engine among them), so no configuration always runs first."""
        order: list[tuple[str, int]] = [(r, self.replicas) for r in self.routings]
        if self.single:
            order.append((SINGLE, 1))
            if self.replicas > 1:
                order.append((SINGLE_TOTAL_KV, 1))
        k = round_index % len(order)
        return order[k:] + order[:k]


    def engine_kwargs(self, workload: Any, *, total_kv: bool = False) -> dict[str, Any]:
        """The engine keywords of ``workload``'s replicas: the workload's, with
        ``replica_max_total_tokens`` as the KV pool where given; with ``total_kv`` (for
        :data:`SINGLE_TOTAL_KV`) the pool times the replicas. Raises ``ValueError`` for
        ``total_kv`` when no pool size is known."""
        kwargs = dict(workload.engine_kwargs(self.size))
        if self.replica_max_total_tokens is not None:
            kwargs["max_total_tokens"] = self.replica_max_total_tokens
        if total_kv:
            if "max_total_tokens" not in kwargs:
                raise ValueError(f"{SINGLE_TOTAL_KV}: the workload sets no KV pool; give "
                                 "replica_max_total_tokens")
            kwargs["max_total_tokens"] *= self.replicas
        return kwargs


def _inputs(spec: RayBenchSpec, name: str, size: str, seed: int) -> list[dict[str, Any]]:
    from . import WORKLOADS

    if name == "few-shot" and spec.subjects is not None:
        from .few_shot import make_inputs

        return make_inputs(size, seed, subjects=spec.subjects)  # type: ignore[arg-type]
    return WORKLOADS[name].make_inputs(size, seed)  # type: ignore[arg-type]


def _measured_inputs(spec: RayBenchSpec, name: str) -> list[dict[str, Any]]:
    """The measured programs' inputs of workload ``name``: the workload's, in its order or,
    with ``spec.shuffle``, in a random order seeded by ``spec.seed`` (the same for every
    configuration)."""
    inputs = _inputs(spec, name, spec.size, spec.seed)
    if spec.shuffle:
        random.Random(spec.seed).shuffle(inputs)
    return inputs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _on_cpu(device: str) -> bool:
    from ..engine.config import resolve_device

    return resolve_device(device).type == "cpu"


async def _run_programs(url: str, workload: Any, inputs: Sequence[dict[str, Any]],
                        concurrency: int) -> float:
    """Run ``inputs`` on aiolm.OpenAI against ``url``; return the wall time. Raises the
    first program's error."""
    from ..backends.openai import OpenAI

    api = OpenAI(APP_NAME, base_url=url, api_key="bench", chat=False, aiolm_server=True,
                 timeout=600.0)
    try:
        start = time.perf_counter()
        states = await workload.program.run_batch(list(inputs), backend=api,
                                                  max_concurrency=concurrency)
        wall = time.perf_counter() - start
    finally:
        await api.aclose()
    failed = [st.error for st in states if st.error is not None]
    if failed:
        raise failed[0]
    return wall


def _snapshot() -> dict[str, dict[str, int]]:
    from ..serve_ray import replica_statistics

    return {rid: {k: int(s.get(k, 0)) for k in (*_STAT_KEYS, "total_kv_slots")}
            for rid, s in replica_statistics(APP_NAME).items()}


def _wait_for_statistics(expected_requests: int, timeout: float = 30.0) -> dict[str, dict[str, int]]:
    """The replicas' statistics once they count ``expected_requests`` finished requests in
    all (each replica reports before its requests' last chunk; this guards the index's
    asynchrony), or as they are after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        snap = _snapshot()
        if sum(s["finished_requests"] for s in snap.values()) >= expected_requests or time.monotonic() > deadline:
            return snap
        time.sleep(0.1)


def _hit_rate(prompt: int, cached: int) -> float:
    return cached / prompt if prompt else math.nan


def _figures(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]],
             programs: int, wall: float) -> dict[str, Any]:
    replicas = {}
    for rid, now in sorted(after.items()):
        was = before.get(rid, dict.fromkeys(_STAT_KEYS, 0))
        d = {k: now[k] - was[k] for k in _STAT_KEYS}
        replicas[rid] = {"requests": d["finished_requests"], "prompt_tokens": d["prompt_tokens"],
                         "cached_tokens": d["cached_tokens"],
                         "cache_hit_rate": _hit_rate(d["prompt_tokens"], d["cached_tokens"]),
                         "kv_slots": now.get("total_kv_slots")}
    prompt = sum(r["prompt_tokens"] for r in replicas.values())
    cached = sum(r["cached_tokens"] for r in replicas.values())
    return {"programs": programs, "wall_s": wall, "programs_per_s": programs / wall,
            "requests": sum(r["requests"] for r in replicas.values()),
            "prompt_tokens": prompt, "cached_tokens": cached, "cache_hit_rate": _hit_rate(prompt, cached),
            "replicas": replicas}


def _prompt_lengths(inputs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The token counts of few-shot's prompts, by the replicas' own tokenizer (of the
    application deployed now): each subject's prefix and each question after it, so that a
    reader can check how many prefixes a KV pool holds."""
    from ray import serve

    from ..serve_ray.app import ENGINE_DEPLOYMENT

    handle = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=APP_NAME)
    tokenizer = handle.info.remote().result().tokenizer
    prefixes = {i["examples"]: len(tokenizer.encode(i["examples"])) for i in inputs}
    questions = [len(tokenizer.encode(i["examples"] + i["question"])) - prefixes[i["examples"]]
                 for i in inputs]
    return {"prefix_tokens": sorted(prefixes.values()), "prefix_tokens_total": sum(prefixes.values()),
            "question_tokens_mean": statistics.fmean(questions)}


def _warm_up(url: str, workload: Any, warmups: Sequence[Sequence[dict[str, Any]]],
             concurrency: int, replicas: int) -> dict[str, int]:
    """Run warm-up programs until each of the ``replicas`` replicas has served one of them
    (power-of-two may send a whole batch to one replica; a replica's first forward passes
    and the ingress's first calls are slower): ``warmups[k]`` at attempt ``k``, each with
    prefixes of its own — were the same ones sent again, cache-aware routing would send them
    back to the replica that cached them, and a replica the router learnt of late (its
    replica set is updated in the background) would never get one. Returns each replica's
    warm-up requests."""
    import anyio

    served: dict[str, int] = {}
    sent = 0
    for attempt, warmup in enumerate(warmups):
        if attempt:
            time.sleep(0.5)   # let the router's replica set catch up
        anyio.run(_run_programs, url, workload, list(warmup), concurrency)
        sent += len(warmup)
        snap = _wait_for_statistics(sent)
        served = {rid: s["finished_requests"] for rid, s in snap.items()}
        if len(served) >= replicas and all(served.values()):
            break
    return served


def _measure_configuration(spec: RayBenchSpec, routing: str, replicas: int, url: str,
                           workload: Any, inputs: list[dict[str, Any]],
                           warmups: list[list[dict[str, Any]]], *,
                           describe: bool = False) -> dict[str, Any]:
    """Deploy ``replicas`` replicas with ``routing`` (cold caches), warm each of them up
    (:func:`_warm_up`; the warm-up's prefixes share none of the measured ones), run
    ``inputs``, delete the application; return the figures (with ``describe``, and inputs
    with few-shot's ``examples``, also :func:`_prompt_lengths` as ``prompts``)."""
    import anyio
    from ray import serve

    from ..serve_ray import build_app, delete

    options: dict[str, Any] = {"device": spec.device, "seed": spec.seed, "cuda_graphs": False,
                               **spec.engine_kwargs(workload, total_kv=routing == SINGLE_TOTAL_KV)}
    if _on_cpu(spec.device):
        options["num_threads"] = 1  # one Ray CPU per replica
    app = build_app(options, replicas=replicas,
                    routing=routing if routing in ROUTING_ORDER else "round-robin",
                    imbalance=spec.imbalance, server_options={"model_name": APP_NAME},
                    model_factory=_MODEL_FACTORY,
                    model_factory_kwargs={"model": spec.model, "load_format": spec.load_format,
                                          "seed": spec.seed, "device": spec.device})
    serve.run(app, name=APP_NAME, route_prefix="/")
    extra: dict[str, Any] = {}
    try:
        if describe and inputs and "examples" in inputs[0]:
            extra["prompts"] = _prompt_lengths(inputs)
        concurrency = spec.max_concurrency or workload.max_concurrency
        warmed = _warm_up(url, workload, warmups, concurrency, replicas)
        before = _wait_for_statistics(0)
        wall = anyio.run(_run_programs, url, workload, inputs, concurrency)
        requests = sum(s["finished_requests"] for s in before.values()) + len(inputs)
        after = _wait_for_statistics(requests)
    finally:
        delete(APP_NAME)
    return {"configuration": routing, "replica_count": replicas,
            "max_total_tokens": options.get("max_total_tokens"), "warmup_requests": warmed,
            **_figures(before, after, len(inputs), wall), **extra}


def _summary(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per configuration: the median programs/s over the rounds, the hit rate pooled over
    them, and each round's figures."""
    out: dict[str, dict[str, Any]] = {}
    for run in runs:
        out.setdefault(run["configuration"], {"runs": []})["runs"].append(run)
    for entry in out.values():
        rs = entry["runs"]
        prompt = sum(r["prompt_tokens"] for r in rs)
        cached = sum(r["cached_tokens"] for r in rs)
        entry["programs_per_s"] = statistics.median(r["programs_per_s"] for r in rs)
        entry["programs_per_s_each"] = [r["programs_per_s"] for r in rs]
        entry["cache_hit_rate"] = _hit_rate(prompt, cached)
        entry["cache_hit_rate_each"] = [r["cache_hit_rate"] for r in rs]
        entry.pop("runs")
    return out


def _goals(summary: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's two goals, where the configurations they compare were measured."""
    goals: dict[str, Any] = {}
    aware = summary.get("cache-aware")
    if aware is None:
        return goals
    # The goal is against the single engine of one replica's KV pool; the one of all
    # the pools together is the stricter reference (one cache holding what they hold).
    for goal, configuration in (("hit_rate_vs_single", SINGLE),
                                ("hit_rate_vs_single_total_kv", SINGLE_TOTAL_KV)):
        single = summary.get(configuration)
        if single is not None and single["cache_hit_rate"]:
            ratio = aware["cache_hit_rate"] / single["cache_hit_rate"]
            goals[goal] = {"value": ratio, "goal": GOAL_HIT_RATE_VS_SINGLE,
                           "met": ratio >= GOAL_HIT_RATE_VS_SINGLE}
    rr = summary.get("round-robin")
    if rr is not None and rr["programs_per_s"]:
        speedup = aware["programs_per_s"] / rr["programs_per_s"]
        goals["programs_per_s_vs_round_robin"] = {"value": speedup, "goal": GOAL_SPEEDUP_VS_ROUND_ROBIN,
                                                  "met": speedup >= GOAL_SPEEDUP_VS_ROUND_ROBIN}
    return goals


def run_ray_bench(spec: RayBenchSpec, *, log: Any = None) -> dict[str, Any]:
    """Run ``spec`` on a local Ray instance (started and shut down here); return the results
    document (JSON-ready but for non-finite figures). ``log(text)`` hears each run."""
    import warnings

    import ray
    from ray import serve

    from . import WORKLOADS
    from .results import device_info, versions

    say = log or (lambda text: None)
    num_cpus = spec.num_cpus or max(spec.replicas, os.cpu_count() or 1)
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"AIOLM_DEBUG_CHECKS": os.environ.get("AIOLM_DEBUG_CHECKS", "0")}})
    records = []
    try:
        port = _free_port()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}/v1"
        for name in spec.workloads:
            workload = WORKLOADS[name]
            inputs = _measured_inputs(spec, name)
            # Another seed: the warm-up shares no prefix with the measured programs. Tiny:
            # it runs the same code, and what it leaves in the KV pools is small (few-shot's
            # own shape left there cut one replica's later hit rate from 54% to 49%).
            warmups = [_inputs(spec, name, "tiny", spec.seed + 1 + k)[: 2 * spec.replicas]
                       for k in range(_WARMUP_ATTEMPTS)]
            runs = []
            prompts = None
            for round_index in range(spec.rounds):
                for configuration, replicas in spec.configurations(round_index):
                    run = _measure_configuration(spec, configuration, replicas, url, workload,
                                                 inputs, warmups, describe=not runs)
                    prompts = run.pop("prompts", prompts)
                    run["round"] = round_index
                    runs.append(run)
                    say(f"{name} round {round_index} {configuration}: "
                        f"{run['programs_per_s']:.2f} programs/s, hit rate {run['cache_hit_rate']:.3f}")
            summary = _summary(runs)
            records.append({"name": name, "programs": len(inputs),
                            "engine_kwargs": spec.engine_kwargs(workload),
                            "subjects": spec.subjects if name == "few-shot" else None,
                            "prompts": prompts,
                            "summary": summary, "goals": _goals(summary), "runs": runs})
    finally:
        serve.shutdown()
        ray.shutdown()
    return {
        "kind": "ray-routing",
        "device": device_info(spec.device),
        "versions": versions(),
        "config": {**attrs.asdict(spec), "num_cpus": num_cpus,
                   "model": spec.model if spec.model is not None else "SmolLM2-135M-Instruct (embedded)",
                   "order": "each round runs every configuration, the order rotated by one per round"},
        "workloads": records,
    }


def format_report(document: dict[str, Any]) -> str:
    """The summary table and the goals of a :func:`run_ray_bench` document."""
    lines = []
    for record in document["workloads"]:
        pool = record["engine_kwargs"].get("max_total_tokens")
        lines.append(f"{record['name']} ({record['programs']} programs"
                     + (f", KV pool {pool} tokens per replica" if pool else "") + ")")
        prompts = record.get("prompts")
        if prompts:
            lines.append(f"  prefixes {prompts['prefix_tokens_total']} tokens in all "
                         f"({min(prompts['prefix_tokens'])}-{max(prompts['prefix_tokens'])} each), "
                         f"questions {prompts['question_tokens_mean']:.0f} tokens")
        lines.append(f"  {'configuration':<22} {'programs/s':>10} {'hit rate':>9}  per replica (hit rate, requests)")
        by_config: dict[str, list[dict[str, Any]]] = {}
        for run in record["runs"]:
            by_config.setdefault(run["configuration"], []).append(run)
        for configuration, entry in record["summary"].items():
            last = by_config[configuration][-1]["replicas"]
            per = ", ".join(f"{r['cache_hit_rate']:.1%}/{r['requests']}" for r in last.values())
            lines.append(f"  {configuration:<22} {entry['programs_per_s']:>10.2f} "
                         f"{entry['cache_hit_rate']:>8.1%}  {per}")
        for goal, g in record["goals"].items():
            lines.append(f"  goal {goal}: {g['value']:.3f} (goal >= {g['goal']}) "
                         f"{'met' if g['met'] else 'NOT met'}")
    return "\n".join(lines)


def ray_bench_main(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> int:
    """``aiolm bench --backend ray``: check the options, run, print, write ``--out``."""
    if args.suite:
        parser.error("--backend ray runs named workloads, not a --suite")
    if args.peer or args.ablate or args.peer_programs is not None:
        parser.error("--backend ray compares routings: drop --peer / --ablate / --peer-programs")
    if args.routing and args.compare_routing:
        parser.error("give --routing or --compare-routing, not both")
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as exc:
        parser.error(f"--backend ray needs Ray Serve: pip install 'aiolm[ray]' ({exc})")
    routings = tuple(ROUTING_ORDER) if args.compare_routing or not args.routing else tuple(
        dict.fromkeys(args.routing))
    try:
        spec = RayBenchSpec(
            workloads=tuple(args.workloads or ("few-shot",)), size=args.size or "small", seed=args.seed,
            replicas=args.replicas if args.replicas is not None else 2, routings=routings,
            rounds=args.rounds, subjects=args.subjects, single=not args.no_single,
            model=args.dummy or args.model, load_format="dummy" if args.dummy else "auto",
            device=args.device, imbalance=args.imbalance, max_concurrency=args.concurrency,
            replica_max_total_tokens=args.replica_max_total_tokens, shuffle=args.shuffle)
    except ValueError as exc:
        parser.error(str(exc))
    document = run_ray_bench(spec, log=lambda text: print(text, file=sys.stderr, flush=True))
    document["argv"] = ["aiolm", "bench", *argv]
    print(format_report(document))
    if args.out:
        from .results import write_json

        write_json(document, args.out)
        print(f"wrote {args.out}")
    return 0
