"""The Hugging Face transformers peer of the GPU suite (benchmarks/gpu_suite.py).

Same model config and the same random weights as aiolm's dummy model (copied tensor by
tensor, un-fusing q|k|v and gate|up), the same token counts (``min_new_tokens ==
max_new_tokens``, so nothing stops early):

- :func:`decode_bs1`: ``generate`` with a static cache at batch 1, eager or with
  transformers' own automatic ``torch.compile`` of the decode step (its default with a
  static cache on CUDA);
- :func:`static_batch`: left-padded static batches (batch 128 on the GPU); every request
  decodes as long as the batch's longest, and only the tokens each request asked for
  count as output;
- :func:`few_shot`: the few-shot workload call by call (no prefix reuse).

Each returns a dict of figures; timings synchronise the device around the timed region.
Usable on its own: ``python benchmarks/hf_peer.py --dry-run`` runs a tiny model on the CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["build", "decode_bs1", "few_shot", "static_batch"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(config: Mapping[str, Any], *, dtype: torch.dtype, device: torch.device,
          weights_from: torch.nn.Module | None = None) -> Any:
    """A transformers ``LlamaForCausalLM`` of ``config`` (a HF config dict) on ``device``.

    With ``weights_from`` (an aiolm Llama model of the same config) its tensors are copied
    in, so both peers run the same function; otherwise the weights stay as initialised.
    """
    import transformers

    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
            "rope_theta", "max_position_embeddings", "tie_word_embeddings", "hidden_act",
            "eos_token_id", "bos_token_id", "rope_scaling")
    cfg = transformers.LlamaConfig(**{k: config[k] for k in keys if k in config})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    model.to(device=device, dtype=dtype).eval()
    if weights_from is not None:
        copy_weights(weights_from, model)
    return model


@torch.no_grad()
def copy_weights(ours: torch.nn.Module, hf: Any) -> None:
    """Copy an aiolm Llama's parameters into a transformers Llama of the same shape."""
    theirs = dict(hf.named_parameters())
    for name, param in ours.named_parameters():
        module = ours.get_submodule(name.rpartition(".")[0])
        shards = getattr(module, "offsets", None)
        if shards is None:
            theirs[name].copy_(param)
            continue
        prefix = name.rpartition(".")[0].rpartition(".")[0]  # "...self_attn" / "...mlp"
        kind = name.rpartition(".")[2]
        for shard, (start, size) in shards.items():
            theirs[f"{prefix}.{shard}_proj.{kind}"].copy_(param.narrow(0, start, size))


def _generate(model: Any, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, *,
              compiled: bool, static: bool) -> torch.Tensor:
    options: dict[str, Any] = dict(
        attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, pad_token_id=0,
    )
    if static:
        options["cache_implementation"] = "static"
    if not compiled:
        options["disable_compile"] = True
    return model.generate(ids, **options)


def decode_bs1(model: Any, prompt: Sequence[int], new_tokens: int, *, compiled: bool,
               static: bool = True, repeats: int = 1) -> dict[str, Any]:
    """Batch-1 ``generate``: tokens/s over the whole call (prefill included), best of
    ``repeats`` after one warm-up call (which also compiles, when ``compiled``: at the
    same length, since the static cache's length is part of the compiled shapes)."""
    device = model.device
    ids = torch.tensor([list(prompt)], device=device)
    mask = torch.ones_like(ids)
    warm_up = new_tokens if compiled else min(new_tokens, 16)
    _generate(model, ids, mask, warm_up, compiled=compiled, static=static)
    _sync(device)
    best = float("inf")
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = _generate(model, ids, mask, new_tokens, compiled=compiled, static=static)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    generated = int(out.shape[1] - ids.shape[1])
    return {"tok_s": generated / best, "seconds": best, "new_tokens": generated,
            "prompt_tokens": len(prompt), "compiled": compiled, "static_cache": static,
            "tokens": out[0, ids.shape[1]:].tolist()}


def static_batch(model: Any, prompts: Sequence[Sequence[int]], outputs: Sequence[int], *,
                 batch_size: int) -> dict[str, Any]:
    """Left-padded static batches of ``batch_size``; each decodes its longest output.

    ``out_tok_s`` counts only the tokens each request asked for (``outputs``);
    ``padded_tok_s`` counts every generated token.
    """
    device = model.device
    useful = generated = 0
    elapsed = 0.0
    batches = 0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        outs = outputs[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.int64)
        mask = torch.zeros(len(chunk), width, dtype=torch.int64)
        for row, p in enumerate(chunk):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        new = max(outs)
        _sync(device)
        t0 = time.perf_counter()
        out = _generate(model, ids, mask, new, compiled=False, static=True)
        _sync(device)
        elapsed += time.perf_counter() - t0
        useful += sum(outs)
        generated += int(out.shape[1] - width) * len(chunk)
        batches += 1
    return {"out_tok_s": useful / elapsed, "padded_tok_s": generated / elapsed,
            "seconds": elapsed, "requests": len(prompts), "batches": batches,
            "batch_size": batch_size, "compiled": False, "static_cache": True}


def few_shot(model: Any, programs: Sequence[Sequence[int]]) -> dict[str, Any]:
    """One ``generate`` call (1 new token) per program, one after another."""
    device = model.device
    first = torch.tensor([list(programs[0])], device=device)
    _generate(model, first, torch.ones_like(first), 1, compiled=False, static=False)
    _sync(device)
    t0 = time.perf_counter()
    for prompt in programs:
        ids = torch.tensor([list(prompt)], device=device)
        _generate(model, ids, torch.ones_like(ids), 1, compiled=False, static=False)
    _sync(device)
    elapsed = time.perf_counter() - t0
    return {"programs_s": len(programs) / elapsed, "seconds": elapsed,
            "programs": len(programs)}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the three peer figures on a tiny random model (a smoke test of this module)."""
    import random

    from aiolm.engine.model_config import NAMED_CONFIGS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    name = "tiny-llama" if device.type == "cpu" else "llama-3-8b"
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = build(NAMED_CONFIGS[name], dtype=dtype, device=device)
    rnd = random.Random(0)
    vocab = NAMED_CONFIGS[name]["vocab_size"]
    prompt = [rnd.randrange(3, vocab) for _ in range(16)]
    results = {
        "decode_bs1": decode_bs1(model, prompt, 8, compiled=False),
        "static_batch": static_batch(model, [prompt, prompt[:5], prompt[:9]], [4, 2, 3],
                                     batch_size=2),
        "few_shot": few_shot(model, [prompt, prompt[:7]]),
    }
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "tokens"}
                      for k, v in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
