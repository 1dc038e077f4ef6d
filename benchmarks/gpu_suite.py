#!/usr/bin/env python3
"""The GPU suite: tests, physical limits, aiolm and its transformers peer, in ONE process.

``python benchmarks/gpu_suite.py --out DIR`` (or ``aiolm bench --suite gpu --out DIR``):

1. tests — ``pytest -m gpu`` on tests/test_gpu_*.py (kernels vs the torch backend, engine
   greedy parity, CUDA graphs vs eager), JUnit XML in DIR;
2. limits — device-to-device copy bandwidth (bytes read + written) and the bf16 matmul rate
   (8192³, random data), medians of CUDA-event timings;
3. aiolm — Llama-3-8B shape with dummy bf16 weights through ``aiolm.Engine`` with token ids,
   for each attention backend (triton; hybrid — flashinfer extend + triton decode — where
   flashinfer imports): decode-bs1, prefill of one 8k prompt, few-shot (shared 1.5k
   prefixes) and throughput; few-shot again with the radix cache off on the faster backend
   (the one ``"auto"`` should pick);
4. peer — transformers with the same config and weights (benchmarks/hf_peer.py);
5. sanitizer — compute-sanitizer memcheck over flashinfer's paged prefill with the page
   index list unpadded (the illegal address the engine once hit) and padded as the engine
   pads it (benchmarks/flashinfer_index_probe.py), where flashinfer imports;
6. soak — benchmarks/gpu_soak.py: every bench workload and ablation, a greedy oracle against
   the torch backend and the random-program fuzzer, per attention backend, the engine's KV
   accounting checked after each;
7. DIR/gpu_results.json (every figure next to its peer's and its limit), DIR/gpu_suite.log,
   and a short table printed last.

Every section is failure-isolated (its error is recorded, the suite goes on) and
time-bounded; a watchdog writes what exists and exits at ``--budget`` seconds.
``--dry-run`` runs the same plumbing on the CPU with a tiny model and tiny counts.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import platform
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for _path in (str(ROOT), str(ROOT / "benchmarks")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import attrs  # noqa: E402
import gpu_workloads as wl  # noqa: E402
from gpu_workloads import time_limit  # noqa: E402

RESULTS_FILE = "gpu_results.json"
LOG_FILE = "gpu_suite.log"
JUNIT_FILE = "pytest_junit.xml"


class Tee:
    """A text stream that writes to the console and to the suite's log."""

    def __init__(self, stream: Any, log: Any) -> None:
        self._stream, self._log = stream, log

    def write(self, text: str) -> int:
        self._stream.write(text)
        self._log.write(text)
        return len(text)

    def flush(self) -> None:
        self._stream.flush()
        self._log.flush()

    def fileno(self) -> int:
        return self._stream.fileno()

    def isatty(self) -> bool:
        return False


class Suite:
    """Results, deadlines, failure isolation and the watchdog."""

    def __init__(self, out: Path, plan: wl.Plan, budget: float, kind: str | None) -> None:
        self.out = out
        self.plan = plan
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget
        self._lock = threading.Lock()
        self.results: dict[str, Any] = {
            "suite": "gpu", "dry_run": plan.dry_run, "kind": kind,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "budget_s": budget,
            "plan": plan.describe(), "sections": {}, "figures": [], "notes": [],
            "timed_out": False,
        }
        self.loaded: Any = None  # the dummy model, shared by the aiolm and peer sections
        self.soak_backends: str | None = None
        self.workloads: tuple[str, ...] | None = None   # None: every aiolm workload
        self.ablations = True

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def section(self, name: str, fn: Callable[[], Any], *, needs: float = 0.0) -> Any:
        """Run ``fn`` as section ``name``; its value or error goes into the results."""
        record: dict[str, Any] = {}
        self.results["sections"][name] = record
        if self.remaining() < needs:
            record.update(status="skipped", reason=f"needs {needs:.0f} s, "
                          f"{self.remaining():.0f} s left")
            print(f"== {name}: skipped ({record['reason']})", flush=True)
            self.save()
            return None
        print(f"== {name} ({self.remaining():.0f} s left)", flush=True)
        start = time.monotonic()
        value = None
        try:
            value = fn()
            record["status"] = "ok"
            record.pop("partial", None)
            if value is not None:
                record["result"] = value
        except Exception as exc:  # noqa: BLE001 - isolation: record and go on
            record.update(status="error", error=f"{type(exc).__name__}: {exc}",
                          traceback=traceback.format_exc()[-4000:])
            print(f"!! {name} failed: {record['error']}", flush=True)
        finally:
            record["seconds"] = round(time.monotonic() - start, 2)
            gc.collect()
            wl.empty_device_cache()
            self.save()
        return value

    def save(self) -> None:
        if not self._lock.acquire(timeout=5):
            return
        try:
            self.results["elapsed_s"] = round(time.monotonic() - self.t0, 1)
            self.results["figures"] = wl.figures(self.results)
            tmp = self.out / (RESULTS_FILE + ".tmp")
            tmp.write_text(json.dumps(self.results, indent=1, default=str))
            tmp.replace(self.out / RESULTS_FILE)
        finally:
            self._lock.release()

    def start_watchdog(self) -> None:
        def watch() -> None:
            while self.remaining() > 0:
                time.sleep(min(1.0, max(self.remaining(), 0.01)))
            self.results["timed_out"] = True
            self.results["notes"].append("the watchdog stopped the suite at its budget")
            self.save()
            print(wl.table(self.results), flush=True)
            os._exit(3)

        threading.Thread(target=watch, name="suite-watchdog", daemon=True).start()


