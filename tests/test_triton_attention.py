"""The Triton attention kernels on the CPU, through Triton's interpreter.

tests/conftest.py sets ``TRITON_INTERPRET=1`` on machines without CUDA before triton is
first imported (``@triton.jit`` and triton.language read it at import). Each test compares against the torch backend on fresh random inputs, with the outputs poisoned
(NaN) before the run. The same checks run at full size on a GPU in tests/test_gpu_attention.py.
"""

from __future__ import annotations

import math
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from aiolm.cache.pool import KVPool, ReqToTokenPool  # noqa: E402
from aiolm.engine.attention.torch_backend import TorchAttention  # noqa: E402
from aiolm.engine.forward_batch import ForwardBatch, ForwardMode  # noqa: E402

# Relative error bounds (‖out - ref‖ / ‖ref‖) per dtype: float32 is exact up to summation
# order; fp16/bf16 round the probabilities to the input dtype before the second product.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def tk():
    """aiolm.engine.attention.triton_kernels, interpreted."""
    if torch.cuda.is_available():
        pytest.skip("interpreter tests run without a GPU; tests/test_gpu_attention.py runs there")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 must be set before triton is imported (tests/conftest.py)")
    from aiolm.engine.attention import triton_kernels

    return triton_kernels


@pytest.fixture
def backend_cls(tk):
    from aiolm.engine.attention.triton import TritonAttention

    return TritonAttention


def make_batch(*, prefix_lens, extend_lens, num_q_heads, num_kv_heads, head_dim, dtype,
               seed, decode=False):
    """Random pool contents, a shuffled slot table, and q/k/v for the new tokens."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(prefix_lens) + sum(extend_lens)
    pool = KVPool(1, num_kv_heads, head_dim, total + 8, dtype, "cpu")
    pool.k_buffers[0].copy_(torch.randn(pool.k_buffers[0].shape, generator=gen))
    pool.v_buffers[0].copy_(torch.randn(pool.v_buffers[0].shape, generator=gen))
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens, strict=True)]
    table = ReqToTokenPool(len(extend_lens) + 2, max(seq_lens) + 4)
    slots = torch.randperm(total + 8, generator=gen)[:total] + 1
    rows, locs, positions, start = [], [], [], 0
    for p, e in zip(prefix_lens, extend_lens, strict=True):
        row = table.alloc()
        table.write(row, 0, slots[start:start + p + e])
        locs.append(slots[start + p:start + p + e])
        positions.append(torch.arange(p, p + e))
        rows.append(row)
        start += p + e
    n = sum(extend_lens)
    batch = ForwardBatch(
        mode=ForwardMode.DECODE if decode else ForwardMode.EXTEND,
        batch_size=len(extend_lens),
        input_ids=torch.zeros(n, dtype=torch.int64),
        positions=torch.cat(positions),
        out_cache_loc=torch.cat(locs).long(),
        req_pool_indices=torch.tensor(rows, dtype=torch.int64),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        extend_prefix_lens=None if decode else torch.tensor(prefix_lens, dtype=torch.int32),
        extend_seq_lens=None if decode else torch.tensor(extend_lens, dtype=torch.int32),
        seq_lens_cpu=seq_lens,
        extend_prefix_lens_cpu=[] if decode else list(prefix_lens),
        extend_seq_lens_cpu=[] if decode else list(extend_lens),
        kv_pool=pool,
        req_to_token_pool=table,
    )
    q = torch.randn(n, num_q_heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
    return batch, q, k, v


def reference(batch, q, k, v, geometry):
    """The torch backend's output on a copy of the pool (it writes K/V too)."""
    pool = batch.kv_pool
    saved = [b.clone() for b in pool.k_buffers + pool.v_buffers]
    ref = TorchAttention(**geometry)
    ref.init_forward(batch)
    out = ref.forward(q, k, v, 0, batch)
    for buf, keep in zip(pool.k_buffers + pool.v_buffers, saved, strict=True):
        buf.copy_(keep)
    return out


