"""GPU attention kernels (Triton, flashinfer, hybrid) against the torch backend, at real sizes.

Fresh random inputs for every case; every pool row that no request owns (slot 0 too) and
every output is NaN before the run, so a stray read or an unwritten element fails the
check. Error is ‖out − ref‖ / ‖ref‖ against the torch backend computing in float32.
"""

from __future__ import annotations

import importlib.util
import random

import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu
DEVICE = "cuda"

# bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3 per value): a softmax-weighted
# sum of rounded values lands within ~1e-2 of float32. fp16 keeps 11 bits (~5e-4).
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.bfloat16, torch.float16]
# (q heads, kv heads, head dim): Llama-3-8B, Qwen2-7B-like GQA 7, a non-power-of-2 dim.
GEOMETRIES = [(32, 8, 128), (28, 4, 128), (16, 2, 80)]


def make_batch(*, prefix_lens, extend_lens, geometry, dtype, seed, decode=False,
               pool_size=None, max_context=None):
    """A NaN-filled pool with random K/V in the slots the requests own, shuffled slots."""
    from aiolm.cache.pool import KVPool, ReqToTokenPool
    from aiolm.engine.forward_batch import ForwardBatch, ForwardMode

    hq, hkv, d = geometry
    dev = torch.device(DEVICE)
    gen = torch.Generator(dev).manual_seed(seed)
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens, strict=True)]
    total = sum(seq_lens)
    size = pool_size or total + 64
    pool = KVPool(1, hkv, d, size, dtype, dev)
    for buf in (pool.k_buffers[0], pool.v_buffers[0]):
        buf.fill_(float("nan"))
    slots = torch.randperm(size, generator=gen, device=dev)[:total] + 1
    prefix_slots = torch.cat([slots[sum(seq_lens[:i]):sum(seq_lens[:i]) + p]
                              for i, p in enumerate(prefix_lens)])
    for buf in (pool.k_buffers[0], pool.v_buffers[0]):
        buf[prefix_slots] = torch.randn(len(prefix_slots), hkv, d, generator=gen,
                                        device=dev).to(dtype)
    table = ReqToTokenPool(len(seq_lens) + 3, max_context or max(seq_lens) + 16, dev)
    rows, locs, start = [], [], 0
    for p, n in zip(prefix_lens, seq_lens, strict=True):
        row = table.alloc()
        table.write(row, 0, slots[start:start + n])
        locs.append(slots[start + p:start + n])
        rows.append(row)
        start += n
    num_tokens = sum(extend_lens)
    batch = ForwardBatch(
        mode=ForwardMode.DECODE if decode else ForwardMode.EXTEND,
        batch_size=len(seq_lens),
        input_ids=torch.zeros(num_tokens, dtype=torch.int64, device=dev),
        positions=torch.cat([torch.arange(p, n, device=dev)
                             for p, n in zip(prefix_lens, seq_lens, strict=True)]),
        out_cache_loc=torch.cat(locs).long(),
        req_pool_indices=torch.tensor(rows, dtype=torch.int64, device=dev),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
        extend_prefix_lens=None if decode else torch.tensor(prefix_lens, dtype=torch.int32,
                                                            device=dev),
        extend_seq_lens=None if decode else torch.tensor(extend_lens, dtype=torch.int32,
                                                         device=dev),
        seq_lens_cpu=seq_lens,
        extend_prefix_lens_cpu=[] if decode else list(prefix_lens),
        extend_seq_lens_cpu=[] if decode else list(extend_lens),
        kv_pool=pool,
        req_to_token_pool=table,
    )
    q, k, v = (torch.randn(num_tokens, h, d, generator=gen, device=dev).to(dtype)
               for h in (hq, hkv, hkv))
    return batch, q, k, v


def geometry_kwargs(geometry):
    hq, hkv, d = geometry
    return dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, scale=d ** -0.5, device=DEVICE)


@pytest.mark.parametrize("per_program", [2, 4])
@pytest.mark.parametrize("geometry", [(32, 32, 128), (32, 8, 128), (28, 4, 128)],
                         ids=lambda g: "x".join(map(str, g)))
