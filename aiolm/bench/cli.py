"""``aiolm bench``: run workloads (or a suite) with their ablations and the transformers
peer, print a table and write the results as JSON.

    aiolm bench few-shot --ablate radix --ablate schedule --peer hf --out r.json
    aiolm bench --suite cpu --out docs/benchmarks/cpu-smollm2.json
    aiolm bench --suite gpu --out DIR   (runs benchmarks/gpu_suite.py when present)

A CUDA fault that leaves the process's CUDA context unusable (an illegal memory access in
one variant, say) stops the plan at that step (see :mod:`aiolm.bench.harness`): its error is
recorded and the steps after it run in a fresh process:

1. The faulted process saves what it measured to a state file and replaces itself (``exec``:
   same process id, same terminal) by this command with the hidden option
   ``--resume-state FILE``. Exec, because the broken context keeps the process's device
   memory (the engine's KV pool holds most of the GPU) until the process image goes.
2. That image never touches CUDA. It runs the rest in a child, this command with the hidden
   options ``--resume-step K --resume-out FILE``: steps K.. of the same plan (the plan
   follows from the command line), the device's limits if the plan needs them, its records
   written as JSON to FILE instead of printed. A child that loses its context goes through
   1 and 2 itself, so every process starts at a later step: at most one per step.
3. It merges the child's records into its own (a child that died leaves its steps as errors
   ``not run: ...``), then prints the table and writes ``--out`` as usual, listing every
   fault under ``"context_lost"``. The exit code counts the fault as a failed variant.

A fault at the plan's last step leaves nothing to resume: that process reports, then ends
with ``os._exit``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

import attrs

from ..cli import add_engine_arguments
from .synth import SIZES
from .workload import ABLATIONS

__all__ = ["SUITES", "bench_main", "build_parser"]

#: What each suite runs when the command line does not say otherwise.
SUITES: dict[str, dict[str, Any]] = {
    "cpu": {"size": "small", "peer": "hf", "ablate": list(ABLATIONS), "dummy": None},
    # Used only where benchmarks/gpu_suite.py is missing. No peer by default: call by call at
    # batch 1, transformers needs hours for the full shapes (the GPU suite measures it apart).
    "gpu": {"size": "full", "peer": None, "ablate": list(ABLATIONS), "dummy": "llama-3-8b"},
}


def build_parser() -> argparse.ArgumentParser:
    from . import MULTIMODAL_WORKLOADS, WORKLOADS

    parser = argparse.ArgumentParser(
        prog="aiolm bench",
        description="Run the paper's benchmark workloads as aiolm programs, with ablations and "
        "the transformers peer measured in the same run.",
        epilog="workloads: " + ", ".join(WORKLOADS) + "; with a multimodal model (e.g. --dummy "
        "llava-1.5-7b, qwen2.5-vl-7b): " + ", ".join(MULTIMODAL_WORKLOADS) + ". Latency under Poisson arrivals "
        "(TTFT, ITL, E2E): aiolm bench serving --help.",
    )
    parser.add_argument("workloads", nargs="*", metavar="WORKLOAD", help="workloads to run (see below)")
    parser.add_argument("--suite", choices=tuple(SUITES), help="every workload with the suite's defaults")
    parser.add_argument("--list", action="store_true", help="list the workloads and exit")
    parser.add_argument("--backend", choices=("engine", "openai", "scripted", "ray"), default="engine",
                        help="engine: in-process; openai: aiolm's server over the engine, through "
                        "aiolm.OpenAI; scripted: the deterministic stand-in (no model); ray: "
                        "engine replicas on a local Ray Serve, compared by routing (options below)")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", help="a Hugging Face directory or .gguf file (default: embedded SmolLM2)")
    model.add_argument("--dummy", metavar="NAME", help="random weights of a named config, e.g. llama-3-8b")
    add_engine_arguments(parser, ["device", "shared_prefix_min_tokens"])
    parser.add_argument("--peer", choices=("hf",), help="also run the programs on transformers generate")
    parser.add_argument("--peer-programs", type=int, metavar="N",
                        help="the peer runs only each workload's first N programs (its rate is per call)")
    parser.add_argument("--ablate", action="append", choices=(*ABLATIONS, "all"), default=None,
                        help="also run with this feature off (repeatable)")
    parser.add_argument("--size", choices=SIZES, help="workload size (default: small; the suites set theirs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and dummy weights")
    parser.add_argument("--out", metavar="FILE.json", help="write the results here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    ray = parser.add_argument_group("--backend ray (pip install 'aiolm[ray]'; aiolm/bench/ray_bench.py)")
    ray.add_argument("--replicas", type=int, metavar="N", help="engine replicas (default 2)")
    ray.add_argument("--routing", action="append", choices=("cache-aware", "round-robin", "power-of-two"),
                     help="a routing to measure (repeatable; default: all three)")
    ray.add_argument("--compare-routing", action="store_true",
                     help="measure cache-aware, round-robin and power-of-two in one Ray instance")
    ray.add_argument("--no-single", action="store_true", help="skip the single-engine comparison run")
    ray.add_argument("--rounds", type=int, default=1, metavar="K",
                     help="run every configuration K times, the order rotated each round")
    ray.add_argument("--subjects", type=int, metavar="N", help="few-shot: N subjects interleaved")
    ray.add_argument("--imbalance", type=int, default=4, metavar="N",
                     help="the cache-aware router's spill threshold (requests)")
    ray.add_argument("--concurrency", type=int, metavar="N",
                     help="programs in flight (default: the workload's)")
    ray.add_argument("--replica-max-total-tokens", type=int, metavar="N",
                     help="each replica's KV pool in tokens (default: the workload's); the "
                     "single-engine runs get the same pool, and the replicas' pools together")
    ray.add_argument("--shuffle", action="store_true",
                     help="send the programs in a seeded random order (not the workload's cycle)")
    # Hidden: how a run goes on in fresh processes after a CUDA fault (module docstring).
    parser.add_argument("--resume-state", metavar="FILE.json", help=argparse.SUPPRESS)
    parser.add_argument("--resume-step", type=int, metavar="K", help=argparse.SUPPRESS)
    parser.add_argument("--resume-out", metavar="FILE.json", help=argparse.SUPPRESS)
    return parser


def _gpu_suite_script() -> Path | None:
    import aiolm

    for root in (Path.cwd(), Path(aiolm.__file__).resolve().parent.parent):
        script = root / "benchmarks" / "gpu_suite.py"
        if script.is_file():
            return script
    return None


def _without(argv: list[str], *options: str) -> list[str]:
    """``argv`` without ``options`` and their values (``--option V`` or ``--option=V``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif not arg.startswith(tuple(f"{option}=" for option in options)):
            out.append(arg)
    return out


def bench_main(argv: list[str]) -> int:
    """Run ``aiolm bench`` with ``argv`` (the arguments after ``bench``); return the exit code.

    Exit codes: 0 all variants ran; 1 some variant failed (its error is in the table and
    the JSON); 2 bad arguments. Waits for the processes that run the plan's rest after a
    CUDA fault (module docstring); a process that lost its CUDA context never returns from
    here: it execs itself, or reports and ends with ``os._exit``.
    """
    from . import ALL_WORKLOADS, WORKLOADS

    if argv[:1] == ["serving"]:  # latency under load: its own options (bench/serving.py)
        from .serving import serving_main

        return serving_main(argv[1:])
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.list:
        for w in ALL_WORKLOADS.values():
            print(f"{w.name:<16} {w.summary}")
        return 0
    if args.suite == "gpu":
        script = _gpu_suite_script()
        if script is not None:  # it takes its own options (--out DIR, --budget S, ...)
            return subprocess.call([sys.executable, str(script), *_without(argv, "--suite")])
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.backend == "ray":  # replicas on Ray Serve, routings compared (bench/ray_bench.py)
        from .ray_bench import ray_bench_main

        return ray_bench_main(parser, args, argv)
    if args.peer_programs is not None and args.peer_programs < 1:
        parser.error(f"--peer-programs: must be >= 1, got {args.peer_programs}")
    if args.suite and args.workloads:
        parser.error("give either workloads or --suite, not both")
    unknown = [w for w in args.workloads if w not in ALL_WORKLOADS]
    if unknown:
        parser.error(f"unknown workload {', '.join(unknown)}; choose from {', '.join(ALL_WORKLOADS)}")
    if not args.suite and not args.workloads:
        parser.error("name a workload or a --suite (aiolm bench --list shows the workloads)")

    defaults = SUITES.get(args.suite or "", {})
    names = list(args.workloads) or list(WORKLOADS)  # a suite: the text workloads
    size = args.size or defaults.get("size", "small")
    ablate = args.ablate if args.ablate is not None else defaults.get("ablate", [])
    ablations = list(ABLATIONS) if "all" in ablate else list(dict.fromkeys(ablate))
    peer_name = args.peer or (defaults.get("peer") if args.backend != "scripted" else None)
    dummy = args.dummy or (defaults.get("dummy") if not args.model else None)
    if args.backend == "scripted" and (args.model or dummy):
        parser.error("--backend scripted runs no model: drop --model / --dummy")
    if args.resume_step is not None and (args.resume_out is None or args.resume_state):
        parser.error("--resume-step needs --resume-out, and no --resume-state")
    if args.resume_out and args.resume_step is None and not args.resume_state:
        parser.error("--resume-out needs --resume-step or --resume-state")

    if args.resume_state:
        run = _Run.load(args.resume_state)
    else:
        import anyio

        run = anyio.run(_run, args, names, size, ablations, peer_name, dummy)
    return _finish(run, args, argv)


def _finish(run: _Run, args: argparse.Namespace, argv: list[str]) -> int:
    """Run what is left of the plan in fresh processes, then report; return the exit code.

    Waits for the child that runs the rest. Never returns after this process lost its CUDA
    context: it execs itself with ``--resume-state`` when steps remain, else reports and
    ends with ``os._exit``.
    """
    remaining = run.next_step < len(run.steps)
    if run.held is not None and remaining:
        _exec_resume(run, argv, args.resume_out)
    if remaining:
        _merge(run, _run_in_child(argv, run))
    code = 1 if any(r["errors"] for r in run.results) else 0
    if args.resume_out:
        _write_handoff(run, args.resume_out)
    else:
        _report(run, args, argv)
    if run.held is not None:
        _exit_skipping_teardown(code)
    return code


def _make_target(args: argparse.Namespace, dummy: str | None):
    from .targets import EngineTarget, ScriptedTarget

    if args.backend == "scripted":
        return ScriptedTarget()
    extra = ({"shared_prefix_min_tokens": args.shared_prefix_min_tokens}
             if args.shared_prefix_min_tokens is not None else {})
    return EngineTarget(
        dummy or args.model, load_format="dummy" if dummy else "auto", seed=args.seed, device=args.device,
        **extra,
    )


def _on_cpu(args: argparse.Namespace) -> bool:
    """Whether the benchmark runs on the CPU (then each workload's variants run together)."""
    if args.backend == "scripted":
        return True
    from ..engine.config import resolve_device

    try:
        return resolve_device(args.device).type == "cpu"
    except ValueError:  # CUDA asked for where there is none: each step records the error
        return False


#: The workloads whose records take roofline fractions (see :mod:`aiolm.bench.limits`).
_ROOFLINE_WORKLOADS = ("decode-bs1", "throughput")


async def _rooflines(target: Any, names: list[str]) -> dict[str, Any]:
    """Measure the device's limits and the weights' size, when a workload of the plan needs
    them (on the engine only). Releases the target's engine."""
    from .limits import measure_limits, weight_figures
    from .targets import EngineTarget

    if not isinstance(target, EngineTarget) or not any(n in _ROOFLINE_WORKLOADS for n in names):
        return {}
    import anyio.to_thread

    await target.release()  # the engine's KV memory is not needed for this
    loaded = await target.loaded()
    limits = await anyio.to_thread.run_sync(
        measure_limits, loaded.device, loaded.model_config.torch_dtype)
    return {**limits, **weight_figures(loaded.model)}


def _add_rooflines(results: list[dict[str, Any]], limits: dict[str, Any]) -> None:
    """Add roofline fractions to the records (in place), when ``limits`` has the figures."""
    from .limits import add_roofline_figures

    if "copy_bandwidth_gbps" not in limits:
        return
    for record in results:
        add_roofline_figures(record, limits, limits)  # ``limits`` holds the weight figures too


@attrs.define(eq=False, kw_only=True)
class _Run:
    """What has run of the plan, as the report needs it; saved across an exec (``state``)."""

    #: ``(workload, variant)`` of every step of the plan.
    steps: list[tuple[str, str]]
    #: The first step not run yet (``len(steps)``: none left).
    next_step: int
    results: list[dict[str, Any]]
    limits: dict[str, Any]
    config: dict[str, Any]
    device: dict[str, Any]
    #: ``{"workload", "variant", "error"}`` of each CUDA fault, this process's and its children's.
    context_lost: list[dict[str, str]]
    #: After a CUDA fault in this process, its targets, held so that nothing frees their
    #: device memory through the broken context before the process image goes; else None.
    held: tuple[Any, ...] | None = None

    def state(self) -> dict[str, Any]:
        """Everything but ``held``, JSON-ready."""
        return attrs.asdict(self, filter=lambda attribute, _: attribute.name != "held")

    @classmethod
    def load(cls, path: str) -> _Run:
        """The run saved at ``path`` by :func:`_exec_resume`; deletes the file."""
        state = json.loads(Path(path).read_text())
        Path(path).unlink()
        return cls(**{**state, "steps": [tuple(step) for step in state["steps"]]})


async def _run(args: argparse.Namespace, names: list[str], size: str, ablations: list[str],
               peer_name: str | None, dummy: str | None) -> _Run:
    """Run the plan's steps from ``--resume-step`` (default 0), then the rooflines; close the
    targets, unless a CUDA fault stopped the plan (then the run holds them)."""
    from . import ALL_WORKLOADS
    from .harness import ContextLost, plan, run_plan
    from .results import device_info
    from .targets import EngineTarget, HFTarget

    target = _make_target(args, dummy)
    peer = None
    if peer_name:
        if not isinstance(target, EngineTarget):
            raise SystemExit("aiolm bench: --peer hf needs a model (not --backend scripted)")
        peer = HFTarget(target)
    steps = plan([ALL_WORKLOADS[n] for n in names], target, size=size, ablations=ablations, peer=peer,
                 by_workload=_on_cpu(args), via_openai=args.backend == "openai",
                 peer_programs=args.peer_programs)
    start = args.resume_step or 0
    if not 0 <= start < len(steps):
        raise SystemExit(f"aiolm bench: --resume-step {start}: the plan has steps 0 to {len(steps) - 1}")
    # Asked before any step runs: after a CUDA fault even a device query may fail.
    device = device_info("cpu" if args.backend == "scripted" else args.device)
    lost: ContextLost | None = None
    try:
        with _ProgressBar(disable=args.no_progress) as bar:
            if isinstance(target, EngineTarget):
                bar.stage("loading model")
                # NOTE: a model that fails to load is not fatal here: every step then fails
                # to open it and records why, as any failing variant does.
                with contextlib.suppress(Exception):
                    await target.loaded()
            results = await run_plan(steps, size=size, seed=args.seed, start=start, progress=bar)
        limits = await _rooflines(target, names)
        _add_rooflines(results, limits)
    except ContextLost as exc:
        print(f"aiolm bench: {exc}", file=sys.stderr)
        lost, results, limits = exc, exc.records, {}
    finally:
        # NOTE: after a CUDA fault, closing an engine calls into the broken context.
        if lost is None:
            await target.aclose()
            if peer is not None:
                await peer.aclose()
    config = {
        "backend": target.describe(), "via_openai": args.backend == "openai",
        "peer": peer.describe() if peer else None,
        "workloads": names, "size": size, "seed": args.seed, "ablations": ablations,
        "suite": args.suite, "peer_programs": args.peer_programs,
    }
    return _Run(
        steps=[(step.workload.name, step.variant.name) for step in steps],
        next_step=len(steps) if lost is None else lost.next_step,
        results=results, limits=limits, config=config, device=device,
        context_lost=[] if lost is None else [
            {"workload": lost.step.workload.name, "variant": lost.step.variant.name, "error": lost.error}],
        held=None if lost is None else (target, peer),
    )


class _ProgressBar:
    """``aiolm bench``'s tqdm bar on stderr (a :class:`~aiolm.bench.harness.PlanProgress`):
    one step per measured program of the plan, the current stage as its description."""

    def __init__(self, *, disable: bool) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=None, unit="prog", desc="starting", disable=disable, file=sys.stderr,
                         dynamic_ncols=True)

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._bar.close()

    def planned(self, programs: int) -> None:
        self._bar.reset(total=programs)

    def stage(self, text: str) -> None:
        self._bar.set_description_str(text)

    def advance(self, programs: int) -> None:
        self._bar.update(programs)


