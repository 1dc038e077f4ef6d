"""Physical limits measured in the same run, and the roofline fractions they give.

- Copy bandwidth (bytes read + written per second, a device-to-device copy): decode at
  batch 1 reads every weight once per token, so it cannot beat
  ``bandwidth / weight bytes`` tokens per second.
- Matmul rate (a large square matmul in the model's dtype): prefill and large batches
  cost about ``2 × parameters`` FLOPs per token, so they cannot beat
  ``matmul rate / (2 × parameters)`` tokens per second.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["add_roofline_figures", "measure_limits", "weight_figures"]


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


def weight_figures(model: Any) -> dict[str, float]:
    """``parameters`` and ``weight_bytes`` of a torch module."""
    params = list(model.parameters())
    return {
        "parameters": sum(p.numel() for p in params),
        "weight_bytes": sum(p.numel() * p.element_size() for p in params),
    }


def add_roofline_figures(record: dict[str, Any], limits: dict[str, float], weights: dict[str, float]) -> None:
    """Add the roofline fractions to a workload record's runs (in place).

    ``decode-bs1`` gets ``bandwidth_roofline_fraction``, ``throughput`` gets
    ``matmul_roofline_fraction``; other workloads are left alone.
    """
    for figures in record["runs"].values():
        if record["name"] == "decode-bs1":
            roofline = limits["copy_bandwidth_gbps"] * 1e9 / weights["weight_bytes"]
            figures["bandwidth_roofline_tok_per_s"] = roofline
            figures["bandwidth_roofline_fraction"] = figures["output_tok_per_s"] / roofline
        elif record["name"] == "throughput":
            roofline = limits["matmul_tflops"] * 1e12 / (2 * weights["parameters"])
            figures["matmul_roofline_tok_per_s"] = roofline
            figures["matmul_roofline_fraction"] = figures["total_tok_per_s"] / roofline
