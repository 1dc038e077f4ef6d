"""The torch attention backend against a dense float64 reference (it is the reference for
the GPU kernels, so it must be exact): paged slots in any order, cached prefixes, GQA,
mixed lengths, padded decode batches."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from aiolm.cache.pool import KVPool, ReqToTokenPool  # noqa: E402
from aiolm.engine.attention import create  # noqa: E402
from aiolm.engine.forward_batch import ForwardBatch, ForwardMode  # noqa: E402

HQ, HKV, D = 6, 2, 8
POOL = 1400


def _dense_reference(q, k, v, prefix_len):
    """Queries at positions prefix_len.. over keys 0..S-1, causal, GQA, float64."""
    group = HQ // HKV
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * D ** -0.5
    q_pos = torch.arange(prefix_len, prefix_len + q.shape[0])
    mask = torch.arange(k.shape[0])[None, :] > q_pos[:, None]
    scores = scores.masked_fill(mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def _setup(seq_lens, new_lens, seed=0):
    """A NaN-filled pool with each request's prefix K/V at shuffled slots."""
    gen = torch.Generator().manual_seed(seed)
    pool = KVPool(1, HKV, D, POOL, torch.float32, "cpu")
    pool.k_buffers[0].fill_(float("nan"))
    pool.v_buffers[0].fill_(float("nan"))
    r2t = ReqToTokenPool(4, max(128, *seq_lens))
    r2t.req_to_token.fill_(POOL)  # stale entries point at a NaN slot
    slots = torch.randperm(POOL, generator=gen)[: sum(seq_lens)] + 1
    full_k, full_v, new_slots = [], [], []
    start = 0
    rows = [3, 0, 2, 1][: len(seq_lens)]
    for row, seq_len, new_len in zip(rows, seq_lens, new_lens, strict=True):
        s = slots[start:start + seq_len]
        start += seq_len
        r2t.write(row, 0, s)
        k = torch.randn(seq_len, HKV, D, generator=gen)
        v = torch.randn(seq_len, HKV, D, generator=gen)
        prefix = seq_len - new_len
        pool.set_kv(0, s[:prefix], k[:prefix], v[:prefix])
        full_k.append(k)
        full_v.append(v)
        new_slots.append(s[prefix:])
    return gen, pool, r2t, rows, full_k, full_v, new_slots


def _run(mode, seq_lens, new_lens, seed=0):
    gen, pool, r2t, rows, full_k, full_v, new_slots = _setup(seq_lens, new_lens, seed)
    q = torch.randn(sum(new_lens), HQ, D, generator=gen)
    k = torch.cat([fk[len(fk) - n:] for fk, n in zip(full_k, new_lens, strict=True)])
    v = torch.cat([fv[len(fv) - n:] for fv, n in zip(full_v, new_lens, strict=True)])
    prefix_lens = [s - n for s, n in zip(seq_lens, new_lens, strict=True)]
    batch = ForwardBatch(
        mode=mode, batch_size=len(seq_lens), input_ids=torch.zeros(len(q), dtype=torch.long),
        positions=torch.zeros(len(q), dtype=torch.long), out_cache_loc=torch.cat(new_slots),
        req_pool_indices=torch.tensor(rows), seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        seq_lens_cpu=list(seq_lens), kv_pool=pool, req_to_token_pool=r2t,
    )
    if mode is ForwardMode.EXTEND:
        batch.extend_prefix_lens = torch.tensor(prefix_lens, dtype=torch.int32)
        batch.extend_seq_lens = torch.tensor(new_lens, dtype=torch.int32)
        batch.extend_prefix_lens_cpu = prefix_lens
        batch.extend_seq_lens_cpu = list(new_lens)
    attn = create("torch", num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, scale=D ** -0.5,
                  device="cpu")
    attn.init_forward(batch)
    out = attn.forward(q, k, v, 0, batch)
    expected, start = [], 0
    for fk, fv, n, p in zip(full_k, full_v, new_lens, prefix_lens, strict=True):
        expected.append(_dense_reference(q[start:start + n], fk, fv, p))
        start += n
    return out, torch.cat(expected), pool, torch.cat(new_slots), k, v


def test_extend_with_cached_prefixes_matches_dense_attention():
    out, expected, *_ = _run(ForwardMode.EXTEND, seq_lens=[40, 7, 25], new_lens=[15, 7, 1])
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("seq_len", "new_len"), [(600, 600), (700, 530)])
def test_long_extend_with_and_without_prefix_matches_dense_attention(seq_len, new_len):
    # Longer than the fused kernel's query and key tiles, from position 0 (causal flag)
    # and after a cached prefix (explicit mask).
    out, expected, *_ = _run(ForwardMode.EXTEND, seq_lens=[seq_len], new_lens=[new_len], seed=1)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_padded_decode_batch_matches_dense_attention_and_ignores_stale_slots():
    out, expected, *_ = _run(ForwardMode.DECODE, seq_lens=[1, 33, 9, 64], new_lens=[1, 1, 1, 1])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_new_keys_and_values_are_written_to_their_slots():
    _, _, pool, slots, k, v = _run(ForwardMode.EXTEND, seq_lens=[10, 5], new_lens=[4, 5])
    k_buf, v_buf = pool.get_kv(0)
    assert torch.equal(k_buf[slots], k)
    assert torch.equal(v_buf[slots], v)


def test_half_precision_inputs_give_outputs_of_the_same_dtype():
    pool = KVPool(1, HKV, D, 16, torch.bfloat16, "cpu")
    r2t = ReqToTokenPool(1, 16)
    r2t.write(0, 0, torch.arange(1, 4))
    batch = ForwardBatch(
        mode=ForwardMode.EXTEND, batch_size=1, input_ids=torch.zeros(3, dtype=torch.long),
        positions=torch.arange(3), out_cache_loc=torch.arange(1, 4),
        req_pool_indices=torch.tensor([0]), seq_lens=torch.tensor([3], dtype=torch.int32),
        seq_lens_cpu=[3], extend_prefix_lens_cpu=[0], extend_seq_lens_cpu=[3],
        kv_pool=pool, req_to_token_pool=r2t,
    )
    attn = create("torch", num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, scale=D ** -0.5,
                  device="cpu")
    attn.init_forward(batch)
    q, k, v = (torch.randn(3, h, D, dtype=torch.bfloat16) for h in (HQ, HKV, HKV))
    out = attn.forward(q, k, v, 0, batch)
    assert out.dtype == torch.bfloat16 and out.shape == (3, HQ, D)
    torch.testing.assert_close(out.double(), _dense_reference(q.float(), k.float(), v.float(), 0),
                               rtol=2e-2, atol=2e-2)
