"""The ``hybrid`` attention backend on the CPU: flashinfer (a torch stand-in,
tests/flashinfer_standin.py) for extend passes, Triton (interpreted) for decode passes,
over one KV pool; its results equal the torch backend's, and each pass runs where it should.
"""

from __future__ import annotations

import os
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import flashinfer_standin  # noqa: E402
from test_triton_attention import TOLERANCE, make_batch, reference, rel_err  # noqa: E402

GEOMETRY = dict(num_q_heads=6, num_kv_heads=2, head_dim=16, scale=0.25, device="cpu")


@pytest.fixture
def hybrid_cls(monkeypatch):
    """HybridAttention with the stand-in flashinfer, allowed on the CPU."""
    if torch.cuda.is_available():
        pytest.skip("CPU stand-in test; tests/test_gpu_attention.py runs the real thing")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 must be set before triton is imported (tests/conftest.py)")
    from aiolm.engine.attention import flashinfer as fi_backend

    monkeypatch.setitem(sys.modules, "flashinfer", flashinfer_standin.as_module())
    monkeypatch.setattr(fi_backend, "_DEVICE_TYPES", ("cuda", "cpu"))
    from aiolm.engine.attention.hybrid import HybridAttention

    return HybridAttention


def shapes(dtype):
    return dict(num_q_heads=6, num_kv_heads=2, head_dim=16, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_extend_then_decode_match_torch_and_use_flashinfer_then_triton(hybrid_cls, dtype):
    from aiolm.engine.attention import create

    attn = create("hybrid", **GEOMETRY)
    assert isinstance(attn, hybrid_cls)
    prefill = attn.extend_backend._prefills[0]   # the first extend plans into the first

    batch, q, k, v = make_batch(prefix_lens=[0, 9, 30], extend_lens=[7, 1, 20], seed=1,
                                **shapes(dtype))
    expected = reference(batch, q, k, v, GEOMETRY)
    attn.init_forward(batch)
    out = attn.forward(q, k, v, 0, batch)
    assert prefill.runs == 1
    assert rel_err(out, expected) < TOLERANCE[dtype]
    k_buf, v_buf = batch.kv_pool.get_kv(0)
    assert torch.equal(k_buf[batch.out_cache_loc], k) and torch.equal(v_buf[batch.out_cache_loc], v)

    batch, q, k, v = make_batch(prefix_lens=[0, 16, 49], extend_lens=[1, 1, 1], seed=2,
                                decode=True, **shapes(dtype))
    expected = reference(batch, q, k, v, GEOMETRY)
    attn.init_forward(batch)
    out = attn.forward(q, k, v, 0, batch)
    assert prefill.runs == 1 and attn.extend_backend._decode.runs == 0  # Triton decoded
    assert rel_err(out, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize(("prefix_lens", "extend_lens", "planned"), [
    ([0, 9] + [5 + i for i in range(8)], [7, 20] + [1] * 8, 2),   # prompts, then 8 riders
    ([5 + i for i in range(8)], [1] * 8, None),                   # riders only: no prefill
    ([0, 9, 30], [7, 1, 1], 3),                                    # a short tail stays
])
def test_one_token_tail_of_an_extend_pass_goes_to_tritons_decode(hybrid_cls, prefix_lens,
                                                                 extend_lens, planned):
    attn = hybrid_cls(**GEOMETRY)
    prefill = attn.extend_backend._prefills[0]   # the first extend plans into the first
    batch, q, k, v = make_batch(prefix_lens=prefix_lens, extend_lens=extend_lens, seed=5,
                                **shapes(torch.float32))
    expected = reference(batch, q, k, v, GEOMETRY)
    attn.init_forward(batch)
    out = attn.forward(q, k, v, 0, batch)
    assert rel_err(out, expected) < TOLERANCE[torch.float32]
    k_buf, v_buf = batch.kv_pool.get_kv(0)
    assert torch.equal(k_buf[batch.out_cache_loc], k) and torch.equal(v_buf[batch.out_cache_loc], v)
    if planned is None:
        assert prefill.runs == 0
    else:
        assert prefill.runs == 1 and len(prefill._plan[0]) == planned + 1


def test_extends_in_a_row_plan_into_the_two_prefill_wrappers_in_turn(hybrid_cls):
    """The overlapped loop plans an extend while the pass before it may not have copied its
    plan from page-locked memory yet: consecutive extends never plan into one wrapper."""
    attn = hybrid_cls(**GEOMETRY)
    used = []
    for seed in range(3):
        batch, q, k, v = make_batch(prefix_lens=[0, 9], extend_lens=[7, 5], seed=10 + seed,
                                    **shapes(torch.float32))
        expected = reference(batch, q, k, v, GEOMETRY)
        attn.init_forward(batch)
        out = attn.forward(q, k, v, 0, batch)
        assert rel_err(out, expected) < TOLERANCE[torch.float32]
        used.append(attn.extend_backend._prefills.index(attn.extend_backend._active))
    assert used == [0, 1, 0]
    assert [w.runs for w in attn.extend_backend._prefills] == [2, 1]


def test_graph_hooks_are_tritons(hybrid_cls):
    attn = hybrid_cls(**GEOMETRY)
    batch, q, k, v = make_batch(prefix_lens=[40, 9], extend_lens=[1, 1], seed=3, decode=True,
                                **shapes(torch.float32))
    expected = reference(batch, q, k, v, GEOMETRY)
    attn.init_cuda_graph_state(max_batch_size=4, max_context_len=64)
    attn.init_forward_for_capture(batch)
    attn.init_forward(batch)
    out = attn.forward(q, k, v, 0, batch)
    assert rel_err(out, expected) < TOLERANCE[torch.float32]
    attn.init_forward_for_replay(batch)
    assert batch in attn.decode_backend._graph_meta


def test_forward_before_init_forward_says_so(hybrid_cls):
    attn = hybrid_cls(**GEOMETRY)
    batch, q, k, v = make_batch(prefix_lens=[0], extend_lens=[3], seed=4,
                                **shapes(torch.float32))
    with pytest.raises(RuntimeError, match="init_forward"):
        attn.forward(q, k, v, 0, batch)


@pytest.mark.anyio
async def test_engine_greedy_tokens_with_hybrid_equal_torch_backend(hybrid_cls):
    """Prompts of mixed lengths through the whole engine (prefill, decode), float32."""
    import anyio

    from aiolm.backends.engine import Engine, LoadedModel

    loaded = LoadedModel.load("tiny-llama", load_format="dummy", device="cpu", seed=0)
    prompts = [[5, 17, 200, 31], list(range(3, 40)), [9] * 20]

    async def run(backend):
        results = [None] * len(prompts)
        async with Engine(loaded, attention_backend=backend, max_total_tokens=4096) as engine:
            async def one(i):
                results[i] = await engine.generate(input_ids=prompts[i], max_tokens=5,
                                                   ignore_eos=True, temperature=0.0)

            async with anyio.create_task_group() as tg:
                for i in range(len(prompts)):
                    tg.start_soon(one, i)
        return [r.token_ids for r in results]

    assert await run("hybrid") == await run("torch")


@pytest.mark.anyio
async def test_engine_decode_steps_riding_a_prefill_give_torch_backends_tokens(hybrid_cls,
                                                                               monkeypatch):
    """Nine short prompts are decoding when a 117-token prompt arrives (chunks of 64): the
    pass of its last chunk carries the nine decode steps, which go to Triton's decode
    kernel (``split_one_token_tail``); every token is the torch backend's."""
    import anyio

    from aiolm.backends.engine import Engine, LoadedModel
    from aiolm.engine.attention import base, hybrid

    tails = []

    def counted(batch, *args):
        split = base.split_one_token_tail(batch, *args)
        tails.append(0 if split is None else split.tail.batch_size)
        return split

    monkeypatch.setattr(hybrid, "split_one_token_tail", counted)
    loaded = LoadedModel.load("tiny-llama", load_format="dummy", device="cpu", seed=0)
    short = [[5 + i, 17, 200 - i] for i in range(9)]
    long = list(range(3, 120))

    async def run(backend):
        tokens = [[] for _ in range(len(short) + 1)]
        started = anyio.Event()
        async with Engine(loaded, attention_backend=backend, max_total_tokens=4096,
                          chunked_prefill_size=64, mix_decode=True, overlap=False) as engine:
            async def one(i, prompt, max_tokens):
                async with engine.stream(input_ids=prompt, max_tokens=max_tokens,
                                         ignore_eos=True, temperature=0.0) as chunks:
                    async for chunk in chunks:
                        tokens[i].extend(chunk.token_ids)
                        if all(tokens[:len(short)]):
                            started.set()

            async with anyio.create_task_group() as tg:
                for i, prompt in enumerate(short):
                    tg.start_soon(one, i, prompt, 16)
                await started.wait()   # all nine decoding: now the long prompt
                tg.start_soon(one, len(short), long, 4)
        return tokens

    tails.clear()
    assert await run("hybrid") == await run("torch")
    assert 9 in tails


def test_a_closed_engine_leaves_its_kv_pool_to_no_one(hybrid_cls):
    """The LoadedModel outlives its engines: once one closes, the model no longer holds its
    attention, which held its last pass (a cut one here: a batch and so the KV pool). The
    next engine would otherwise size its pool from memory the old pool still took."""
    import gc
    import weakref

    import anyio

    from aiolm.backends.engine import Engine, LoadedModel

    loaded = LoadedModel.load("tiny-llama", load_format="dummy", device="cpu", seed=0)
    short = [[5 + i, 17, 200 - i] for i in range(9)]

    async def main():
        async with Engine(loaded, attention_backend="hybrid", max_total_tokens=4096,
                          chunked_prefill_size=64, mix_decode=True, overlap=False) as engine:
            async with anyio.create_task_group() as tg:
                for prompt in short:
                    tg.start_soon(lambda p=prompt: engine.generate(input_ids=p, max_tokens=3))
            attn = engine._core.runner.attn
            await engine.generate(input_ids=list(range(3, 40)), max_tokens=1)
            assert loaded.model.attn is attn
            return weakref.ref(engine._core.runner.kv_pool), weakref.ref(attn)

    pool, attn = anyio.run(main)
    gc.collect()
    assert loaded.model.attn is None
    assert pool() is None and attn() is None


def test_the_pool_stays_within_flashinfers_32_bit_offsets(hybrid_cls):
    """flashinfer's SM90 prefill multiplies page index by stride in 32 bits: a layer's K
    buffer must stay under 2**32 elements, whatever the card's memory would allow."""
    attn = hybrid_cls(**GEOMETRY)
    assert attn.max_kv_slots(2, 128) == (2**32 - 1) // 256 - 1
    assert attn.max_kv_slots(8, 128) * 8 * 128 < 2**32
    from aiolm.engine.attention import create

    assert create("torch", **GEOMETRY).max_kv_slots(2, 128) == 2**31 - 2


def test_max_total_tokens_past_the_kernels_reach_is_refused(hybrid_cls):
    import anyio

    from aiolm.backends.engine import Engine, LoadedModel

    loaded = LoadedModel.load("tiny-llama", load_format="dummy", device="cpu", seed=0)
    per_row = loaded.model_config.num_kv_heads * loaded.model_config.head_dim
    too_many = (2**32 - 1) // per_row  # one past the limit

    async def main():
        async with Engine(loaded, attention_backend="hybrid", max_total_tokens=too_many):
            pass

    with pytest.raises(ValueError, match="max_total_tokens: .* more than hybrid attention can address"):
        anyio.run(main)


@pytest.mark.parametrize(("has_flashinfer", "expected"), [(True, "hybrid"), (False, "triton")])
def test_auto_picks_hybrid_on_cuda_when_flashinfer_imports(monkeypatch, has_flashinfer,
                                                           expected):
    from aiolm.engine.attention import flashinfer as fi_backend
    from aiolm.engine.runner import choose_attention_backend

    monkeypatch.setattr(fi_backend, "flashinfer_available", lambda: has_flashinfer)
    assert choose_attention_backend(torch.device("cuda")) == expected
    assert choose_attention_backend(torch.device("cpu")) == "torch"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_auto_picks_triton_for_a_dtype_flashinfer_has_no_kernels_for(monkeypatch, dtype):
    from aiolm.engine.attention import flashinfer as fi_backend
    from aiolm.engine.runner import choose_attention_backend

    monkeypatch.setattr(fi_backend, "flashinfer_available", lambda: True)
    assert choose_attention_backend(torch.device("cuda"), dtype) == "triton"
    assert choose_attention_backend(torch.device("cuda"), torch.bfloat16) == "hybrid"
    assert choose_attention_backend(torch.device("cuda"), torch.float16) == "hybrid"
