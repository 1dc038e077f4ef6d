"""The fused elementwise kernels (aiolm/engine/layers/fused.py) against the layers' torch code,
on the CPU through Triton's interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1``).

Outputs are compared with the plain torch path of the same layer on fresh random inputs.
float32 and float16 agree to reduction order. NOTE: the interpreter rounds float32 to
bfloat16 towards zero (a GPU rounds to nearest even), so bfloat16 results may differ from
torch by an ulp or two here; tests/test_gpu_fused.py checks them on a GPU.
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

# Per-dtype (rtol, atol): float32 reduction order; fp16/bf16 one or two ulps of O(1) values.
TOLERANCE = {torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 2e-3),
             torch.bfloat16: (1.6e-2, 1.6e-2)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def fused():
    """aiolm.engine.layers.fused, interpreted."""
    if torch.cuda.is_available():
        pytest.skip("interpreter tests run without a GPU; tests/test_gpu_fused.py runs there")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 must be set before triton is imported (tests/conftest.py)")
    from aiolm.engine.layers import fused as module

    return module


def close(out, ref, dtype):
    rtol, atol = TOLERANCE[dtype]
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 64), (5, 48), (2, 3, 100)])
def test_fused_add_rmsnorm_matches_add_then_torch_norm(fused, dtype, shape):
    from aiolm.engine.layers import RMSNorm

    gen = torch.Generator().manual_seed(sum(shape))
    norm = RMSNorm(shape[-1], eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(shape[-1], generator=gen) + 0.5)
    x = torch.randn(shape, generator=gen).to(dtype)
    residual = torch.randn(shape, generator=gen).to(dtype)
    ref_out, ref_sum = norm(x, residual)
    poisoned = [torch.full(shape, float("nan"), dtype=dtype) for _ in range(2)]
    out, new_residual = fused.fused_add_rmsnorm(x, residual, norm.weight, norm.eps,
                                                out=poisoned[0], residual_out=poisoned[1])
    assert out is poisoned[0] and new_residual is poisoned[1]
    close(out, ref_out, dtype)
    close(new_residual, ref_sum, dtype)
    close(fused.rmsnorm(x, norm.weight, norm.eps), norm(x), dtype)


def test_rmsnorm_reads_strided_rows(fused):
    """q/k norm (Qwen3) normalises head rows of a strided view of the qkv output."""
    from aiolm.engine.layers import RMSNorm

    qkv = torch.randn(4, 3 * 32, dtype=torch.float16)
    q = qkv[:, :32].view(4, 2, 16)
    norm = RMSNorm(16).to(torch.float16)
    close(fused.rmsnorm(q, norm.weight, norm.eps), norm(q), torch.float16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 2 * 8), (3, 2 * 100), (2, 2, 2 * 40)])
def test_silu_and_mul_matches_torch(fused, dtype, shape):
    from aiolm.engine.layers import SiluAndMul

    x = 2 * torch.randn(shape, generator=torch.Generator().manual_seed(shape[-1])).to(dtype)
    out = torch.full((*shape[:-1], shape[-1] // 2), float("nan"), dtype=dtype)
    close(fused.silu_and_mul(x, out=out), SiluAndMul()(x), dtype)
    close(fused.silu_and_mul(x), SiluAndMul()(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads", "head_dim"), [(4, 2, 16), (6, 1, 24)])
def test_rotary_in_place_on_qkv_views_matches_torch(fused, dtype, num_q_heads, num_kv_heads,
                                                    head_dim):
    from aiolm.engine.layers import RotaryEmbedding

    gen = torch.Generator().manual_seed(head_dim)
    rotary = RotaryEmbedding(head_dim, 128, 10000.0)
    tokens = 7
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(tokens, q_size + 2 * kv_size, generator=gen).to(dtype)
    q = qkv[:, :q_size].view(tokens, num_q_heads, head_dim)
    k = qkv[:, q_size:q_size + kv_size].view(tokens, num_kv_heads, head_dim)
    v_before = qkv[:, q_size + kv_size:].clone()
    positions = torch.tensor([0, 1, 2, 127, 64, 5, 33])
    ref_q, ref_k = rotary(positions, q.clone(), k.clone())
    fused.rotary_embedding_(positions, q, k, rotary.cos, rotary.sin)
    close(q, ref_q, dtype)
    close(k, ref_k, dtype)
    assert torch.equal(qkv[:, q_size + kv_size:], v_before)  # v untouched


def test_bad_inputs_name_the_argument(fused):
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weight"):
        fused.rmsnorm(x, torch.ones(4), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        fused.fused_add_rmsnorm(x, torch.randn(2, 4), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="x"):
        fused.silu_and_mul(torch.randn(2, 7))
    with pytest.raises(ValueError, match="out"):
        fused.silu_and_mul(x, out=torch.empty(2, 8))
    with pytest.raises(TypeError, match="x"):
        fused.silu_and_mul(torch.ones(2, 8, dtype=torch.int32))