def rel_err(out, ref):
    return float((out.float() - ref.float()).norm() / ref.float().norm())


GEOMETRIES = [(4, 2, 16), (6, 2, 24)]  # (q heads, kv heads, head dim): GQA 2, GQA 3 at 24


# Mixed lengths: no prefix, a prefix shorter than a tile, one token, several tiles. At most
# 64 new tokens a request go to the grouped kernel (a KV head's query heads together);
# the longer set to the per-head kernel.
EXTEND_LENS = {"short": [5, 1, 17, 40], "long": [5, 1, 17, 70]}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", [*GEOMETRIES, (8, 2, 16), (4, 4, 16)],
                         ids=lambda g: "x".join(map(str, g)))
@pytest.mark.parametrize("lens", list(EXTEND_LENS))
def test_extend_attends_to_cached_prefix_and_causally_to_new_tokens(backend_cls, dtype, heads,
                                                                    lens):
    hq, hkv, d = heads
    batch, q, k, v = make_batch(prefix_lens=[0, 7, 20, 33], extend_lens=EXTEND_LENS[lens],
                                num_q_heads=hq, num_kv_heads=hkv, head_dim=d, dtype=dtype,
                                seed=100 * hq + d + DTYPES.index(dtype))
    geometry = dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, scale=d ** -0.5, device="cpu")
    expected = reference(batch, q, k, v, geometry)
    attn = backend_cls(**geometry)
    attn.init_forward(batch)
    out = attn.forward(q, k, v, 0, batch)
    assert torch.isfinite(out).all()
    assert rel_err(out, expected) < TOLERANCE[dtype]
    k_buf, v_buf = batch.kv_pool.get_kv(0)
    assert torch.equal(k_buf[batch.out_cache_loc], k)
    assert torch.equal(v_buf[batch.out_cache_loc], v)


