"""The fused elementwise kernels on a GPU against the layers' plain torch code, at real sizes.

Each layer's CUDA path (aiolm/engine/layers/fused.py) runs on fresh random inputs with its
outputs NaN-poisoned first; the reference is the same layer's torch code on CPU copies of
the inputs. The kernels round where the torch code rounds, so the results agree up to the
float32 reduction order and ``exp`` / ``rsqrt`` approximations: within an ulp or two of the
IO dtype.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu
DEVICE = "cuda"

TOLERANCE = {torch.float32: (2e-5, 1e-5), torch.float16: (2e-3, 2e-3),
             torch.bfloat16: (1.6e-2, 1.6e-2)}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# Rows x hidden: decode bs1, a small batch, an 8k prefill at Llama-3-8B's hidden size;
# odd sizes (not a power of 2) for the masks.
NORM_SHAPES = [(1, 4096), (37, 4096), (8191, 4096), (5, 896), (3, 5120)]
# Rows x intermediate size (the gate_up output is twice as wide).
MLP_SHAPES = [(1, 14336), (300, 14336), (8, 4864), (2, 100)]
ROTARY = [(32, 8, 128), (28, 4, 128), (16, 2, 80), (9, 3, 64)]


def close(out, ref, dtype):
    rtol, atol = TOLERANCE[dtype]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.cpu(), ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fused_add_rmsnorm_matches_torch(dtype, shape):
    from aiolm.engine.layers import RMSNorm
    from aiolm.engine.layers.fused import fused_add_rmsnorm, rmsnorm

    gen = torch.Generator().manual_seed(sum(shape))
    norm = RMSNorm(shape[-1], eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(shape[-1], generator=gen) + 0.5)
    x = torch.randn(shape, generator=gen).to(dtype)
    residual = (3 * torch.randn(shape, generator=gen)).to(dtype)
    ref_out, ref_sum = norm(x, residual)
    ref_plain = norm(x)

    weight = norm.weight.detach().to(DEVICE)
    gx, gres = x.to(DEVICE), residual.to(DEVICE)
    out = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    summed = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    fused_add_rmsnorm(gx, gres, weight, norm.eps, out=out, residual_out=summed)
    plain = rmsnorm(gx, weight, norm.eps, out=torch.full_like(out, float("nan")))
    torch.cuda.synchronize()
    close(out, ref_out, dtype)
    close(summed, ref_sum, dtype)
    close(plain, ref_plain, dtype)
    assert torch.equal(gx.cpu(), x) and torch.equal(gres.cpu(), residual)  # inputs only read


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", MLP_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_silu_and_mul_matches_torch(dtype, shape):
    from aiolm.engine.layers import SiluAndMul
    from aiolm.engine.layers.fused import silu_and_mul

    rows, d = shape
    x = (3 * torch.randn(rows, 2 * d, generator=torch.Generator().manual_seed(d))).to(dtype)
    ref = SiluAndMul()(x)
    out = torch.full((rows, d), float("nan"), dtype=dtype, device=DEVICE)
    silu_and_mul(x.to(DEVICE), out=out)
    torch.cuda.synchronize()
    close(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geometry", ROTARY, ids=lambda g: "x".join(map(str, g)))
def test_rotary_in_place_matches_torch(dtype, geometry):
    """q and k are views into a fused qkv output; v (between/after them) stays untouched."""
    from aiolm.engine.layers import RotaryEmbedding

    hq, hkv, d = geometry
    gen = torch.Generator().manual_seed(hq * d)
    rotary = RotaryEmbedding(d, 8192, 500000.0)
    for tokens in (1, 3, 2000):
        q_size, kv_size = hq * d, hkv * d
        qkv = torch.randn(tokens, q_size + 2 * kv_size, generator=gen).to(dtype)
        positions = torch.randint(0, 8192, (tokens,), generator=gen)
        ref_q, ref_k = rotary(positions, qkv[:, :q_size].view(tokens, hq, d),
                              qkv[:, q_size:q_size + kv_size].view(tokens, hkv, d))

        gqkv = qkv.to(DEVICE)
        q = gqkv[:, :q_size].view(tokens, hq, d)
        k = gqkv[:, q_size:q_size + kv_size].view(tokens, hkv, d)
        rotary.to(DEVICE)
        out_q, out_k = rotary(positions.to(DEVICE), q, k)
        rotary.to("cpu")
        torch.cuda.synchronize()
        assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()
        close(q, ref_q, dtype)
        close(k, ref_k, dtype)
        assert torch.equal(gqkv[:, q_size + kv_size:].cpu(), qkv[:, q_size + kv_size:])


def prefill_logits(model, config, ids, device):
    """Logits of every token of one request through ``model`` with torch attention."""
    from aiolm.cache.pool import KVPool, ReqToTokenPool
    from aiolm.engine.attention import create
    from aiolm.engine.forward_batch import ForwardBatch, ForwardMode

    n = len(ids)
    pool = KVPool(config.num_layers, config.num_kv_heads, config.head_dim, n + 8,
                  config.torch_dtype, device)
    table = ReqToTokenPool(2, n + 8, device)
    row = table.alloc()
    slots = torch.arange(1, n + 1, device=device)
    table.write(row, 0, slots)
    model.set_attention(create("torch", num_q_heads=config.num_heads,
                               num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                               scale=config.head_dim ** -0.5, device=device))
    batch = ForwardBatch(
        mode=ForwardMode.EXTEND, batch_size=1,
        input_ids=torch.tensor(ids, device=device), positions=torch.arange(n, device=device),
        out_cache_loc=slots, req_pool_indices=torch.tensor([row], device=device),
        seq_lens=torch.tensor([n], dtype=torch.int32, device=device),
        extend_prefix_lens=torch.tensor([0], dtype=torch.int32, device=device),
        extend_seq_lens=torch.tensor([n], dtype=torch.int32, device=device),
        seq_lens_cpu=[n], extend_prefix_lens_cpu=[0], extend_seq_lens_cpu=[n],
        return_logits="all", kv_pool=pool, req_to_token_pool=table,
    )
    return model(batch).float().cpu()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
def test_model_with_fused_layers_on_cuda_matches_the_cpu_model(name):
    """Same bf16 weights: CUDA (fused layers) vs CPU (torch layers), torch attention."""
    import copy

    from aiolm.engine.loader import load_model

    model, config = load_model(name, load_format="dummy", dtype="bfloat16", device="cpu",
                               seed=0)
    ids = [int(i) for i in torch.randint(3, config.vocab_size, (300,),
                                         generator=torch.Generator().manual_seed(0))]
    ref = prefill_logits(model, config, ids, "cpu")
    out = prefill_logits(copy.deepcopy(model).to(DEVICE), config, ids, DEVICE)
    assert torch.isfinite(out).all()
    err = float((out - ref).norm() / ref.norm())
    # bf16 activations through a few layers: the two paths round differently in matmuls.
    assert err < 3e-2, f"relative error {err:.2e}"
