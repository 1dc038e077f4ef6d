"""CPU benchmarks of the engine on the embedded SmolLM2-135M-Instruct, in one run.

1. Decode at batch 1, 8 and 32 and prefill, each beside its floor measured in the same run:
   the weight-read floor (one matrix-vector product over as many weights as the model has,
   in the kind the engine computes with: the float dtype, or torch's int8 / int4
   weight-only CPU kernels when the engine quantizes), B times that for batch B, capped by
   the matmul floor (a large matrix product over the same weights), which also bounds
   prefill. Peers in alternating runs, so the machine's load hits them alike:
   ``transformers`` ``generate`` on the same GGUF file (greedy, same prompt and token
   counts; dequantized into a dense model, and kept packed, its default for GGUF), and
   llama.cpp (``llama_cpp``, optional: skipped when it does not import) on the same file.
   Decode rate = tokens after the first / time after the first token; at batch B, the
   tokens made while all B requests decode together / that time.
2. Prefix sharing: ``--requests`` requests sharing a ~1k-token few-shot prefix, run
   concurrently as an aiolm program batch, with the radix cache on and off.

Usage::

    .venv/bin/python benchmarks/cpu_engine.py [--decode-tokens 128] [--requests 64]
        [--reps 3] [--threads N] [--dtype float32|bfloat16] [--quantization auto|int8|int4|none]
        [--compile] [--batch-sizes 1,8,32] [--prefill-tokens 1024] [--skip-hf]
        [--hf dense|packed|both] [--only decode|prefix] [--json results.json]
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


def _best_seconds(fn: Any, reps: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def weight_kind(model: torch.nn.Module) -> str:
    """The weights the engine computes with: ``"int4"``, ``"int8"`` or the float dtype."""
    names = {type(m).__name__ for m in model.modules()}
    if "Int4Linear" in names:
        return "int4"
    if "Int8Linear" in names:
        return "int8"
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def floors(num_params: int, hidden: int, kind: str) -> dict[str, float]:
    """Tokens/s floors of this machine for a model of ``num_params`` weights, measured now.

    ``read``: one matrix-vector product over ``num_params`` weights of ``kind`` (a decode
    step at batch 1 reads every weight once); ``matmul``: a product of 512 rows over them
    (2 flops per weight per token), the compute bound of prefill and large batches.
    """
    rows = num_params // hidden
    # The quantized kernels run with bfloat16 activations, scales and zeros, as the
    # engine's Int8Linear / Int4Linear call them (their float32 paths are 10-40x slower).
    with torch.inference_mode():
        if kind == "int8":
            w = torch.randint(-127, 127, (rows, hidden), dtype=torch.int8)
            scales = torch.rand(rows, dtype=torch.bfloat16)
            def mm(x: torch.Tensor) -> torch.Tensor:
                return torch._weight_int8pack_mm(x, w, scales)
            dtype = torch.bfloat16
        elif kind == "int4":
            hidden -= hidden % 32
            rows -= rows % 16          # the packing takes rows in multiples of 16
            codes = torch.randint(0, 16, (rows, hidden), dtype=torch.int32)
            packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
            sz = torch.rand(hidden // 32, rows, 2, dtype=torch.bfloat16)
            def mm(x: torch.Tensor) -> torch.Tensor:
                return torch._weight_int4pack_mm_for_cpu(x, packed, 32, sz)
            dtype = torch.bfloat16
        else:
            dtype = getattr(torch, kind)
            w = torch.randn(rows, hidden, dtype=dtype)
            def mm(x: torch.Tensor) -> torch.Tensor:
                return x @ w.T
        one = torch.randn(1, hidden, dtype=dtype)
        many = torch.randn(512, hidden, dtype=dtype)
        read = _best_seconds(lambda: mm(one))
        matmul = _best_seconds(lambda: mm(many), reps=2)
    return {"kind": kind, "read_tok_per_s": 1 / read, "matmul_tok_per_s": 512 / matmul}


def floor_for(fl: dict[str, float], batch: int) -> float:
    """Decode floor at ``batch``: every step reads the weights once, within the matmul rate."""
    return min(batch * fl["read_tok_per_s"], fl["matmul_tok_per_s"])


def decode_rate(stamps: list[list[float]]) -> float:
    """Tokens/s while every request decodes: from the last first token to the first end."""
    start = max(s[0] for s in stamps)
    end = min(s[-1] for s in stamps)
    made = sum(sum(1 for t in s if start < t <= end) for s in stamps)
    return made / (end - start)


async def engine_decode_once(eng: Engine, prompts: list[str], n: int) -> float:
    """Decode tokens/s of ``len(prompts)`` greedy requests decoding together."""
    stamps: list[list[float]] = [[] for _ in prompts]

    async def one(i: int) -> None:
        async with eng.stream(prompts[i], max_tokens=n, ignore_eos=True) as chunks:
            async for chunk in chunks:
                stamps[i].extend([time.perf_counter()] * len(chunk.token_ids))

    async with anyio.create_task_group() as tg:
        for i in range(len(prompts)):
            tg.start_soon(one, i)
    return decode_rate(stamps)


async def engine_prefill_once(eng: Engine, ids: list[int]) -> float:
    """Prompt tokens/s of one request of ``ids`` (radix cache off: nothing is reused)."""
    start = time.perf_counter()
    await eng.generate(input_ids=ids, max_tokens=1)
    return len(ids) / (time.perf_counter() - start)


class _Stamps:
    """A ``transformers`` streamer that records when each step's tokens arrive."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class HFDecoder:
    """``transformers`` ``generate`` on the same GGUF file, greedy.

    ``packed``: transformers' default for a GGUF file (weights kept in their quantized
    blocks, its own kernels); otherwise dequantized at load into a dense model, the same
    weights and math as the engine's float path.
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

    def decode_once(self, n: int, batch: int = 1) -> float:
        from transformers.generation.streamers import BaseStreamer

        class Stamps(_Stamps, BaseStreamer):
            pass

        streamer = Stamps()
        inputs = {k: v.repeat(batch, 1) for k, v in self.inputs.items()}
        with torch.inference_mode():
            self.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, pad_token_id=self.pad, streamer=streamer)
        stamps = streamer.times[1:]  # the first put() is the prompt
        return batch * (len(stamps) - 1) / (stamps[-1] - stamps[0])

    def prefill_once(self, ids: list[int]) -> float:
        x = torch.tensor([ids])
        start = time.perf_counter()
        with torch.inference_mode():
            self.model(input_ids=x, use_cache=True, logits_to_keep=1)
        return len(ids) / (time.perf_counter() - start)


class LlamaCppDecoder:
    """llama.cpp (``llama_cpp``) on the same GGUF file, greedy, end of text banned."""

    def __init__(self, path: str, prompt: str, threads: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=path, n_ctx=4096, n_threads=threads,
                                   n_threads_batch=threads, n_batch=2048, verbose=False)
        self.prompt = prompt
        self.ban = {self.llm.token_eos(): float("-inf")}

    def decode_once(self, n: int) -> float:
        self.llm.reset()
        stamps: list[float] = []
        for _ in self.llm.create_completion(self.prompt, max_tokens=n, temperature=0.0,
                                            logit_bias=self.ban, stream=True):
            stamps.append(time.perf_counter())
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    def prefill_once(self, ids: list[int]) -> float:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(ids)
        return len(ids) / (time.perf_counter() - start)


def _load_peers(path: str, prompt: str, dtype: str, hf_modes: list[str],
                threads: int) -> dict[str, Any]:
    peers: dict[str, Any] = {f"transformers_{m}": HFDecoder(path, prompt, dtype, m == "packed")
                             for m in hf_modes}
    try:
        peers["llama_cpp"] = LlamaCppDecoder(path, prompt, threads)
    except ImportError:
        print("llama.cpp: llama_cpp does not import; skipped")
    return peers


async def decode_comparison(loaded: LoadedModel, path: str, prompt: str,
                            args: argparse.Namespace, hf_modes: list[str]) -> dict[str, Any]:
    """Alternate engine and peer runs of each workload, so machine load hits them alike."""
    dtype = loaded.model_config.dtype
    threads = args.threads or torch.get_num_threads()
    peers = await anyio.to_thread.run_sync(_load_peers, path, prompt, dtype, hf_modes, threads)
    tok = loaded.tokenizer
    long_ids = (tok.encode(few_shot_prefix(tok, args.prefill_tokens)) * 2)[:args.prefill_tokens]
    n = args.decode_tokens
    workloads = [f"decode_bs{b}" for b in args.batch_sizes] + ["prefill"]
    runs: dict[str, dict[str, list[float]]] = {w: {"engine": []} for w in workloads}
    opts = {"num_threads": args.threads, "compile": args.compile}
    async with Engine(loaded, enable_radix_cache=False, **opts) as eng:
        await engine_decode_once(eng, [prompt], 8)  # warm-up
        for _ in range(args.reps):
            for b in args.batch_sizes:
                # Distinct prompts of one length: no request shares another's K/V.
                prompts = [f"{i:03d} {prompt}" for i in range(b)]
                runs[f"decode_bs{b}"]["engine"].append(await engine_decode_once(eng, prompts, n))
                for name, peer in peers.items():
                    if name == "llama_cpp" and b > 1:
                        continue  # llama-cpp-python decodes one sequence per Llama
                    rate = await anyio.to_thread.run_sync(
                        lambda p=peer, b=b: p.decode_once(n, b) if b > 1 else p.decode_once(n))
                    runs[f"decode_bs{b}"].setdefault(name, []).append(rate)
            runs["prefill"]["engine"].append(await engine_prefill_once(eng, long_ids))
            for name, peer in peers.items():
                runs["prefill"].setdefault(name, []).append(
                    await anyio.to_thread.run_sync(peer.prefill_once, long_ids))
    fl = floors(weight_count(loaded.model), loaded.model_config.hidden_size,
                weight_kind(loaded.model))
    out: dict[str, Any] = {"floors": fl, "runs": runs, "prefill_tokens": len(long_ids)}
    for w, by_system in runs.items():
        floor = fl["matmul_tok_per_s"] if w == "prefill" else floor_for(
            fl, int(w.removeprefix("decode_bs")))
        row: dict[str, Any] = {"floor_tok_per_s": floor}
        for name, values in by_system.items():
            med = statistics.median(values)
            row[f"{name}_tok_per_s"] = med
            row[f"{name}_of_floor"] = med / floor
            if name != "engine":
                row[f"engine_vs_{name}"] = statistics.median(runs[w]["engine"]) / med
        out[w] = row
    return out


def weight_count(model: torch.nn.Module) -> int:
    """The weights one decode step reads: float parameters plus quantized layers' weights."""
    count = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if type(m).__name__ in ("Int8Linear", "Int4Linear"):
            count += m.in_features * m.out_features
    return count