def _resume_argv(argv: list[str], *options: str) -> list[str]:
    """This command (``python -m aiolm.cli bench``) with ``argv``, its resume options
    dropped, then ``options``."""
    return [sys.executable, "-m", "aiolm.cli", "bench",
            *_without(argv, "--resume-state", "--resume-step", "--resume-out"), *options]


def _without_injected_fault(faulted: str) -> dict[str, str]:
    """This process's environment without the fault injected at step ``faulted`` (if any)."""
    from .harness import INJECT_FAULT_ENV, injected_faults

    env = dict(os.environ)
    rest = [name for name in injected_faults(env) if name != faulted]
    if rest:
        env[INJECT_FAULT_ENV] = ",".join(rest)
    else:
        env.pop(INJECT_FAULT_ENV, None)
    return env


def _exec_resume(run: _Run, argv: list[str], resume_out: str | None) -> NoReturn:
    """Save ``run`` and replace this process by this command with ``--resume-state`` (and
    ``--resume-out``, where this process is a child); the testing hook's fault at the
    faulted step is dropped from the environment. Never returns."""
    fd, state = tempfile.mkstemp(prefix="aiolm-bench-state-", suffix=".json")
    with os.fdopen(fd, "w") as file:
        # Plain json, not write_json: NaN and infinite figures survive to the report.
        json.dump(run.state(), file)
    options = ["--resume-state", state, *(["--resume-out", resume_out] if resume_out else [])]
    faulted = run.context_lost[-1]
    env = _without_injected_fault(f"{faulted['workload']}/{faulted['variant']}")
    command = _resume_argv(argv, *options)
    print(f"aiolm bench: running steps {run.next_step}.. in a fresh process", file=sys.stderr)
    sys.stdout.flush()  # exec drops Python's buffers
    sys.stderr.flush()
    # NOTE: exec, not a child of this process: the broken context keeps this process's
    # device memory until its image goes, and skips the teardown that can abort it.
    os.execve(command[0], command, env)