def test_triton_decode_reading_several_kv_heads_a_program_matches_torch(geometry, per_program):
    """``decode_heads``: one program reads 2 or 4 KV heads' K/V of each token at once;
    plain decode over mixed lengths, and shared-prefix decode over a 2,340-token prefix."""
    from aiolm.engine.attention import triton_kernels as tk
    from aiolm.engine.shared_prefix import prefix_groups

    hq, hkv, d = geometry
    lens = [1, 100, 1000, 3000, 513, 2400, 2390, 2345]
    batch, q, k, v = make_batch(prefix_lens=[n - 1 for n in lens], extend_lens=[1] * len(lens),
                                geometry=geometry, dtype=torch.bfloat16, seed=per_program,
                                decode=True)
    table, rows = batch.req_to_token_pool.req_to_token, batch.req_pool_indices
    for b in (6, 7):   # the last three share 2,340 tokens
        table[rows[b], :2340] = table[rows[5], :2340]
    ref, _ = run_backend("torch", batch, q, k, v, geometry)
    k_buf, v_buf = batch.kv_pool.get_kv(0)
    tk.store_kv(k, v, k_buf, v_buf, batch.out_cache_loc)
    cfg = tk.kernel_config(torch.device(DEVICE), d)
    cfg.decode_heads = per_program
    groups = prefix_groups([(2340, [5, 6, 7])], lens, torch.device(DEVICE), width=4)
    for shared in (False, True):
        out = torch.full_like(q, float("nan"))
        mid_o = torch.full((len(lens), hq, 48, d), float("nan"), device=DEVICE)
        mid_lse = torch.full((len(lens), hq, 48), float("nan"), device=DEVICE)
        if shared:
            tk.decode_attention_shared(q, out, k_buf, v_buf, table, rows, batch.seq_lens,
                                       groups.prefix_lens, groups.rows, groups.lens, mid_o,
                                       mid_lse, 5, 8, d ** -0.5, cfg)
        else:
            tk.decode_attention(q, out, k_buf, v_buf, table, rows, batch.seq_lens, mid_o,
                                mid_lse, 7, d ** -0.5, cfg)
        assert torch.isfinite(out).all(), f"shared={shared}"
        assert rel_err(out, ref) < TOLERANCE[torch.bfloat16], f"shared={shared}"


def run_backend(name, batch, q, k, v, geometry):
    """Output of backend ``name`` on a private copy of the pool's K/V buffers."""
    from aiolm.engine.attention import create

    pool = batch.kv_pool
    saved = (pool.k_buffers[0].clone(), pool.v_buffers[0].clone())
    attn = create(name, **geometry_kwargs(geometry))
    attn.init_forward(batch)
    out = attn.forward(q, k, v, 0, batch)
    if out.is_cuda:
        torch.cuda.synchronize()
    written = (pool.k_buffers[0][batch.out_cache_loc].clone(),
               pool.v_buffers[0][batch.out_cache_loc].clone())
    pool.k_buffers[0].copy_(saved[0])
    pool.v_buffers[0].copy_(saved[1])
    return out, written


def rel_err(out, ref):
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def extend_cases(seed):
    rnd = random.Random(seed)
    return [
        ([0], [1]),
        ([0, 0], [1000, 37]),                                   # plain prefill, two lengths
        ([1500, 3, 0, 200], [1, 300, 129, 64]),                 # prefixes + mixed extends
        ([rnd.randrange(0, 600) for _ in range(12)], [rnd.randrange(1, 200) for _ in range(12)]),
        # At most 64 new tokens a request: the grouped kernel (a KV head's query heads
        # together); jump-forward's shape: long cached prefixes, a few forced tokens each.
        ([1500, 3, 0, 700, 64], [1, 17, 64, 5, 33]),
        ([rnd.randrange(500, 900) for _ in range(48)], [rnd.randrange(1, 21) for _ in range(48)]),
    ]


def decode_cases(seed):
    rnd = random.Random(seed)
    return [
        [1],
        [384],
        [1, 2, 63, 64, 65, 4097],
        [rnd.randrange(1, 3000) for _ in range(64)],
    ]


HAS_FLASHINFER = importlib.util.find_spec("flashinfer") is not None
_NO_FLASHINFER = pytest.mark.skipif(not HAS_FLASHINFER, reason="flashinfer is not installed")
BACKENDS = ["triton", pytest.param("flashinfer", marks=_NO_FLASHINFER),
            pytest.param("hybrid", marks=_NO_FLASHINFER)]