# An extend pass whose last requests compute one token each (decode steps riding along):
# at least MIN_ONE_TOKEN_TAIL of them go to the decode kernel; the other rows stay extend's.
# Each case: prefix lengths, new tokens, the kernels expected to run.
ONE_TOKEN_TAILS = {
    "prompts-then-riders": ([0, 7] + [3 * i + 5 for i in range(9)], [12, 30] + [1] * 9,
                            {"extend": 1, "decode": 1}),
    "only-riders": ([4 * i + 2 for i in range(8)], [1] * 8, {"extend": 0, "decode": 1}),
    "short-tail": ([0, 7, 9, 40], [12, 30, 1, 1], {"extend": 1, "decode": 0}),
    "one-token-not-last": ([5] * 9 + [0], [1] * 9 + [6], {"extend": 1, "decode": 0}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(ONE_TOKEN_TAILS))
def test_extend_pass_ending_in_one_token_requests_decodes_them(backend_cls, tk, monkeypatch,
                                                               dtype, case):
    from aiolm.engine.attention.base import split_one_token_tail

    prefix_lens, extend_lens, kernels = ONE_TOKEN_TAILS[case]
    batch, q, k, v = make_batch(prefix_lens=prefix_lens, extend_lens=extend_lens,
                                num_q_heads=8, num_kv_heads=2, head_dim=16, dtype=dtype,
                                seed=len(case))
    geometry = dict(num_q_heads=8, num_kv_heads=2, head_dim=16, scale=0.25, device="cpu")
    expected = reference(batch, q, k, v, geometry)
    calls = {"extend": 0, "decode": 0}
    for name in calls:
        def counted(*args, _name=name, _real=getattr(tk, f"{name}_attention"), **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(tk, f"{name}_attention", counted)
    attn = backend_cls(**geometry)
    attn.init_forward(batch)
    out = attn.forward(q, k, v, 0, batch)
    assert rel_err(out, expected) < TOLERANCE[dtype]
    k_buf, v_buf = batch.kv_pool.get_kv(0)
    assert torch.equal(k_buf[batch.out_cache_loc], k)
    assert torch.equal(v_buf[batch.out_cache_loc], v)
    assert calls == kernels
    split = split_one_token_tail(batch)
    assert (split is not None) == bool(kernels["decode"])
    if split is not None:
        # The tail's index tensors are fresh (16-byte aligned) copies: a Triton kernel is
        # specialized on pointer alignment, and views would compile new variants mid-run.
        for t in (split.tail.out_cache_loc, split.tail.req_pool_indices, split.tail.seq_lens):
            assert t._base is None and t.data_ptr() % 16 == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_splits", [1, 5])
def test_decode_split_k_matches_reference(tk, dtype, num_splits):
    hq, hkv, d = 8, 2, 16
    batch, q, k, v = make_batch(prefix_lens=[0, 16, 49, 70], extend_lens=[1, 1, 1, 1],
                                num_q_heads=hq, num_kv_heads=hkv, head_dim=d, dtype=dtype,
                                seed=num_splits, decode=True)
    expected, out, scratch, cfg, (k_buf, v_buf) = decode_setup(tk, batch, q, k, v, 8)
    tk.decode_attention(q, out, k_buf, v_buf, batch.req_to_token_pool.req_to_token,
                        batch.req_pool_indices, batch.seq_lens, *scratch, num_splits, 0.3, cfg)
    assert torch.isfinite(out).all()
    assert rel_err(out, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("heads", "per_program"), [
    ((4, 4, 16), 2), ((4, 4, 16), 4),      # multi-head: 2 and 4 KV heads a program
    ((8, 2, 16), 2),                       # grouped queries: both KV heads in one program
    ((12, 4, 24), 4),                      # a group of 3 (not a power of two), a 24 dim
    ((6, 6, 16), 4),                       # 4 does not divide 6 KV heads: 2 a program
], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_decode_reading_several_kv_heads_a_program_matches_reference(tk, dtype, heads,
                                                                      per_program):
    """``decode_heads``: a program reads several KV heads' K/V for each token at once (each
    query row zero outside its own head's columns); plain and shared-prefix decode."""
    hq, hkv, d = heads
    batch, q, k, v = make_batch(prefix_lens=[0, 16, 49, 70], extend_lens=[1, 1, 1, 1],
                                num_q_heads=hq, num_kv_heads=hkv, head_dim=d, dtype=dtype,
                                seed=hq + per_program, decode=True)
    expected, out, scratch, cfg, (k_buf, v_buf) = decode_setup(tk, batch, q, k, v, 8)
    cfg.decode_heads = per_program
    tk.decode_attention(q, out, k_buf, v_buf, batch.req_to_token_pool.req_to_token,
                        batch.req_pool_indices, batch.seq_lens, *scratch, 3, 0.3, cfg)
    assert torch.isfinite(out).all()
    assert rel_err(out, expected) < TOLERANCE[dtype]

    batch, q, k, v, groups = shared_prefix_batch(heads=heads, dtype=dtype, seed=hkv)
    expected, out, scratch, cfg, (k_buf, v_buf) = decode_setup(tk, batch, q, k, v, 6)
    cfg.decode_heads = per_program
    tk.decode_attention_shared(q, out, k_buf, v_buf, batch.req_to_token_pool.req_to_token,
                               batch.req_pool_indices, batch.seq_lens, *groups, *scratch,
                               3, 3, 0.3, cfg)
    assert torch.isfinite(out).all()
    assert rel_err(out, expected) < TOLERANCE[dtype]


def test_decode_heads_divide_the_kv_heads(tk):
    cfg = tk.kernel_config(torch.device("cpu"), 16)
    cfg.decode_heads = 4
    assert [tk.decode_heads(cfg, n) for n in (32, 8, 6, 5, 1)] == [4, 4, 2, 1, 1]


def decode_setup(tk, batch, q, k, v, entries):
    """The torch backend's output (scale 0.3), the new K/V stored, a NaN output and NaN
    scratch of ``entries`` splits a request, the interpreter's config and the pool."""
    bs, hq, d = q.shape
    geometry = dict(num_q_heads=hq, num_kv_heads=k.shape[1], head_dim=d, scale=0.3,
                    device="cpu")
    expected = reference(batch, q, k, v, geometry)
    k_buf, v_buf = batch.kv_pool.get_kv(0)
    tk.store_kv(k, v, k_buf, v_buf, batch.out_cache_loc)
    scratch = (torch.full((bs, hq, entries, d), float("nan")),
               torch.full((bs, hq, entries), float("nan")))
    return (expected, torch.full_like(q, float("nan")), scratch,
            tk.kernel_config(torch.device("cpu"), d), (k_buf, v_buf))


def shared_prefix_batch(*, heads, dtype, seed):
    """A decode batch of six requests where three share a 40-token prefix (the same slots
    in their rows), two share 23 and one shares nothing; the groups as the kernel takes
    them (members padded with -1)."""
    hq, hkv, d = heads
    batch, q, k, v = make_batch(prefix_lens=[41, 50, 63, 30, 24, 17], extend_lens=[1] * 6,
                                num_q_heads=hq, num_kv_heads=hkv, head_dim=d, dtype=dtype,
                                seed=seed, decode=True)
    table = batch.req_to_token_pool.req_to_token
    rows = batch.req_pool_indices
    for lead, others, shared in ((0, (1, 2), 40), (3, (4,), 23)):
        for b in others:
            table[rows[b], :shared] = table[rows[lead], :shared]
    prefix_lens = torch.tensor([40, 40, 40, 23, 23, 0], dtype=torch.int32)
    group_rows = torch.tensor([[2, 0, 1, -1], [4, 3, -1, -1]], dtype=torch.int32)
    group_lens = torch.tensor([40, 23], dtype=torch.int32)
    return batch, q, k, v, (prefix_lens, group_rows, group_lens)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", [(8, 2, 16), (4, 4, 16), (6, 2, 24)],
                         ids=lambda g: "x".join(map(str, g)))
@pytest.mark.parametrize(("num_splits", "num_shared"), [(1, 1), (3, 4)])
def test_shared_prefix_decode_reads_each_prefix_once_and_matches_reference(
        tk, dtype, heads, num_splits, num_shared):
    batch, q, k, v, groups = shared_prefix_batch(heads=heads, dtype=dtype,
                                                  seed=num_splits * 10 + num_shared + heads[0])
    expected, out, scratch, cfg, (k_buf, v_buf) = decode_setup(tk, batch, q, k, v,
                                                               num_splits + num_shared)
    tk.decode_attention_shared(q, out, k_buf, v_buf, batch.req_to_token_pool.req_to_token,
                               batch.req_pool_indices, batch.seq_lens, *groups, *scratch,
                               num_splits, num_shared, 0.3, cfg)
    assert torch.isfinite(out).all()
    assert rel_err(out, expected) < TOLERANCE[dtype]


def test_shared_prefix_decode_refuses_too_small_a_scratch(tk):
    batch, q, k, v, groups = shared_prefix_batch(heads=(4, 2, 16), dtype=torch.float32, seed=1)
    k_buf, v_buf = batch.kv_pool.get_kv(0)
    cfg = tk.kernel_config(torch.device("cpu"), 16)
    with pytest.raises(ValueError, match="exceeds the scratch's 4"):
        tk.decode_attention_shared(q, torch.empty_like(q), k_buf, v_buf,
                                   batch.req_to_token_pool.req_to_token,
                                   batch.req_pool_indices, batch.seq_lens, *groups,
                                   torch.empty(6, 4, 4, 16), torch.empty(6, 4, 4), 3, 2, 0.3,
                                   cfg)


def test_decode_backend_plans_splits_and_matches_reference(backend_cls):
    hq, hkv, d = 4, 1, 16
    batch, q, k, v = make_batch(prefix_lens=[100, 3], extend_lens=[1, 1], num_q_heads=hq,
                                num_kv_heads=hkv, head_dim=d, dtype=torch.float32, seed=7,
                                decode=True)
    geometry = dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, scale=0.25, device="cpu")
    expected = reference(batch, q, k, v, geometry)
    attn = backend_cls(**geometry)
    attn.init_forward(batch)
    assert attn._meta.num_splits > 1   # 101 tokens in chunks of 16 on 4 pretend SMs
    out = attn.forward(q, k, v, 0, batch)
    assert rel_err(out, expected) < TOLERANCE[torch.float32]


def test_captured_decode_batch_reuses_static_scratch(backend_cls):
    hq, hkv, d = 4, 2, 16
    batch, q, k, v = make_batch(prefix_lens=[40, 9], extend_lens=[1, 1], num_q_heads=hq,
                                num_kv_heads=hkv, head_dim=d, dtype=torch.float32, seed=3,
                                decode=True)
    geometry = dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, scale=0.25, device="cpu")
    expected = reference(batch, q, k, v, geometry)
    attn = backend_cls(**geometry)
    attn.init_cuda_graph_state(max_batch_size=4, max_context_len=64)
    attn.init_forward_for_capture(batch)
    attn.init_forward(batch)
    assert attn._meta.mid_o.data_ptr() == attn._graph_mid_o.data_ptr()
    out = attn.forward(q, k, v, 0, batch)
    assert rel_err(out, expected) < TOLERANCE[torch.float32]
    attn.init_forward_for_replay(batch)
    other, *_ = make_batch(prefix_lens=[4], extend_lens=[1], num_q_heads=hq, num_kv_heads=hkv,
                           head_dim=d, dtype=torch.float32, seed=4, decode=True)
    with pytest.raises(RuntimeError, match="not captured"):
        attn.init_forward_for_replay(other)