def _run_in_child(argv: list[str], run: _Run) -> dict[str, Any]:
    """Run the plan from ``run.next_step`` in a child (this command with ``--resume-step``
    and ``--resume-out``); wait for it and return its hand-off document (``{"workloads",
    "limits", "context_lost"}``). If it ends without one, a document whose records say that
    those steps were not run."""
    from . import ALL_WORKLOADS
    from .harness import new_record

    start = run.next_step
    with tempfile.TemporaryDirectory(prefix="aiolm-bench-") as tmp:
        handoff = Path(tmp) / "steps.json"
        command = _resume_argv(argv, "--resume-step", str(start), "--resume-out", str(handoff))
        code = subprocess.run(command, check=False).returncode
        try:
            return json.loads(handoff.read_text())
        except (OSError, ValueError):  # it died before (or while) writing its records
            reason = f"the fresh process for steps {start}.. exited with code {code} without results"
    records: dict[str, dict[str, Any]] = {}
    for workload, variant in run.steps[start:]:
        record = records.setdefault(workload, new_record(ALL_WORKLOADS[workload], run.config["size"]))
        record["errors"][variant] = f"not run: {reason}"
    return {"workloads": list(records.values()), "limits": {}, "context_lost": []}


def _merge(run: _Run, handoff: dict[str, Any]) -> None:
    """Add a child's hand-off document (the rest of the plan) to ``run``, in place."""
    from .harness import merge_records

    run.results = merge_records([run.results, handoff["workloads"]], order=run.config["workloads"])
    run.limits = {**run.limits, **handoff["limits"]}
    _add_rooflines(run.results, run.limits)  # the records measured before the fault lack them
    run.context_lost += handoff["context_lost"]
    run.next_step = len(run.steps)


