#!/usr/bin/env python3
"""The vision tower over a pass's pictures: one call per picture against one call for all.

``python benchmarks/vision_batching.py --model tiny-qwen2.5-vl --pictures 8 --out v.json``

Loads the named config with dummy weights (``--device``: ``cuda`` when there is one, else
the CPU), makes ``--pictures`` synthetic pictures of ``--size`` (the image-qa workload's
672 x 504 by default) through the model's own processor, then times, alternating, ``--runs``
times each: ``embed_multimodal`` picture by picture (what the engine did before it batched
a pass's pictures) and one ``embed_multimodal_many`` over all (what it does now). CUDA:
events around each side, after a warm-up of both. Reports milliseconds a picture (best
and median) and the ratio; checks that both sides give the same rows.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def make_items(loaded: Any, pictures: int, size: tuple[int, int]) -> list[Any]:
    from aiolm.bench.image_qa import synthetic_image
    from aiolm.engine.multimodal import build_processor, prepare_multimodal
    from aiolm.values import ImageData

    processor = build_processor(loaded)
    model = loaded.model
    items = []
    for k in range(pictures):
        picture, _ = synthetic_image(random.Random(k), size)
        _, mm = prepare_multimodal(model, processor, [1, model.image_token_id, 10],
                                   [ImageData(data=picture)],
                                   vocab_size=loaded.model_config.vocab_size)
        items.extend(mm.items)
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-qwen2.5-vl", help="a named multimodal config")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--pictures", type=int, default=8)
    parser.add_argument("--size", type=int, nargs=2, default=(672, 504), metavar=("W", "H"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True, help="the JSON results file")
    args = parser.parse_args(argv)
    import torch

    from aiolm.bench.limits import median_seconds
    from aiolm.bench.models import load_for_bench

    loaded = load_for_bench(args.model, load_format="dummy", device=args.device, seed=0)
    model, device = loaded.model, loaded.device
    items = make_items(loaded, args.pictures, tuple(args.size))
    one_by_one = [model.embed_multimodal(item) for item in items]       # warm-up, both sides
    together = model.embed_multimodal_many(items)
    for a, b in zip(one_by_one, together, strict=True):
        torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-2)
    single, batched = [], []
    for _ in range(args.runs):   # alternating, one timed run of each side at a time
        single.append(median_seconds(lambda: [model.embed_multimodal(it) for it in items],
                                     device, warmup=0, repeats=1))
        batched.append(median_seconds(lambda: model.embed_multimodal_many(items), device,
                                      warmup=0, repeats=1))
    n = len(items)
    results = {
        "model": args.model, "device": str(device),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": str(loaded.model_config.torch_dtype), "pictures": n, "size": list(args.size),
        "rows_per_picture": [int(t.shape[0]) for t in together],
        "one_call_each_ms_per_picture": {"best": 1e3 * min(single) / n,
                                         "median": 1e3 * statistics.median(single) / n},
        "one_call_for_all_ms_per_picture": {"best": 1e3 * min(batched) / n,
                                            "median": 1e3 * statistics.median(batched) / n},
        "speedup_median": statistics.median(single) / statistics.median(batched),
        "runs_s": {"one_call_each": single, "one_call_for_all": batched},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "runs_s"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
