"""benchmarks/gpu_gemv.py's Triton GEMV (an experiment the engine did not adopt) computes
``F.linear``: checked through Triton's interpreter on the CPU, as its GPU figures rest on it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import torch.nn.functional as F  # noqa: E402
from gpu_gemv import GemvConfig, gemv  # noqa: E402

from aiolm.engine.layers.fused import silu_and_mul  # noqa: E402

SMALL = GemvConfig(block_n=4, block_k=32, warps=1, stages=1)


@pytest.mark.parametrize(("rows", "cols", "bias"), [(37, 64, False), (16, 96, True),
                                                     (5, 20, True)])
def test_the_experimental_gemv_is_f_linear(rows, cols, bias):
    gen = torch.Generator().manual_seed(rows * cols)
    weight = torch.randn(rows, cols, generator=gen)
    b = torch.randn(rows, generator=gen) if bias else None
    x = torch.randn(1, cols, generator=gen)
    torch.testing.assert_close(gemv(x, weight, b, cfg=SMALL), F.linear(x, weight, b),
                               rtol=1e-5, atol=1e-5)
    gate_up = torch.randn(1, 2 * cols, generator=gen)
    torch.testing.assert_close(gemv(gate_up, weight, silu_input=True, cfg=SMALL),
                               F.linear(silu_and_mul(gate_up), weight), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one row"):
        gemv(torch.randn(2, cols), weight)
