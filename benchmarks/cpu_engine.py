"""CPU benchmarks of the engine on the embedded SmolLM2-135M-Instruct, in one run.

1. Batch-1 decode speed: the engine vs ``transformers`` ``generate`` on the same GGUF file
   (both float32, greedy, same prompt, same number of tokens; decode rate = tokens after the
   first / time after the first token).
2. Prefix sharing: ``--requests`` requests sharing a ~1k-token few-shot prefix, run
   concurrently as an aiolm program batch, with the radix cache on and off.

Usage::

    .venv/bin/python benchmarks/cpu_engine.py [--decode-tokens 128] [--requests 64]
        [--threads N] [--skip-hf] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import anyio
import torch

from aiolm import gen, program
from aiolm.backends.engine import Engine, LoadedModel
from aiolm.engine.default_model import default_model_path

CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Germany", "Berlin"), ("Portugal", "Lisbon"), ("Greece", "Athens"), ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"), ("Cuba", "Havana"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"),
    ("Austria", "Vienna"), ("Hungary", "Budapest"), ("Ireland", "Dublin"),
    ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"), ("Switzerland", "Bern"),
    ("Russia", "Moscow"), ("China", "Beijing"), ("India", "New Delhi"), ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"), ("Australia", "Canberra"),
    ("Argentina", "Buenos Aires"), ("Brazil", "Brasilia"), ("Colombia", "Bogota"),
    ("Nigeria", "Abuja"), ("Ghana", "Accra"), ("Morocco", "Rabat"), ("Turkey", "Ankara"),
    ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Israel", "Jerusalem"), ("Jordan", "Amman"),
    ("Ukraine", "Kyiv"), ("Romania", "Bucharest"), ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"),
    ("Croatia", "Zagreb"), ("Czechia", "Prague"), ("Slovakia", "Bratislava"),
    ("Iceland", "Reykjavik"), ("Estonia", "Tallinn"), ("Latvia", "Riga"),
    ("Lithuania", "Vilnius"), ("Philippines", "Manila"), ("Malaysia", "Kuala Lumpur"),
    ("Pakistan", "Islamabad"), ("Nepal", "Kathmandu"), ("Mongolia", "Ulaanbaatar"),
    ("Ethiopia", "Addis Ababa"), ("Tanzania", "Dodoma"), ("Senegal", "Dakar"),
    ("Venezuela", "Caracas"), ("Ecuador", "Quito"), ("Bolivia", "Sucre"),
    ("Uruguay", "Montevideo"), ("Paraguay", "Asuncion"), ("New Zealand", "Wellington"),
]


def few_shot_prefix(tokenizer: Any, target_tokens: int = 1000) -> str:
    """Q/A examples about capitals, as many as fit in about ``target_tokens`` tokens."""
    text = "Answer each question with the name of the city only.\n\n"
    for country, city in CAPITALS * 4:
        line = f"Q: What is the capital of {country}?\nA: {city}\n\n"
        if len(tokenizer.encode(text + line)) > target_tokens:
            break
        text += line
    return text


@program
async def capital_question(s, prefix: str, country: str):
    s += prefix + f"Q: Which city is the capital of {country}?\nA:"
    s += gen("answer", max_tokens=16, stop="\n", temperature=0.0)


async def engine_decode_rate(loaded: LoadedModel, prompt: str, n: int) -> dict[str, float]:
    async with Engine(loaded) as eng:
        await eng.generate(prompt, max_tokens=8, ignore_eos=True)  # warm-up
        rates = []
        for _ in range(3):
            stamps = []
            async with eng.stream(prompt, max_tokens=n, ignore_eos=True) as chunks:
                async for chunk in chunks:
                    stamps.extend([time.perf_counter()] * len(chunk.token_ids))
            rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return {"tok_per_s": statistics.median(rates), "runs": rates}


def hf_decode_rate(path: str, prompt: str, n: int) -> dict[str, float]:
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    directory, name = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32,
                                                 local_files_only=True).eval()

    class Stamps(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: Any) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    kwargs = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False,
              "pad_token_id": tok.eos_token_id}
    with torch.inference_mode():
        model.generate(**ids, **{**kwargs, "max_new_tokens": 8, "min_new_tokens": 8})
        rates = []
        for _ in range(3):
            streamer = Stamps()
            model.generate(**ids, **kwargs, streamer=streamer)
            stamps = streamer.times[1:]  # the first put() is the prompt
            rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return {"tok_per_s": statistics.median(rates), "runs": rates}


async def shared_prefix_run(loaded: LoadedModel, prefix: str, requests: int,
                            radix: bool) -> dict[str, Any]:
    countries = [c for c, _ in CAPITALS][:requests]
    countries += [c for c, _ in CAPITALS] * (requests // len(CAPITALS) + 1)
    args = [{"prefix": prefix, "country": c} for c in countries[:requests]]
    async with Engine(loaded, enable_radix_cache=radix) as eng:
        start = time.perf_counter()
        states = await capital_question.run_batch(args, backend=eng, max_concurrency=requests,
                                                  raise_errors=True)
        elapsed = time.perf_counter() - start
        stats = eng.statistics()
    return {
        "radix_cache": radix, "requests": requests, "seconds": elapsed,
        "requests_per_s": requests / elapsed, "cache_hit_rate": stats.cache_hit_rate,
        "prompt_tokens": stats.prompt_tokens, "cached_tokens": stats.cached_tokens,
        "forward_passes": stats.forward_passes,
        "answers": [s["answer"] for s in states],
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    path = default_model_path()
    loaded = await anyio.to_thread.run_sync(LoadedModel.load)
    prompt = ("<|im_start|>user\nWrite a long story about a dragon who learns to paint."
              "<|im_end|>\n<|im_start|>assistant\n")
    results: dict[str, Any] = {"threads": torch.get_num_threads(),
                               "decode_tokens": args.decode_tokens}
    engine_rate = await engine_decode_rate(loaded, prompt, args.decode_tokens)
    results["engine_decode"] = engine_rate
    print(f"engine decode (batch 1): {engine_rate['tok_per_s']:.1f} tok/s")
    if not args.skip_hf:
        hf_rate = await anyio.to_thread.run_sync(hf_decode_rate, path, prompt, args.decode_tokens)
        results["transformers_decode"] = hf_rate
        ratio = engine_rate["tok_per_s"] / hf_rate["tok_per_s"]
        results["decode_ratio"] = ratio
        print(f"transformers generate (batch 1): {hf_rate['tok_per_s']:.1f} tok/s "
              f"-> engine / transformers = {ratio:.2f}x")

    prefix = few_shot_prefix(loaded.tokenizer)
    results["prefix_tokens"] = len(loaded.tokenizer.encode(prefix))
    on = await shared_prefix_run(loaded, prefix, args.requests, radix=True)
    off = await shared_prefix_run(loaded, prefix, args.requests, radix=False)
    same = sum(a == b for a, b in zip(on["answers"], off["answers"], strict=True))
    results["shared_prefix"] = {"on": on, "off": off, "speedup": off["seconds"] / on["seconds"],
                                "identical_answers": same}
    print(f"{args.requests} requests sharing a {results['prefix_tokens']}-token prefix: "
          f"radix on {on['seconds']:.1f} s (hit rate {on['cache_hit_rate']:.2f}), "
          f"off {off['seconds']:.1f} s -> {off['seconds'] / on['seconds']:.1f}x; "
          f"{same}/{args.requests} answers identical")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--json", default=None, help="write the results here")
    ns = parser.parse_args()
    if ns.threads:
        torch.set_num_threads(ns.threads)
    out = anyio.run(main, ns)
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(out, f, indent=2)
