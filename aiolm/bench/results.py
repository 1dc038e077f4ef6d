"""The results document of a benchmark run: device, versions, config, every workload's
figures; and the short table printed at the end.

The JSON layout (``"format": "aiolm-bench/1"``)::

    {"format", "created", "command", "device": {"kind": "cpu" | "cuda", "name", ...},
     "versions": {...}, "config": {...}, "limits": {...},
     "workloads": [{"name", "summary", "shape", "engine_kwargs", "headline",
                    "higher_is_better", "runs": {variant: {figure: value}},
                    "ratios": {"aiolm/<variant>": value}, "errors": {variant: message}}],
     "context_lost": [{"workload", "variant", "error"}]}

``context_lost`` lists the variants whose CUDA fault broke their process's CUDA context (the
steps after each ran in a fresh process); it is empty when there was none.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["FORMAT", "device_info", "format_table", "make_document", "versions", "write_json"]

FORMAT = "aiolm-bench/1"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: str = "cpu") -> dict[str, Any]:
    """The device the benchmark ran on: ``{"kind": "cpu" | "cuda", "name": ..., ...}``.

    ``device`` is the engine's device setting; ``"auto"`` means CUDA when torch sees one
    (torch is imported only then, and only if it is installed).
    """
    if device != "cpu":
        try:
            import torch
        except ImportError:
            torch = None  # type: ignore[assignment]
        if torch is not None and torch.cuda.is_available():
            index = torch.device(device).index if device.startswith("cuda:") else 0
            return {
                "kind": "cuda",
                "name": torch.cuda.get_device_name(index),
                "count": torch.cuda.device_count(),
                "cuda": torch.version.cuda,
            }
    return {"kind": "cpu", "name": _cpu_name(), "cores": os.cpu_count()}


def versions() -> dict[str, str]:
    """Versions of Python and of the packages that decide the figures (those installed)."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("aiolm", "torch", "transformers", "triton", "llguidance", "openai", "flashinfer-python"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def make_document(*, device: dict[str, Any], config: dict[str, Any], workloads: list[dict[str, Any]],
                  limits: dict[str, float] | None = None, argv: Sequence[str] | None = None,
                  context_lost: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """Assemble the results document (see the module docstring)."""
    return {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["aiolm", "bench", *(sys.argv[1:] if argv is None else argv)]),
        "device": device,
        "versions": versions(),
        "config": config,
        "limits": limits or {},
        "workloads": workloads,
        "context_lost": context_lost or [],
    }


def _clean(value: Any) -> Any:
    # JSON has no NaN or infinity: write null (a figure that could not be computed).
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_json(document: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``document`` as strict JSON (non-finite figures become null)."""
    Path(path).write_text(json.dumps(_clean(document), indent=2, allow_nan=False) + "\n")


def _fmt(value: float | None, kind: str = "num") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "ratio":
        return f"{value:.2f}x"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def format_table(workloads: list[dict[str, Any]]) -> str:
    """One row per workload and variant: throughput, hit rates, and the headline ratio."""
    header = ("workload", "variant", "programs/s", "out tok/s", "calls", "hit rate", "vs optimal", "aiolm ratio")
    rows = [header]
    for w in workloads:
        for variant, f in w["runs"].items():
            ratio = w["ratios"].get(f"aiolm/{variant}")
            rows.append((
                w["name"], variant, _fmt(f.get("programs_per_s")), _fmt(f.get("output_tok_per_s")),
                _fmt(f.get("requests")), _fmt(f.get("cache_hit_rate"), "pct"),
                _fmt(f.get("hit_rate_vs_optimal"), "pct"), _fmt(ratio, "ratio"),
            ))
        for variant, message in w["errors"].items():
            # The first line: CUDA's errors go on with lines of advice (the JSON keeps them).
            first = message.splitlines()[0] if message else ""
            rows.append((w["name"], variant, "FAILED: " + first[:80], "", "", "", "", ""))
    widths = [max(len(r[i]) for r in rows if not r[2].startswith("FAILED")) for i in range(len(header))]
    lines = []
    for r in rows:
        if r[2].startswith("FAILED"):
            lines.append(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}")
        else:
            lines.append("  ".join(
                cell.ljust(widths[i]) if i < 2 else cell.rjust(widths[i]) for i, cell in enumerate(r)
            ))
    return "\n".join(lines)
