"""CPU benchmarks of the engine on the embedded SmolLM2-135M-Instruct, in one run.

1. Batch-1 decode speed: the engine vs ``transformers`` ``generate`` on the same GGUF file
   (same dtype, float32 by default; greedy; same prompt and number of tokens; decode rate =
   tokens after the first / time after the first token), in alternating runs so that the
   machine's load affects both alike. transformers runs the GGUF file two ways: dequantized
   into a dense model at load (the engine's weights and math) and, its default for GGUF
   files, with the weights kept in their quantized blocks.
2. Prefix sharing: ``--requests`` requests sharing a ~1k-token few-shot prefix, run
   concurrently as an aiolm program batch, with the radix cache on and off.

Usage::

    .venv/bin/python benchmarks/cpu_engine.py [--decode-tokens 128] [--requests 64]
        [--reps 5] [--threads N] [--dtype float32|bfloat16] [--skip-hf]
        [--hf dense|packed|both]
        [--only decode|prefix] [--json results.json]
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


async def engine_decode_once(eng: Engine, prompt: str, n: int) -> float:
    """Decode tokens/s of one greedy batch-1 request (after its first token)."""
    stamps: list[float] = []
    async with eng.stream(prompt, max_tokens=n, ignore_eos=True) as chunks:
        async for chunk in chunks:
            stamps.extend([time.perf_counter()] * len(chunk.token_ids))
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


class HFDecoder:
    """``transformers`` ``generate`` on the same GGUF file, greedy.

    ``packed``: transformers' default for a GGUF file (weights kept in their quantized
    blocks, its own kernels); otherwise dequantized at load into a dense model, the same
    weights and math as the engine's.
    """

    def __init__(self, path: str, prompt: str, dtype: str, packed: bool) -> None:
        import os

        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        directory, name = os.path.split(path)
        tok = AutoTokenizer.from_pretrained(directory, gguf_file=name, local_files_only=True)
        extra = {} if packed else {
            "quantization_config": GgufConfig(gguf_file=name, dequantize=True)}
        self.model = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=name, dtype=getattr(torch, dtype), local_files_only=True,
            **extra).eval()
        self.inputs = tok(prompt, return_tensors="pt", add_special_tokens=False)
        self.pad = tok.eos_token_id

    def decode_once(self, n: int) -> float:
        from transformers.generation.streamers import BaseStreamer

        class Stamps(BaseStreamer):
            def __init__(self) -> None:
                self.times: list[float] = []

            def put(self, value: Any) -> None:
                self.times.append(time.perf_counter())

            def end(self) -> None:
                pass

        streamer = Stamps()
        with torch.inference_mode():
            self.model.generate(**self.inputs, max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, pad_token_id=self.pad, streamer=streamer)
        stamps = streamer.times[1:]  # the first put() is the prompt
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])


async def decode_comparison(loaded: LoadedModel, path: str, prompt: str, n: int, reps: int,
                            hf_modes: list[str]) -> dict[str, Any]:
    """Alternate engine and transformers runs, so machine load hits them alike."""
    dtype = loaded.model_config.dtype
    peers = {mode: await anyio.to_thread.run_sync(HFDecoder, path, prompt, dtype,
                                                  mode == "packed")
             for mode in hf_modes}
    runs: dict[str, list[float]] = {"engine": [], **{f"transformers_{m}": [] for m in peers}}
    async with Engine(loaded) as eng:
        await engine_decode_once(eng, prompt, 8)  # warm-up
        for peer in peers.values():
            await anyio.to_thread.run_sync(peer.decode_once, 8)
        for _ in range(reps):
            runs["engine"].append(await engine_decode_once(eng, prompt, n))
            for mode, peer in peers.items():
                runs[f"transformers_{mode}"].append(
                    await anyio.to_thread.run_sync(peer.decode_once, n))
    out: dict[str, Any] = {"runs": runs}
    for name, values in runs.items():
        out[f"{name}_tok_per_s"] = statistics.median(values)
    for mode in peers:
        out[f"ratio_vs_{mode}"] = out["engine_tok_per_s"] / out[f"transformers_{mode}_tok_per_s"]
    return out


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
    loaded = await anyio.to_thread.run_sync(lambda: LoadedModel.load(dtype=args.dtype))
    prompt = ("<|im_start|>user\nWrite a long story about a dragon who learns to paint."
              "<|im_end|>\n<|im_start|>assistant\n")
    results: dict[str, Any] = {"threads": torch.get_num_threads(),
                               "dtype": loaded.model_config.dtype,
                               "decode_tokens": args.decode_tokens}
    if args.only in (None, "decode"):
        await decode_part(loaded, path, prompt, args, results)
    if args.only in (None, "prefix"):
        await prefix_part(loaded, args, results)
    return results


async def decode_part(loaded: LoadedModel, path: str, prompt: str, args: argparse.Namespace,
                      results: dict[str, Any]) -> None:
    modes = [] if args.skip_hf else ["dense", "packed"] if args.hf == "both" else [args.hf]
    decode = await decode_comparison(loaded, path, prompt, args.decode_tokens, args.reps, modes)
    results["decode"] = decode
    print(f"engine decode (batch 1, {loaded.model_config.dtype}): "
          f"{decode['engine_tok_per_s']:.1f} tok/s")
    for mode in modes:
        print(f"transformers generate ({mode} GGUF weights): "
              f"{decode[f'transformers_{mode}_tok_per_s']:.1f} tok/s -> engine / transformers = "
              f"{decode[f'ratio_vs_{mode}']:.2f}x (medians of {args.reps} alternating runs)")


async def prefix_part(loaded: LoadedModel, args: argparse.Namespace,
                      results: dict[str, Any]) -> None:
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5, help="alternating decode runs")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", default="auto",
                        help="weights of both systems (auto: float32 on the CPU)")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--hf", choices=["dense", "packed", "both"], default="both",
                        help="transformers with the GGUF dequantized (dense) or kept packed")
    parser.add_argument("--only", choices=["decode", "prefix"], default=None)
    parser.add_argument("--json", default=None, help="write the results here")
    ns = parser.parse_args()
    if ns.threads:
        torch.set_num_threads(ns.threads)
    out = anyio.run(main, ns)
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(out, f, indent=2)