# Triton: every geometry and dtype. flashinfer compiles each (dtype, head dim) just in time
# (about a minute each on a fresh machine): only the benchmark's, Llama-3-8B in bf16.
CASES = [pytest.param("triton", dtype, g, id=f"triton-{str(dtype)[6:]}-{'x'.join(map(str, g))}")
         for dtype in DTYPES for g in GEOMETRIES]
CASES.append(pytest.param("flashinfer", torch.bfloat16, GEOMETRIES[0], marks=_NO_FLASHINFER,
                          id="flashinfer-bfloat16-32x8x128"))
# hybrid: flashinfer's extend and triton's decode sharing one pool.
CASES.append(pytest.param("hybrid", torch.bfloat16, GEOMETRIES[0], marks=_NO_FLASHINFER,
                          id="hybrid-bfloat16-32x8x128"))


@pytest.mark.parametrize(("backend", "dtype", "geometry"), CASES)
def test_extend_matches_torch(backend, dtype, geometry):
    for case, (prefix, extend) in enumerate(extend_cases(sum(geometry))):
        batch, q, k, v = make_batch(prefix_lens=prefix, extend_lens=extend, geometry=geometry,
                                    dtype=dtype, seed=case)
        ref, _ = run_backend("torch", batch, q, k, v, geometry)
        out, (k_written, v_written) = run_backend(backend, batch, q, k, v, geometry)
        assert torch.isfinite(out).all(), f"case {case}: non-finite output"
        err = rel_err(out, ref)
        assert err < TOLERANCE[dtype], f"case {case}: relative error {err:.2e}"
        assert torch.equal(k_written, k) and torch.equal(v_written, v)


@pytest.mark.parametrize(("backend", "dtype", "geometry"), CASES)
def test_decode_matches_torch(backend, dtype, geometry):
    for case, lens in enumerate(decode_cases(sum(geometry) + 1)):
        batch, q, k, v = make_batch(prefix_lens=[n - 1 for n in lens], extend_lens=[1] * len(lens),
                                    geometry=geometry, dtype=dtype, seed=100 + case, decode=True)
        ref, _ = run_backend("torch", batch, q, k, v, geometry)
        out, (k_written, v_written) = run_backend(backend, batch, q, k, v, geometry)
        assert torch.isfinite(out).all(), f"case {case}: non-finite output"
        err = rel_err(out, ref)
        assert err < TOLERANCE[dtype], f"case {case}: relative error {err:.2e}"
        assert torch.equal(k_written, k) and torch.equal(v_written, v)


@pytest.mark.parametrize("num_splits", [1, 2, 7, 32])
def test_triton_decode_any_split_count_matches_torch(num_splits):
    from aiolm.engine.attention import triton_kernels as tk

    geometry = (32, 8, 128)
    lens = [1, 100, 1000, 3000, 513]
    batch, q, k, v = make_batch(prefix_lens=[n - 1 for n in lens], extend_lens=[1] * len(lens),
                                geometry=geometry, dtype=torch.bfloat16, seed=num_splits,
                                decode=True)
    ref, _ = run_backend("torch", batch, q, k, v, geometry)
    k_buf, v_buf = batch.kv_pool.get_kv(0)
    tk.store_kv(k, v, k_buf, v_buf, batch.out_cache_loc)
    out = torch.full_like(q, float("nan"))
    mid_o = torch.full((len(lens), 32, 32, 128), float("nan"), device=DEVICE)
    mid_lse = torch.full((len(lens), 32, 32), float("nan"), device=DEVICE)
    cfg = tk.kernel_config(torch.device(DEVICE), 128)
    tk.decode_attention(q, out, k_buf, v_buf, batch.req_to_token_pool.req_to_token,
                        batch.req_pool_indices, batch.seq_lens, mid_o, mid_lse, num_splits,
                        128 ** -0.5, cfg)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("backend", BACKENDS)
