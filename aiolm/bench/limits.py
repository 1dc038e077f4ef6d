"""Physical limits measured in the same run, and the roofline fractions they give.

- Copy bandwidth (bytes read + written per second, a device-to-device copy): decode at
  batch 1 reads every weight once per token, so it cannot beat
  ``bandwidth / weight bytes`` tokens per second.
- Matmul rate (a large square matmul in the model's dtype): prefill and large batches
  cost about ``2 × parameters`` FLOPs per token, so they cannot beat
  ``matmul rate / (2 × parameters)`` tokens per second.

Mixture-of-Experts models count only what a step uses: a token runs ``top_k`` of the ``E``
experts of each sparse layer (``active_parameters`` = the dense weights + ``top_k / E`` of
the expert weights), and a decode step of ``B`` tokens reads the experts any of them chose.
Under uniform routing (each token ``top_k`` distinct experts) an expert is left untouched
by all ``B`` tokens with probability ``(1 - top_k / E) ** B``, so the step reads
``E × (1 - (1 - top_k / E) ** B)`` experts per layer on average (``top_k`` at batch 1):
``decode_weight_bytes`` = the dense weights (attention, norms, head, dense MLPs) + that
fraction of the expert weights.

Every model's ``decode_weight_bytes`` leaves out an embedding table that is not also the LM
head: a decode step reads one row of it. (The GPU suite, ``benchmarks/gpu_suite.py``, counts
the same bytes and adds the KV cache read at the mean context, a few tenths of a percent at
its lengths; both time the copy with CUDA events on a GPU.)
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["add_roofline_figures", "expected_experts_touched", "measure_limits",
           "median_seconds", "weight_figures"]


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn: Any, device: Any, repeats: int) -> float:
    fn()  # warm-up (allocation, kernel selection)
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def median_seconds(fn: Any, device: Any, warmup: int = 3, repeats: int = 20) -> float:
    """The median time of ``fn`` over ``repeats`` runs after ``warmup``: on a GPU its device
    time between CUDA events (no launch or sync overhead in it: a wall clock around a 1 ms
    copy adds several percent), elsewhere the wall clock."""
    import statistics

    import torch

    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_limits(device: Any, dtype: Any) -> dict[str, float]:
    """``copy_bandwidth_gbps`` (GB/s, read + written) and ``matmul_tflops`` on ``device``."""
    import torch

    device = torch.device(device)
    on_gpu = device.type == "cuda"
    numel = (1 << 29) if on_gpu else (1 << 26)            # 2 GiB / 256 MiB of float32
    src = torch.empty(numel, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    if on_gpu:
        copy_s = median_seconds(lambda: dst.copy_(src), device)
    else:
        copy_s = _best_seconds(lambda: dst.copy_(src), device, repeats=3)
    copied = 2 * src.numel() * src.element_size()   # read + written
    n = 8192 if on_gpu else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    runs = 10 if on_gpu else 1

    def matmuls() -> None:
        for _ in range(runs):
            torch.matmul(a, b)

    matmul_s = _best_seconds(matmuls, device, repeats=3)
    return {
        "copy_bandwidth_gbps": copied / copy_s / 1e9,
        "matmul_tflops": runs * 2 * n**3 / matmul_s / 1e12,
        "matmul_dtype": str(dtype).removeprefix("torch."),
    }


def expected_experts_touched(num_experts: int, top_k: int, batch_size: int) -> float:
    """Experts of one layer that ``batch_size`` tokens use, on average, when each picks
    ``top_k`` distinct experts uniformly: ``E × (1 - (1 - top_k / E) ** B)``."""
    if not 1 <= top_k <= num_experts or batch_size < 1:
        raise ValueError(f"expected 1 <= top_k ({top_k}) <= num_experts ({num_experts}) and "
                         f"batch_size >= 1 ({batch_size})")
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** batch_size)


def weight_figures(model: Any, *, decode_batch_size: int = 1) -> dict[str, float]:
    """``parameters``, ``weight_bytes`` and ``decode_weight_bytes`` (what a decode step
    reads: every weight but an embedding table the LM head does not share, which
    :func:`add_roofline_figures` uses) of a torch module.

    A Mixture-of-Experts model (its ``config.num_experts > 0``) adds ``active_parameters``
    (per token) and ``experts_touched_per_layer``, and its ``decode_weight_bytes`` counts
    the experts a decode step of ``decode_batch_size`` tokens reads under uniform routing
    (see the module docstring).
    """
    from ..engine.layers.embedding import LMHead, VocabEmbedding

    params = list(model.parameters())
    figures: dict[str, float] = {
        "parameters": sum(p.numel() for p in params),
        "weight_bytes": sum(p.numel() * p.element_size() for p in params),
    }
    # An embedding table the LM head does not read: a decode step reads one row of it.
    tied = {id(m._tied_to[0]) for m in model.modules() if isinstance(m, LMHead) and m.tied}
    lookup_only = sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
                      if isinstance(m, VocabEmbedding) and id(m) not in tied)
    figures["decode_weight_bytes"] = figures["weight_bytes"] - lookup_only
    config = getattr(model, "config", None)
    if getattr(config, "num_experts", 0) > 0:
        from ..engine.layers.fused_moe import FusedMoE

        experts = [p for m in model.modules() if isinstance(m, FusedMoE)
                   for p in m.parameters()]
        expert_params = sum(p.numel() for p in experts)
        expert_bytes = sum(p.numel() * p.element_size() for p in experts)
        num_experts, top_k = config.num_experts, config.num_experts_per_tok
        touched = expected_experts_touched(num_experts, top_k, decode_batch_size)
        figures.update(
            active_parameters=figures["parameters"] - expert_params * (1 - top_k / num_experts),
            experts_touched_per_layer=touched,
            decode_weight_bytes=(figures["decode_weight_bytes"]
                                 - expert_bytes * (1 - touched / num_experts)),
        )
    return figures


def add_roofline_figures(record: dict[str, Any], limits: dict[str, float], weights: dict[str, float]) -> None:
    """Add the roofline fractions to a workload record's runs (in place).

    ``decode-bs1`` gets ``bandwidth_roofline_fraction``, ``throughput`` gets
    ``matmul_roofline_fraction``; other workloads are left alone. A Mixture-of-Experts
    decode step reads ``decode_weight_bytes``; a Mixture-of-Experts model's figures count
    only the experts a step uses (``active_parameters``; both from :func:`weight_figures`).
    """
    step_bytes = weights["decode_weight_bytes"]
    parameters = weights.get("active_parameters", weights["parameters"])
    for figures in record["runs"].values():
        if record["name"] == "decode-bs1":
            roofline = limits["copy_bandwidth_gbps"] * 1e9 / step_bytes
            figures["bandwidth_roofline_tok_per_s"] = roofline
            figures["bandwidth_roofline_fraction"] = figures["output_tok_per_s"] / roofline
        elif record["name"] == "throughput":
            roofline = limits["matmul_tflops"] * 1e12 / (2 * parameters)
            figures["matmul_roofline_tok_per_s"] = roofline
            figures["matmul_roofline_fraction"] = figures["total_tok_per_s"] / roofline