async def decode_part(loaded: LoadedModel, path: str, prompt: str, args: argparse.Namespace,
                      results: dict[str, Any]) -> None:
    modes = [] if args.skip_hf else ["dense", "packed"] if args.hf == "both" else [args.hf]
    decode = await decode_comparison(loaded, path, prompt, args, modes)
    results["decode"] = decode
    fl = decode["floors"]
    print(f"floors ({fl['kind']} weights): read {fl['read_tok_per_s']:.1f} tok/s, "
          f"matmul {fl['matmul_tok_per_s']:.0f} tok/s")
    systems = ["engine", *[k.removesuffix("_tok_per_s") for k in decode["prefill"]
                           if k.endswith("_tok_per_s") and k not in
                           ("engine_tok_per_s", "floor_tok_per_s")]]
    print(f"{'workload':<12}" + "".join(f"{s:>26}" for s in systems)
          + f"   (tok/s, fraction of floor; medians of {args.reps} alternating runs)")
    for w in [f"decode_bs{b}" for b in args.batch_sizes] + ["prefill"]:
        row = decode[w]
        cells = "".join(
            f"{row[f'{s}_tok_per_s']:>17.1f} ({row[f'{s}_of_floor']:.2f})"
            if f"{s}_tok_per_s" in row else f"{'-':>26}" for s in systems)
        print(f"{w:<12}{cells}")


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
    quantization = None if args.quantization == "none" else args.quantization
    loaded = await anyio.to_thread.run_sync(lambda: LoadedModel.load(
        dtype=args.dtype, quantization=quantization))
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
    parser.add_argument("--reps", type=int, default=3, help="alternating runs")
    parser.add_argument("--threads", type=int, default=None,
                        help="the engine's num_threads, and the peers' threads")
    parser.add_argument("--quantization", choices=["auto", "int8", "int4", "none"],
                        default="auto", help="the engine's weights (none: the float weights)")
    parser.add_argument("--compile", action="store_true", help="Engine(compile=True)")
    parser.add_argument("--batch-sizes", type=lambda v: [int(b) for b in v.split(",")],
                        default=[1, 8, 32])
    parser.add_argument("--prefill-tokens", type=int, default=1024)
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