def test_captured_decode_replays_with_new_lengths(backend):
    """Capture decode attention once; replay it with other lengths, slots and contents."""
    from aiolm.engine.attention import create

    geometry = (32, 8, 128)
    bs, max_len = 8, 3000
    shape = dict(geometry=geometry, dtype=torch.bfloat16, decode=True,
                 pool_size=bs * max_len + 64, max_context=max_len + 16)
    static, static_q, static_k, static_v = make_batch(prefix_lens=[0] * bs,
                                                      extend_lens=[1] * bs, seed=1, **shape)
    attn = create(backend, **geometry_kwargs(geometry))
    attn.init_cuda_graph_state(bs, max_len + 16)
    attn.init_forward_for_capture(static)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        attn.init_forward(static)
        attn.forward(static_q, static_k, static_v, 0, static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attn.init_forward(static)
        static_out = attn.forward(static_q, static_k, static_v, 0, static)

    for case in range(3):
        lens = [random.Random(case).randrange(1, max_len) for _ in range(bs)]
        batch, q, k, v = make_batch(prefix_lens=[n - 1 for n in lens], extend_lens=[1] * bs,
                                    seed=10 + case, **shape)
        ref, _ = run_backend("torch", batch, q, k, v, geometry)
        # Copy the new batch into the buffers the graph reads.
        for dst, src in ((static.kv_pool.k_buffers[0], batch.kv_pool.k_buffers[0]),
                         (static.kv_pool.v_buffers[0], batch.kv_pool.v_buffers[0]),
                         (static.req_to_token_pool.req_to_token,
                          batch.req_to_token_pool.req_to_token),
                         (static.req_pool_indices, batch.req_pool_indices),
                         (static.seq_lens, batch.seq_lens),
                         (static.out_cache_loc, batch.out_cache_loc),
                         (static_q, q), (static_k, k), (static_v, v)):
            dst.copy_(src)
        static.seq_lens_cpu = list(batch.seq_lens_cpu)
        attn.init_forward_for_replay(static)
        static_out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.isfinite(static_out).all(), f"case {case}"
        assert rel_err(static_out, ref) < TOLERANCE[torch.bfloat16], f"case {case}"


SHARED_CASES = [pytest.param(b, dtype, g, id=f"{b}-{str(dtype)[6:]}-{'x'.join(map(str, g))}")
                for b in ("triton",) for dtype in DTYPES
                for g in (*GEOMETRIES, (32, 32, 128))]   # + LLaVA-1.5's MHA
SHARED_CASES.append(pytest.param("hybrid", torch.bfloat16, GEOMETRIES[0], marks=_NO_FLASHINFER,
                                 id="hybrid-bfloat16-32x8x128"))


@pytest.mark.parametrize(("backend", "dtype", "geometry"), SHARED_CASES)
def test_shared_prefix_decode_matches_torch(backend, dtype, geometry):
    """Decode with ``prefix_groups`` (cascade attention): groups of 2, 5 and 16 requests
    sharing 2,340, 700 and 64 tokens of the same slots, and requests in no group."""
    from aiolm.engine.shared_prefix import max_members, prefix_groups

    rnd = random.Random(sum(geometry))
    plan = [(2340, 2), (700, 5), (64, max_members(geometry[0], geometry[1]))]
    lens, groups = [], []
    for shared, members in plan:
        first = len(lens)
        lens += [shared + rnd.randrange(1, 300) for _ in range(members)]
        groups.append((shared, list(range(first, first + members))))
    lens += [rnd.randrange(1, 3000) for _ in range(5)]          # in no group
    order = list(range(len(lens)))
    rnd.shuffle(order)                                           # members spread over the batch
    where = {old: new for new, old in enumerate(order)}
    lens = [lens[old] for old in order]
    groups = [(shared, sorted(where[m] for m in members)) for shared, members in groups]
    batch, q, k, v = make_batch(prefix_lens=[n - 1 for n in lens], extend_lens=[1] * len(lens),
                                geometry=geometry, dtype=dtype, seed=7, decode=True)
    table = batch.req_to_token_pool.req_to_token
    rows = batch.req_pool_indices
    for shared, members in groups:
        for b in members[1:]:
            table[rows[b], :shared] = table[rows[members[0]], :shared]
    ref, _ = run_backend("torch", batch, q, k, v, geometry)
    batch.prefix_groups = prefix_groups(groups, lens, torch.device(DEVICE))
    out, (k_written, v_written) = run_backend(backend, batch, q, k, v, geometry)
    assert torch.isfinite(out).all()
    err = rel_err(out, ref)
    assert err < TOLERANCE[dtype], f"relative error {err:.2e}"
    assert torch.equal(k_written, k) and torch.equal(v_written, v)