def _write_handoff(run: _Run, path: str) -> None:
    """Write what this child ran for its parent (``--resume-out``)."""
    document = {"workloads": run.results, "limits": run.limits, "context_lost": run.context_lost}
    # Plain json, not write_json: NaN and infinite figures survive to the parent's report.
    Path(path).write_text(json.dumps(document))


def _report(run: _Run, args: argparse.Namespace, argv: list[str]) -> None:
    """Print the table and the goals; write ``--out``."""
    from .goals import check_goals, format_goals
    from .results import format_table, make_document, write_json

    document = make_document(device=run.device, config=run.config, workloads=run.results,
                             limits=run.limits, argv=argv, context_lost=run.context_lost)
    print(f"device: {run.device['kind']} ({run.device['name']})")
    print(format_table(run.results))
    goals = check_goals(document)
    if goals:
        print("goals:")
        print(format_goals(goals))
    if args.out:
        write_json(document, args.out)
        print(f"wrote {args.out}")


def _exit_skipping_teardown(code: int) -> NoReturn:
    """End the process with ``code`` now, without the interpreter's teardown."""
    # NOTE: after a sticky CUDA fault, a normal exit runs torch's and the driver's teardown
    # (freeing cached memory, destroying the context) on the broken context, which can abort
    # the process and turn exit code 0 or 1 into a crash. Everything is written by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