def test_store_kv_writes_only_the_target_slots(tk):
    k_buf = torch.full((10, 2, 8), float("nan"), dtype=torch.bfloat16)
    v_buf = torch.full((10, 2, 8), float("nan"), dtype=torch.bfloat16)
    k = torch.randn(3, 2, 8).to(torch.bfloat16)
    v = torch.randn(3, 2, 8).to(torch.bfloat16)
    loc = torch.tensor([7, 2, 5])
    tk.store_kv(k, v, k_buf, v_buf, loc)
    assert torch.equal(k_buf[loc], k) and torch.equal(v_buf[loc], v)
    untouched = torch.ones(10, dtype=torch.bool)
    untouched[loc] = False
    assert torch.isnan(k_buf[untouched].float()).all()
    assert torch.isnan(v_buf[untouched].float()).all()


def test_fill_kv_indices_concatenates_each_requests_slots(tk):
    table = torch.randint(1, 1000, (5, 40), dtype=torch.int32)
    rows = torch.tensor([3, 0, 4])
    lens = torch.tensor([17, 1, 33], dtype=torch.int32)
    indptr = torch.tensor([0, 17, 18, 51], dtype=torch.int32)
    out = torch.full((51,), -1, dtype=torch.int32)
    tk.fill_kv_indices(table, rows, lens, indptr, out)
    expected = torch.cat([table[3, :17], table[0, :1], table[4, :33]])
    assert torch.equal(out, expected)


