#!/usr/bin/env python3
"""Decode at batch 1 with an image in context, on one GPU: LLaVA-1.5-7B shape, dummy bf16.

``python benchmarks/gpu_multimodal.py --out mm.json`` (about a minute on an H200):

1. limits — device-to-device copy bandwidth (:func:`aiolm.bench.limits.measure_limits`);
2. decode-bs1 — ``aiolm.Engine`` streaming one request whose prompt is BOS, one synthetic
   672 x 504 picture (576 image tokens after LLaVA-1.5's resize to 336) and 40 text tokens,
   128 new tokens, best of three pictures (each new, so each run computes its image);
   tok/s over the whole request, time to first token (vision tower + prefill) and decode
   tok/s after the first token;
3. its fraction of the roofline: bandwidth / (the language model's weight bytes but the
   embedding table — the vision tower and projector run once per image, on the prefill
   path — plus the KV cache at the mean context).

``--dry-run`` runs the same plumbing on the CPU with ``tiny-llava`` and small counts.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def plan_for(dry_run: bool) -> dict[str, Any]:
    if dry_run:
        return {"model": "tiny-llava", "device": "cpu", "dtype": "float32", "text": 8,
                "new": 8, "image_size": (64, 48), "pictures": 2}
    return {"model": "llava-1.5-7b", "device": "cuda", "dtype": "bfloat16", "text": 40,
            "new": 128, "image_size": (672, 504), "pictures": 3}


async def decode_with_image(loaded: Any, plan: dict[str, Any]) -> dict[str, Any]:
    from aiolm.backends.base import GenerateRequest, SamplingParams
    from aiolm.backends.engine import Engine
    from aiolm.bench.image_qa import synthetic_image
    from aiolm.values import ImageData

    rng = random.Random(0)
    image_token = loaded.model.image_token_id
    vocab = min(loaded.model_config.vocab_size, image_token)

    def request(seed: int, new: int) -> GenerateRequest:
        picture, _shapes = synthetic_image(random.Random(seed), plan["image_size"])
        text = [rng.randrange(10, vocab) for _ in range(plan["text"])]
        return GenerateRequest(
            input_ids=(1, image_token, *text), images=(ImageData(data=picture),),
            sampling=SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True))

    runs = []
    async with Engine(loaded) as engine:
        await engine.generate(request(1000, 8))   # warm-up: the tower's and graphs' first use
        for k in range(plan["pictures"]):
            first = None
            count = 0
            t0 = time.perf_counter()
            async with engine.stream(request(k, plan["new"])) as chunks:
                async for chunk in chunks:
                    if chunk.token_ids and first is None:
                        first = time.perf_counter()
                    count += len(chunk.token_ids)
            t1 = time.perf_counter()
            runs.append({"new_tokens": count, "tok_s": count / (t1 - t0), "ttft_s": first - t0,
                         "decode_tok_s": (count - 1) / (t1 - first)})
        stats = engine.statistics()
    best = max(runs, key=lambda r: r["tok_s"])
    return dict(best, runs=runs, prompt_tokens=stats.prompt_tokens // (plan["pictures"] + 1))


def roofline(loaded: Any, limits: dict[str, Any], decode: dict[str, Any]) -> dict[str, Any]:
    from aiolm.bench.limits import weight_figures
    from aiolm.cache.pool import kv_bytes_per_token

    lm = loaded.model.language_model
    cfg = loaded.model_config
    weights = weight_figures(lm)["decode_weight_bytes"]   # all but an untied embedding table
    kv = kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.torch_dtype)
    mean_context = decode["prompt_tokens"] + decode["new_tokens"] / 2
    step_bytes = weights + mean_context * kv
    limit = limits["copy_bandwidth_gbps"] * 1e9 / step_bytes
    return {"language_model_weight_bytes": weights, "kv_bytes_per_token": kv,
            "mean_context": mean_context, "step_bytes": step_bytes, "roofline_tok_s": limit,
            "of_roofline": decode["tok_s"] / limit,
            "decode_only_of_roofline": decode["decode_tok_s"] / limit}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON results file")
    parser.add_argument("--dry-run", action="store_true", help="tiny-llava on the CPU")
    args = parser.parse_args(argv)
    import anyio
    import torch

    from aiolm.bench.limits import measure_limits
    from aiolm.bench.models import load_for_bench

    plan = plan_for(args.dry_run)
    if plan["device"] == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --dry-run")
    loaded = load_for_bench(plan["model"], load_format="dummy", device=plan["device"],
                            dtype=plan["dtype"], seed=0)
    limits = measure_limits(loaded.device, loaded.model_config.torch_dtype)
    decode = anyio.run(decode_with_image, loaded, plan)
    results = {"plan": plan, "device": torch.cuda.get_device_name() if plan["device"] == "cuda"
               else "cpu", "limits": limits, "decode_bs1_with_image": decode,
               "roofline": roofline(loaded, limits, decode)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps({"decode": {k: v for k, v in decode.items() if k != "runs"},
                      "roofline": results["roofline"]}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
