"""Plots and tables of the committed benchmark results (``docs/benchmarks/*.json``).

For every results file ``NAME.json`` this writes ``NAME.png``: per workload, the headline
figure of each variant (aiolm, each ablation, transformers) normalized to aiolm's (aiolm is
1.0; below 1 is slower, or more API calls for api-spec), in the style of the paper's
figures, titled with the device kind. With ``--markdown`` it prints the tables and goal
lines that docs/benchmarks.md shows.

    .venv/bin/python scripts/plot_benchmarks.py [--dir docs/benchmarks] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from aiolm.bench.goals import check_goals, format_goals

VARIANT_COLORS = {
    "aiolm": "#1f77b4", "radix-off": "#ff7f0e", "fcfs": "#2ca02c",
    "jump-forward-off": "#d62728", "spec-off": "#9467bd", "hf": "#7f7f7f",
}
VARIANT_LABELS = {
    "aiolm": "aiolm", "radix-off": "aiolm, radix cache off", "fcfs": "aiolm, fcfs schedule",
    "jump-forward-off": "aiolm, jump-forward off", "spec-off": "aiolm, speculation off",
    "hf": "transformers generate",
}


def normalized(record: dict[str, Any]) -> dict[str, float]:
    """Each variant's headline relative to aiolm's (1.0), oriented so higher is better."""
    out = {"aiolm": 1.0} if "aiolm" in record["runs"] else {}
    for key, ratio in record["ratios"].items():
        if ratio:
            out[key.removeprefix("aiolm/")] = 1.0 / ratio
    return out


def device_title(doc: dict[str, Any]) -> str:
    device = doc["device"]
    model = doc["config"]["backend"].get("model", doc["config"]["backend"].get("kind"))
    return f"{device['kind']}: {device['name']} — {model}, size {doc['config']['size']}"


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in doc["workloads"] if r["runs"]]
    variants = [v for v in VARIANT_COLORS if any(v in normalized(r) for r in records)]
    width = 0.8 / max(len(variants), 1)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.3 * len(records)), 4.5))
    for i, variant in enumerate(variants):
        xs, ys = [], []
        for j, record in enumerate(records):
            value = normalized(record).get(variant)
            if value is not None and math.isfinite(value):
                xs.append(j + (i - (len(variants) - 1) / 2) * width)
                ys.append(value)
        ax.bar(xs, ys, width, label=VARIANT_LABELS[variant], color=VARIANT_COLORS[variant])
    ax.set_xticks(range(len(records)))
    ax.set_xticklabels([r["name"] for r in records], rotation=20, ha="right")
    ax.axhline(1.0, color="black", linewidth=0.6)
    ax.set_ylabel("normalized throughput (aiolm = 1)")
    ax.set_title(device_title(doc), fontsize=9)
    ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value: Any, kind: str = "num") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "x":
        return f"{value:.2f}×"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        f"Device: **{doc['device']['kind']}** ({doc['device']['name']}); model "
        f"{doc['config']['backend'].get('model')}; size `{doc['config']['size']}`; "
        f"command `{doc['command']}`; {doc['created']}.",
        "",
        "| workload | variant | programs/s | output tok/s | calls | cache hit rate | vs DFS-optimal "
        "| aiolm ÷ variant |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for record in doc["workloads"]:
        for variant, f in record["runs"].items():
            ratio = record["ratios"].get(f"aiolm/{variant}")
            lines.append(
                f"| {record['name']} | {variant} | {_fmt(f.get('programs_per_s'))} | "
                f"{_fmt(f.get('output_tok_per_s'))} | {_fmt(f.get('requests'))} | "
                f"{_fmt(f.get('cache_hit_rate'), 'pct')} | {_fmt(f.get('hit_rate_vs_optimal'), 'pct')} | "
                f"{_fmt(ratio, 'x') if variant != 'aiolm' else ''} |")
        for variant, message in record["errors"].items():
            lines.append(f"| {record['name']} | {variant} | failed: {message} | | | | | |")
    lines += ["", "```", format_goals(check_goals(doc)), "```"]
    return "\n".join(lines)


def from_gpu_suite(doc: dict[str, Any]) -> dict[str, Any]:
    """The GPU suite's results (benchmarks/gpu_suite.py) as an aiolm-bench document.

    Its figures are per attention backend; the page shows the one the suite picked for
    ``"auto"`` (else the first), with the peer and the radix-off ablation where measured.
    """
    env = doc["sections"]["environment"]["result"]
    chosen = doc["sections"].get("aiolm", {}).get("result", {}).get("auto_choice")
    figures = [f for f in doc["figures"] if f.get("backend") == (chosen or doc["figures"][0]["backend"])]
    records = []
    for f in figures:
        headline = {"tok/s": "output_tok_per_s", "out tok/s": "output_tok_per_s",
                    "programs/s": "programs_per_s"}.get(f["unit"])
        if headline is None or f.get("aiolm") is None:
            continue  # FLOP/s figures have no variants to compare
        runs = {"aiolm": {headline: f["aiolm"]}}
        ratios = {}
        if f.get("peer"):
            runs["hf"] = {headline: f["peer"]}
            ratios["aiolm/hf"] = f["aiolm"] / f["peer"]
        if f.get("radix_off"):
            runs["radix-off"] = {headline: f["radix_off"]}
            ratios["aiolm/radix-off"] = f["aiolm"] / f["radix_off"]
        records.append({"name": f["figure"], "runs": runs, "ratios": ratios, "errors": {},
                        "headline": headline})
    return {
        "format": "gpu-suite", "device": {"kind": "cuda", "name": env["device"]},
        "config": {"backend": {"model": doc["plan"]["model"] + " (dummy weights)"},
                   "size": f"GPU suite, {chosen or 'first'} attention backend"},
        "command": "python benchmarks/gpu_suite.py", "created": doc.get("started", ""),
        "workloads": records,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="docs/benchmarks", help="where the results JSON files are")
    parser.add_argument("--markdown", action="store_true", help="print the tables and goals")
    args = parser.parse_args()
    files = sorted(Path(args.dir).glob("*.json"))
    if not files:
        parser.error(f"no results (*.json) in {args.dir}")
    for path in files:
        doc = json.loads(path.read_text())
        if doc.get("suite") == "gpu" and "figures" in doc:
            doc = from_gpu_suite(doc)
        elif doc.get("format") != "aiolm-bench/1":
            print(f"skipped {path}: not a results document")
            continue
        plot(doc, path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.png')}")
        if args.markdown:
            print(f"\n### {path.name}\n\n{markdown(doc)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