@pytest.mark.parametrize(("bs", "kv_heads", "max_len", "expected"), [
    (1, 8, None, 32),      # 2 * 132 SMs / 8 programs per split -> capped at 32
    (1, 8, 384, 6),        # ... but no more than 384 / 64 chunks
    (64, 8, 4096, 1),      # a full batch already covers the GPU
    (4, 8, 10_000, 9),     # ceil(264 / 32)
])
def test_decode_split_plan(tk, bs, kv_heads, max_len, expected):
    got = tk.plan_decode_splits(bs, kv_heads, max_len, num_sms=132, max_splits=32,
                                min_chunk=64)
    assert got == expected


@pytest.mark.parametrize(("groups", "kv_heads", "max_len", "expected"), [
    (12, 32, 2340, 6),     # LLaVA's MHA, 12 images' groups: 16 * 132 / 384 programs a split
    (12, 32, 300, 5),      # ... but no chunk under 64 tokens
    (12, 8, 2340, 16),     # grouped-query heads: ceil(2112 / 96) = 22, capped at 16
    (3, 8, None, 16),      # a capture: any prefix may follow, the most splits
])
def test_shared_prefix_split_plan(tk, groups, kv_heads, max_len, expected):
    got = tk.plan_shared_splits(groups, kv_heads, max_len, num_sms=132, max_splits=16,
                                min_chunk=64)
    assert got == expected


