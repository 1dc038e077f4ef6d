"""``aiolm bench``: run workloads (or a suite) with their ablations and the transformers
peer, print a table and write the results as JSON.

    aiolm bench few-shot --ablate radix --ablate schedule --peer hf --out r.json
    aiolm bench --suite cpu --out docs/benchmarks/cpu-smollm2.json
    aiolm bench --suite gpu --out DIR   (runs benchmarks/gpu_suite.py when present)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

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
    from . import WORKLOADS

    parser = argparse.ArgumentParser(
        prog="aiolm bench",
        description="Run the paper's benchmark workloads as aiolm programs, with ablations and "
        "the transformers peer measured in the same run.",
        epilog="workloads: " + ", ".join(WORKLOADS),
    )
    parser.add_argument("workloads", nargs="*", metavar="WORKLOAD", help="workloads to run (see below)")
    parser.add_argument("--suite", choices=tuple(SUITES), help="every workload with the suite's defaults")
    parser.add_argument("--list", action="store_true", help="list the workloads and exit")
    parser.add_argument("--backend", choices=("engine", "openai", "scripted"), default="engine",
                        help="engine: in-process; openai: aiolm's server over the engine, through "
                        "aiolm.OpenAI; scripted: the deterministic stand-in (no model)")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", help="a Hugging Face directory or .gguf file (default: embedded SmolLM2)")
    model.add_argument("--dummy", metavar="NAME", help="random weights of a named config, e.g. llama-3-8b")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--peer", choices=("hf",), help="also run the programs on transformers generate")
    parser.add_argument("--peer-programs", type=int, metavar="N",
                        help="the peer runs only each workload's first N programs (its rate is per call)")
    parser.add_argument("--ablate", action="append", choices=(*ABLATIONS, "all"), default=None,
                        help="also run with this feature off (repeatable)")
    parser.add_argument("--size", choices=SIZES, help="workload size (default: small; the suites set theirs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and dummy weights")
    parser.add_argument("--out", metavar="FILE.json", help="write the results here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _gpu_suite_script() -> Path | None:
    import aiolm

    for root in (Path.cwd(), Path(aiolm.__file__).resolve().parent.parent):
        script = root / "benchmarks" / "gpu_suite.py"
        if script.is_file():
            return script
    return None


def _without_suite(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--suite":
            skip = True
        elif not arg.startswith("--suite="):
            out.append(arg)
    return out


def bench_main(argv: list[str]) -> int:
    """Run ``aiolm bench`` with ``argv`` (the arguments after ``bench``); return the exit code.

    Exit codes: 0 all variants ran; 1 some variant failed (its error is in the table and
    the JSON); 2 bad arguments.
    """
    from . import WORKLOADS

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.list:
        for w in WORKLOADS.values():
            print(f"{w.name:<16} {w.summary}")
        return 0
    if args.suite == "gpu":
        script = _gpu_suite_script()
        if script is not None:  # it takes its own options (--out DIR, --budget S, ...)
            return subprocess.call([sys.executable, str(script), *_without_suite(argv)])
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.peer_programs is not None and args.peer_programs < 1:
        parser.error(f"--peer-programs: must be >= 1, got {args.peer_programs}")
    if args.suite and args.workloads:
        parser.error("give either workloads or --suite, not both")
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    if not args.suite and not args.workloads:
        parser.error("name a workload or a --suite (aiolm bench --list shows the workloads)")

    defaults = SUITES.get(args.suite or "", {})
    names = list(args.workloads) or list(WORKLOADS)
    size = args.size or defaults.get("size", "small")
    ablate = args.ablate if args.ablate is not None else defaults.get("ablate", [])
    ablations = list(ABLATIONS) if "all" in ablate else list(dict.fromkeys(ablate))
    peer_name = args.peer or (defaults.get("peer") if args.backend != "scripted" else None)
    dummy = args.dummy or (defaults.get("dummy") if not args.model else None)
    if args.backend == "scripted" and (args.model or dummy):
        parser.error("--backend scripted runs no model: drop --model / --dummy")

    import anyio

    return anyio.run(_run, args, argv, names, size, ablations, peer_name, dummy)


def _make_target(args: argparse.Namespace, dummy: str | None):
    from .targets import EngineTarget, ScriptedTarget

    if args.backend == "scripted":
        return ScriptedTarget()
    return EngineTarget(
        dummy or args.model, load_format="dummy" if dummy else "auto", seed=args.seed, device=args.device,
    )


def _on_cpu(args: argparse.Namespace) -> bool:
    """Whether the benchmark runs on the CPU (then each workload's variants run together)."""
    if args.backend == "scripted" or args.device == "cpu":
        return True
    if args.device != "auto":
        return False
    import torch

    return not torch.cuda.is_available()


async def _rooflines(target: Any, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Measure the device's limits and add roofline fractions, when a workload needs them."""
    from .limits import add_roofline_figures, measure_limits, weight_figures
    from .targets import EngineTarget

    if not isinstance(target, EngineTarget) or not any(
            r["name"] in ("decode-bs1", "throughput") for r in results):
        return {}
    import anyio.to_thread

    await target.release()  # the engine's KV memory is not needed for this
    loaded = await target.loaded()
    limits = await anyio.to_thread.run_sync(
        measure_limits, loaded.device, loaded.model_config.torch_dtype)
    weights = weight_figures(loaded.model)
    for record in results:
        add_roofline_figures(record, limits, weights)
    return {**limits, **weights}


async def _run(args: argparse.Namespace, argv: list[str], names: list[str], size: str,
               ablations: list[str], peer_name: str | None, dummy: str | None) -> int:
    from tqdm import tqdm

    from . import WORKLOADS
    from .goals import check_goals, format_goals
    from .harness import plan, run_plan
    from .results import device_info, format_table, make_document, write_json
    from .targets import EngineTarget, HFTarget

    target = _make_target(args, dummy)
    peer = None
    if peer_name:
        if not isinstance(target, EngineTarget):
            raise SystemExit("aiolm bench: --peer hf needs a model (not --backend scripted)")
        peer = HFTarget(target)
    steps = plan([WORKLOADS[n] for n in names], target, size=size, ablations=ablations, peer=peer,
                 by_workload=_on_cpu(args), via_openai=args.backend == "openai",
                 peer_programs=args.peer_programs)
    try:
        with tqdm(total=len(steps), unit="run", disable=args.no_progress, file=sys.stderr) as bar:
            def done(step: Any) -> None:
                bar.set_postfix_str(f"{step.workload.name} / {step.variant.name}")
                bar.update()

            results = await run_plan(steps, size=size, seed=args.seed, on_step_done=done)
        limits = await _rooflines(target, results)
    finally:
        await target.aclose()
        if peer is not None:
            await peer.aclose()
    config = {
        "backend": target.describe(), "via_openai": args.backend == "openai",
        "peer": peer.describe() if peer else None,
        "workloads": names, "size": size, "seed": args.seed, "ablations": ablations,
        "suite": args.suite, "peer_programs": args.peer_programs,
    }
    device = device_info("cpu" if args.backend == "scripted" else args.device)
    document = make_document(device=device, config=config, workloads=results, limits=limits, argv=argv)
    print(f"device: {device['kind']} ({device['name']})")
    print(format_table(results))
    goals = check_goals(document)
    if goals:
        print("goals:")
        print(format_goals(goals))
    if args.out:
        write_json(document, args.out)
        print(f"wrote {args.out}")
    return 1 if any(r["errors"] for r in results) else 0
