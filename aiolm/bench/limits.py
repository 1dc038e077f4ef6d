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
``decode_weight_bytes`` = the dense weights (attention, norms, embedding, head, dense MLPs)
+ that fraction of the expert weights.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["add_roofline_figures", "expected_experts_touched", "measure_limits",
           "weight_figures"]


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


def measure_limits(device: Any, dtype: Any) -> dict[str, float]:
    """``copy_bandwidth_gbps`` (GB/s, read + written) and ``matmul_tflops`` on ``device``."""
    import torch

    device = torch.device(device)
    on_gpu = device.type == "cuda"
    numel = (1 << 28) if on_gpu else (1 << 26)            # 1 GiB / 256 MiB of float32
    src = torch.empty(numel, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    copy_s = _best_seconds(lambda: dst.copy_(src), device, repeats=10 if on_gpu else 3)
    n = 8192 if on_gpu else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    runs = 10 if on_gpu else 1

    def matmuls() -> None:
        for _ in range(runs):
            torch.matmul(a, b)

    matmul_s = _best_seconds(matmuls, device, repeats=3)
    return {
        "copy_bandwidth_gbps": 2 * src.numel() * src.element_size() / copy_s / 1e9,
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
    """``parameters`` and ``weight_bytes`` of a torch module.

    A Mixture-of-Experts model (its ``config.num_experts > 0``) adds ``active_parameters``
    (per token), ``experts_touched_per_layer`` and ``decode_weight_bytes`` (read by a
    decode step of ``decode_batch_size`` tokens under uniform routing; see the module
    docstring), which :func:`add_roofline_figures` uses in place of the totals.
    """
    params = list(model.parameters())
    figures: dict[str, float] = {
        "parameters": sum(p.numel() for p in params),
        "weight_bytes": sum(p.numel() * p.element_size() for p in params),
    }
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
            decode_weight_bytes=figures["weight_bytes"] - expert_bytes * (1 - touched / num_experts),
        )
    return figures


def add_roofline_figures(record: dict[str, Any], limits: dict[str, float], weights: dict[str, float]) -> None:
    """Add the roofline fractions to a workload record's runs (in place).

    ``decode-bs1`` gets ``bandwidth_roofline_fraction``, ``throughput`` gets
    ``matmul_roofline_fraction``; other workloads are left alone. A Mixture-of-Experts
    model's figures count only the experts a step uses (``decode_weight_bytes``,
    ``active_parameters`` from :func:`weight_figures`).
    """
    step_bytes = weights.get("decode_weight_bytes", weights["weight_bytes"])
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