# ------------------------------------------------------------------------ sections


def environment(plan: wl.Plan) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "platform": platform.platform()}
    for package in ("triton", "transformers", "flashinfer", "numpy"):
        try:
            module = __import__(package)
            info[package] = getattr(module, "__version__", "?")
        except Exception as exc:  # noqa: BLE001 - a missing or broken package is a finding
            info[package] = f"unavailable: {type(exc).__name__}: {exc}"[:200]
    if plan.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, multiprocessors=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}")
        with contextlib.suppress(Exception):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,"
                                  "clocks.max.sm", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=15)
            info["nvidia_smi"] = smi.stdout.strip()
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()})"
    with contextlib.suppress(Exception):
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10)
        if rev.returncode == 0:
            info["commit"] = rev.stdout.strip()
    return info


class _Deadline:
    """A pytest plugin: skip the tests that would start after the section's deadline."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def pytest_runtest_setup(self, item: Any) -> None:
        import pytest

        if time.monotonic() > self.deadline:
            pytest.skip("the GPU suite's test budget is spent")


def run_tests(suite: Suite) -> dict[str, Any]:
    import pytest

    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_gpu_*.py"))
    junit = suite.out / JUNIT_FILE
    args = ["-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={junit}",
            "-o", f"timeout={suite.plan.test_timeout}",
            # The suite checks results, not third-party warnings (the CPU CI keeps them errors).
            "-W", "ignore::DeprecationWarning", "-W", "ignore::UserWarning",
            "-W", "ignore::FutureWarning", *files]
    budget = min(suite.plan.test_budget, suite.remaining() - suite.plan.reserve)
    os.chdir(ROOT)
    before = os.environ.get("AIOLM_DEBUG_CHECKS")
    try:
        code = pytest.main(args, plugins=[_Deadline(time.monotonic() + budget)])
    finally:
        # tests/conftest.py turns the debug checks on; the benchmarks after must not pay them.
        if before is None:
            os.environ.pop("AIOLM_DEBUG_CHECKS", None)
    summary = wl.junit_summary(junit)
    summary["exit_code"] = int(code)
    return summary


def limits(suite: Suite) -> dict[str, Any]:
    with time_limit(min(60.0, suite.remaining() - suite.plan.reserve)):
        return wl.measure_limits(suite.plan)


def aiolm_benchmarks(suite: Suite) -> dict[str, Any]:
    import anyio

    plan = suite.plan
    out: dict[str, Any] = {}
    with time_limit(120.0):
        loaded = wl.load_dummy(plan)
    out["model"] = wl.model_numbers(loaded)
    suite.results["sections"]["aiolm"]["partial"] = out
    for backend in plan.backends:
        budget = min(plan.engine_budget, suite.remaining() - plan.reserve - plan.peer_budget)
        if budget < 30:
            out[backend] = {"status": "skipped", "reason": "not enough time left"}
            continue
        print(f"-- aiolm, attention_backend={backend!r} ({budget:.0f} s)", flush=True)
        record: dict[str, Any] = {}
        out[backend] = record
        try:
            anyio.run(wl.engine_benchmarks, loaded, backend, plan, time.monotonic() + budget,
                      record, suite.workloads)
        except Exception as exc:  # noqa: BLE001 - one backend failing must not stop the other
            record["error"] = f"{type(exc).__name__}: {exc}"
            record["traceback"] = traceback.format_exc()[-4000:]
            print(f"!! aiolm {backend}: {record['error']}", flush=True)
        gc.collect()
        wl.empty_device_cache()
        suite.save()
    best = wl.faster_backend(out, plan.backends)
    if best is None and "torch" not in plan.backends:
        # No kernel backend ran: the torch backend still measures the rest of the engine.
        budget = min(plan.engine_budget, suite.remaining() - plan.reserve - plan.peer_budget)
        if budget >= 30:
            print(f"-- aiolm, attention_backend='torch' (fallback, {budget:.0f} s)", flush=True)
            record = out["torch"] = {"fallback": "no requested backend produced figures"}
            try:
                anyio.run(wl.engine_benchmarks, loaded, "torch", plan,
                          time.monotonic() + budget, record)
            except Exception as exc:  # noqa: BLE001
                record["error"] = f"{type(exc).__name__}: {exc}"
            gc.collect()
            wl.empty_device_cache()
            best = wl.faster_backend(out, ["torch"])
    out["auto_choice"] = best
    if best is not None and suite.ablations:
        # The ablations on the backend "auto" picks: (name, benchmark, budget, least budget).
        for name, bench, cap, least in (
                ("radix_off", wl.radix_off_benchmark, plan.ablation_budget, 20),
                ("overlap_off", wl.overlap_off_benchmark, plan.ablation_budget * 2, 30)):
            budget = min(cap, suite.remaining() - plan.reserve - plan.peer_budget)
            if budget < least:
                out[name] = {"status": "skipped", "reason": "not enough time left"}
                continue
            record = out[name] = {}
            try:
                anyio.run(bench, loaded, best, plan, time.monotonic() + budget, record)
            except Exception as exc:  # noqa: BLE001
                record["error"] = f"{type(exc).__name__}: {exc}"
    suite.loaded = loaded
    return out


def peer(suite: Suite) -> dict[str, Any]:
    import hf_peer

    plan = suite.plan
    out: dict[str, Any] = {}
    loaded = getattr(suite, "loaded", None)
    with time_limit(120.0):
        if loaded is None:
            loaded = wl.load_dummy(plan)
        model = hf_peer.build(wl.hf_config(plan), dtype=wl.torch_dtype(plan),
                              device=wl.torch_device(plan), weights_from=loaded.model)
    suite.loaded = None
    del loaded
    gc.collect()
    wl.empty_device_cache()
    out["attn_implementation"] = str(getattr(model.config, "_attn_implementation", "?"))
    suite.results["sections"]["peer"]["partial"] = out
    data = wl.Workloads(plan)
    steps: list[tuple[str, Callable[[], dict[str, Any]], float]] = [
        ("decode_bs1", lambda: hf_peer.decode_bs1(model, data.decode_prompt, plan.decode_new,
                                                   compiled=False), 60),
        ("static_batch", lambda: hf_peer.static_batch(
            model, data.hf_prompts, data.hf_outputs, batch_size=plan.hf_batch), 120),
        ("few_shot", lambda: hf_peer.few_shot(model, data.hf_few_shot), 60),
        ("decode_bs1_compiled", lambda: hf_peer.decode_bs1(
            model, data.decode_prompt, plan.decode_new, compiled=True), 240),
    ]
    for name, fn, cap in steps:
        if name == "decode_bs1_compiled" and not plan.hf_compile:
            out[name] = {"status": "skipped", "reason": "--no-hf-compile"}
            continue
        budget = min(cap, suite.remaining() - plan.reserve)
        if budget < 10:
            out[name] = {"status": "skipped", "reason": "not enough time left"}
            continue
        print(f"-- transformers {name} ({budget:.0f} s)", flush=True)
        try:
            with time_limit(budget):
                out[name] = fn()
        except Exception as exc:  # noqa: BLE001 - record and go on to the next figure
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
            print(f"!! transformers {name}: {out[name]['error']}", flush=True)
        suite.save()
    return out


def sanitizer(suite: Suite) -> dict[str, Any]:
    """compute-sanitizer memcheck over one flashinfer prefill, index list unpadded and padded."""
    import shutil

    tool = shutil.which("compute-sanitizer")
    if tool is None:
        raise RuntimeError("compute-sanitizer is not on the PATH")
    probe = str(ROOT / "benchmarks" / "flashinfer_index_probe.py")
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    out: dict[str, Any] = {}
    for pad in (0, 256):
        budget = min(150.0, suite.remaining() - suite.plan.reserve)
        run = subprocess.run([tool, "--tool", "memcheck", "--print-limit", "4", sys.executable,
                              probe, "--pad", str(pad)], capture_output=True, text=True,
                             timeout=budget, env=env)
        text = run.stdout + run.stderr
        summary = [line for line in text.splitlines() if "ERROR SUMMARY" in line]
        first = [line.strip() for line in text.splitlines() if "Invalid" in line][:2]
        out[f"pad_{pad}"] = {"exit_code": run.returncode, "summary": summary[-1:],
                             "first_errors": first, "probe": [
                                 line for line in text.splitlines() if "relative error" in line]}
        print(f"-- sanitizer pad={pad}: {summary[-1:] or text[-300:]}", flush=True)
    return out


def soak(suite: Suite, budget: float) -> dict[str, Any]:
    import gpu_soak

    plan = gpu_soak.SoakPlan.make(dry_run=suite.plan.dry_run, backends=suite.soak_backends)
    record = suite.results["sections"]["soak"]
    partial: dict[str, Any] = {}
    record["partial"] = partial
    deadline = time.monotonic() + min(budget, suite.remaining() - suite.plan.reserve)
    gpu_soak.run_soak(plan, deadline, partial, suite.save)
    print("\n".join(gpu_soak.summary_lines(partial)), flush=True)
    return partial


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="aiolm GPU suite (see docs/gpu.md)")
    parser.add_argument("--out", required=True, help="folder for the JSON, the log, JUnit XML")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny model, tiny counts: checks the plumbing")
    parser.add_argument("--budget", type=float, default=470.0,
                        help="seconds for the whole suite (the watchdog stops it there)")
    parser.add_argument("--kind", help="device kind name to record (default: from the GPU name)")
    parser.add_argument("--throughput-requests", type=int,
                        help="throughput workload size (default 500 on the GPU; the paper's 1000)")
    parser.add_argument("--max-running-requests", type=int,
                        help="the engine's max_running_requests (default: the engine's)")
    parser.add_argument("--skip", action="append", default=[],
                        choices=["tests", "limits", "aiolm", "peer", "sanitizer", "soak",
                                 "ablations"],
                        help="skip a section (ablations: aiolm's radix-off and overlap-off)")
    parser.add_argument("--workloads",
                        help="comma-separated aiolm workloads to run (default: all of "
                             f"{', '.join(wl.ENGINE_WORKLOADS)})")
    parser.add_argument("--soak-budget", type=float, default=240.0,
                        help="seconds for the soak section")
    parser.add_argument("--soak-backends", help="attention backends the soak runs (default: all)")
    parser.add_argument("--backends", help="comma-separated attention backends to benchmark")
    parser.add_argument("--no-hf-compile", action="store_true",
                        help="skip transformers' compiled batch-1 decode (a long compile)")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / LOG_FILE, "a", buffering=1)  # noqa: SIM115 - lives as long as the run
    sys.stdout = Tee(sys.__stdout__, log)
    sys.stderr = Tee(sys.__stderr__, log)

    plan = wl.Plan.make(dry_run=args.dry_run, throughput_requests=args.throughput_requests,
                        backends=args.backends, hf_compile=not args.no_hf_compile,
                        max_running_requests=args.max_running_requests)
    if "peer" in args.skip:   # no time to hold back for it
        plan = attrs.evolve(plan, peer_budget=0.0)
    suite = Suite(out, plan, args.budget, args.kind)
    suite.soak_backends = args.soak_backends
    suite.ablations = "ablations" not in args.skip
    if args.workloads:
        suite.workloads = tuple(w.strip() for w in args.workloads.split(",") if w.strip())
        unknown = sorted(set(suite.workloads) - set(wl.ENGINE_WORKLOADS))
        if unknown:
            parser.error(f"--workloads: unknown {', '.join(unknown)} (choose from "
                         f"{', '.join(wl.ENGINE_WORKLOADS)})")
    suite.start_watchdog()
    env = suite.section("environment", lambda: environment(plan))
    if suite.results["kind"] is None:
        suite.results["kind"] = wl.kind_from_device((env or {}).get("device", ""))
    if "tests" not in args.skip:
        suite.section("tests", lambda: run_tests(suite), needs=30)
    if "limits" not in args.skip:
        suite.section("limits", lambda: limits(suite), needs=10)
    if "aiolm" not in args.skip:
        suite.section("aiolm", lambda: aiolm_benchmarks(suite), needs=60)
    if "peer" not in args.skip:
        suite.section("peer", lambda: peer(suite), needs=30)
    if "sanitizer" not in args.skip and not plan.dry_run and importlib.util.find_spec(
            "flashinfer") is not None:
        suite.section("sanitizer", lambda: sanitizer(suite), needs=60)
    if "soak" not in args.skip:
        suite.section("soak", lambda: soak(suite, args.soak_budget), needs=60)
    suite.results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    suite.save()
    print(wl.table(suite.results), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