def test_decode_split_plan_rejects_empty_batches(tk):
    with pytest.raises(ValueError, match="batch_size"):
        tk.plan_decode_splits(0, 8, None, num_sms=132, max_splits=32, min_chunk=64)


@pytest.mark.parametrize("seq_len", [1, 15, 16, 17, 255, 256, 1000, 8191])
@pytest.mark.parametrize("splits", [1, 3, 32])
def test_decode_chunks_cover_the_sequence_in_whole_tiles(tk, seq_len, splits):
    chunk = tk.decode_chunk_size(seq_len, splits, min_chunk=64, block_n=32)
    assert chunk % 32 == 0 and chunk >= 64
    assert chunk * splits >= seq_len
    # The last non-empty split starts inside the sequence; the stage-2 merge relies on it.
    used = math.ceil(seq_len / chunk)
    assert used <= splits and (used - 1) * chunk < seq_len


def test_kernel_config_uses_small_tiles_off_gpu(tk):
    cfg = tk.kernel_config(torch.device("cpu"), 128)
    assert cfg.extend_block_m == 16 and cfg.dot_f32


def test_launchers_shrink_tiles_when_the_gpu_refuses_them(tk, monkeypatch):
    """An OutOfResources (shared memory) at launch retries with smaller tiles."""
    from triton.runtime.errors import OutOfResources

    hq, hkv, d = 4, 2, 16
    batch, q, k, v = make_batch(prefix_lens=[3], extend_lens=[20], num_q_heads=hq,
                                num_kv_heads=hkv, head_dim=d, dtype=torch.float32, seed=5)
    geometry = dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, scale=0.25, device="cpu")
    expected = reference(batch, q, k, v, geometry)

    class RefuseOnce:
        def __init__(self, kernel):
            self.kernel, self.refused = kernel, False

        def __getitem__(self, grid):
            if not self.refused:
                self.refused = True

                def refuse(*args, **kwargs):
                    raise OutOfResources(300_000, 232_448, "shared memory")

                return refuse
            return self.kernel[grid]

    monkeypatch.setattr(tk, "_extend_kernel", RefuseOnce(tk._extend_kernel))
    cfg = tk.kernel_config(torch.device("cuda"), d)  # a GPU config: 2 stages to give up
    cfg.extend_block_m, cfg.extend_block_n, cfg.dot_f32 = 16, 16, True
    cfg.extend_grouped_max = 0   # the per-head kernel, whose tiles shrink
    k_buf, v_buf = batch.kv_pool.get_kv(0)
    tk.store_kv(k, v, k_buf, v_buf, batch.out_cache_loc)
    out = torch.full_like(q, float("nan"))
    q_start = torch.zeros(1, dtype=torch.int32)
    tk.extend_attention(q, out, k_buf, v_buf, batch.req_to_token_pool.req_to_token,
                        batch.req_pool_indices, batch.extend_prefix_lens, batch.extend_seq_lens,
                        q_start, 20, 0.25, cfg)
    assert cfg.extend_stages == 1
    assert rel_err(out, expected) < TOLERANCE[torch.float32]
