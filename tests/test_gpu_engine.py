"""The engine on a GPU: Triton / flashinfer / hybrid / CUDA graphs give the torch backend's tokens.

A small dummy Llama with the benchmark's head geometry (head dim 128, 4 query heads per KV
head) runs greedy decoding over prompts of mixed lengths, all in one batch.

Tolerance: two backends compute the same function with different rounding, so greedy
tokens may part where the reference's top two tokens (nearly) tie. A divergence is
accepted only there: the reference's logprob margin between its token and the other
backend's must be under ``MARGIN[dtype]`` (float32: exact attention arithmetic on both
sides, 1e-3 nats; bfloat16: activations rounded to 8 bits, 0.1 nats). After the first
accepted divergence the contexts differ, so comparison of that prompt stops.
"""

from __future__ import annotations

import importlib.util
import random
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
anyio = pytest.importorskip("anyio")

pytestmark = pytest.mark.gpu

MARGIN = {"float32": 1e-3, "bfloat16": 0.1}
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 2048, "hidden_size": 512,
    "intermediate_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 8,
    "num_key_value_heads": 2, "head_dim": 128, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "max_position_embeddings": 4096, "tie_word_embeddings": False, "hidden_act": "silu",
    "eos_token_id": 2, "bos_token_id": 1,
}
PROMPT_LENS = [5, 60, 200, 700, 1500]
NEW_TOKENS = 24
# The riders' test: long enough that the short prompts still decode through the long
# prompt's chunks.
NEW_TOKENS_RIDING = 48
HAS_FLASHINFER = importlib.util.find_spec("flashinfer") is not None
DEVICE = "cuda"


def load(dtype: str):
    from aiolm.backends.engine import LoadedModel
    from aiolm.engine.loader import load_model

    model, config = load_model(dict(CONFIG, torch_dtype=dtype), load_format="dummy", dtype=dtype,
                               device=DEVICE, seed=0)
    return LoadedModel(model=model, model_config=config, tokenizer=None,
                       device=torch.device(DEVICE), source="gpu-test-llama", load_format="dummy")


def generate(loaded, prompt_lens=PROMPT_LENS, **engine_options):
    """Greedy completions (with top-5 logprobs) of every prompt, submitted together."""
    from aiolm.backends.engine import Engine

    rnd = random.Random(0)
    prompts = [[rnd.randrange(3, CONFIG["vocab_size"]) for _ in range(n)] for n in prompt_lens]

    async def main():
        results = [None] * len(prompts)
        opts = dict(max_total_tokens=32768, max_running_requests=32, device=DEVICE)
        opts.update(engine_options)
        async with Engine(loaded, **opts) as engine:
            async def one(i):
                results[i] = await engine.generate(
                    input_ids=prompts[i], max_tokens=NEW_TOKENS, ignore_eos=True,
                    temperature=0.0, logprobs=True, top_logprobs=5)

            async with anyio.create_task_group() as tg:
                for i in range(len(prompts)):
                    tg.start_soon(one, i)
        return results

    return anyio.run(main)


def assert_same_greedy(reference, other, margin, *, new_tokens=NEW_TOKENS, min_compared=None):
    """Greedy tokens equal to the reference's up to a near-tie (its top-2 logprobs within
    ``margin`` nats) at the first divergence of each request; every output ``new_tokens``
    long; at least ``min_compared`` tokens (default: one request's worth) agreed."""
    compared = 0
    for ref, got in zip(reference, other, strict=True):
        assert len(got.token_ids) == new_tokens
        for i, (a, b) in enumerate(zip(ref.token_ids, got.token_ids, strict=True)):
            if a == b:
                compared += 1
                continue
            top = {tid: lp for tid, _text, lp in ref.logprobs[i].top}
            assert b in top, f"token {i}: {b} is not among the reference's top 5 {top}"
            assert top[a] - top[b] <= margin, (
                f"token {i}: diverged ({a} vs {b}) with a reference margin of "
                f"{top[a] - top[b]:.3g} nats"
            )
            break
    assert compared >= (new_tokens if min_compared is None else min_compared)


BACKEND_CASES = [
    ("triton", "float32"),
    ("triton", "bfloat16"),
    pytest.param("flashinfer", "bfloat16",
                 marks=pytest.mark.skipif(not HAS_FLASHINFER, reason="flashinfer missing")),
    pytest.param("hybrid", "bfloat16",
                 marks=pytest.mark.skipif(not HAS_FLASHINFER, reason="flashinfer missing")),
]


@pytest.mark.parametrize(("backend", "dtype"), BACKEND_CASES)
def test_greedy_tokens_match_torch_backend(backend, dtype):
    loaded = load(dtype)
    reference = generate(loaded, attention_backend="torch", cuda_graphs=False)
    other = generate(loaded, attention_backend=backend, cuda_graphs=False)
    assert_same_greedy(reference, other, MARGIN[dtype])


@pytest.mark.parametrize("backend", ["triton", *(pytest.param(
    name, marks=pytest.mark.skipif(not HAS_FLASHINFER, reason="flashinfer missing"))
    for name in ("flashinfer", "hybrid"))])
def test_cuda_graph_decode_matches_eager_decode(backend):
    loaded = load("bfloat16")
    eager = generate(loaded, attention_backend=backend, cuda_graphs=False)
    graphed = generate(loaded, attention_backend=backend, cuda_graphs=True)
    assert_same_greedy(eager, graphed, MARGIN["bfloat16"])


def staged_run(loaded, backend, arrivals, **engine_options):
    """Greedy streams (top-5 logprobs) of twelve short prompts; once all twelve decode,
    the ``arrivals`` prompts are submitted. Returns every request's tokens and logprobs."""
    from aiolm.backends.engine import Engine

    rnd = random.Random(0)
    short = [[rnd.randrange(3, CONFIG["vocab_size"]) for _ in range(20 + i)] for i in range(12)]
    prompts = short + arrivals
    tokens = [[] for _ in prompts]
    logprobs = [[] for _ in prompts]

    async def main():
        started = anyio.Event()
        options = {"max_total_tokens": 32768, **engine_options}
        async with Engine(loaded, attention_backend=backend, mix_decode=True, device=DEVICE,
                          **options) as engine:
            async def one(i):
                async with engine.stream(input_ids=prompts[i], max_tokens=NEW_TOKENS_RIDING,
                                         ignore_eos=True, temperature=0.0, logprobs=True,
                                         top_logprobs=5) as chunks:
                    async for chunk in chunks:
                        tokens[i].extend(chunk.token_ids)
                        logprobs[i].extend(chunk.logprobs)
                        if all(tokens[:len(short)]):
                            started.set()

            async with anyio.create_task_group() as tg:
                for i in range(len(short)):
                    tg.start_soon(one, i)
                await started.wait()   # all twelve decoding: now the arrivals
                for i in range(len(short), len(prompts)):
                    tg.start_soon(one, i)

    anyio.run(main)
    return [SimpleNamespace(token_ids=t, logprobs=lp) for t, lp in zip(tokens, logprobs, strict=True)]


@pytest.fixture
def cut_passes(monkeypatch):
    """Whether each extend pass was cut (``split_one_token_tail``): a head and a tail."""
    from aiolm.engine.attention import base, hybrid
    from aiolm.engine.attention import triton as triton_backend

    cut = []

    def counted(batch, *args):
        split = base.split_one_token_tail(batch, *args)
        cut.append(split is not None and split.head is not None)
        return split

    monkeypatch.setattr(hybrid, "split_one_token_tail", counted)
    monkeypatch.setattr(triton_backend, "split_one_token_tail", counted)
    return cut


@pytest.mark.parametrize(("backend", "dtype"), [
    ("triton", "float32"), ("triton", "bfloat16"),
    pytest.param("hybrid", "bfloat16",
                 marks=pytest.mark.skipif(not HAS_FLASHINFER, reason="flashinfer missing"))])
def test_decode_steps_riding_an_extend_pass_go_to_the_decode_kernel(cut_passes, backend, dtype):
    """Twelve short prompts are decoding when a 1,500-token prompt arrives (chunks of
    128): the pass of its last chunk (which leaves room in the pass's budget) ends in the
    twelve decode steps, which the decode kernel takes (``split_one_token_tail``); the
    tokens are the torch backend's."""
    loaded = load(dtype)
    long = [random.Random(1).randrange(3, CONFIG["vocab_size"]) for _ in range(1500)]
    options = dict(cuda_graphs=False, chunked_prefill_size=128, overlap=False)
    reference = staged_run(loaded, "torch", [long], **options)
    cut_passes.clear()
    other = staged_run(loaded, backend, [long], **options)
    assert any(cut_passes)   # a pass was cut: the prompt to the extend kernel, riders to decode
    assert_same_greedy(reference, other, MARGIN[dtype], new_tokens=NEW_TOKENS_RIDING,
                       min_compared=4 * NEW_TOKENS_RIDING)


@pytest.mark.skipif(not HAS_FLASHINFER, reason="flashinfer missing")
def test_hybrid_extends_queue_behind_decodes_with_riders_in_flight(monkeypatch, cut_passes):
    """The overlapped loop on the hybrid backend (CUDA graphs on): twelve short prompts
    decode when three 300-token prompts arrive; each extend is planned (into the other of
    flashinfer's two prefill wrappers) and launched while the pass before it runs, and
    takes along the decode steps whose tokens are still in flight; the tokens are the
    torch backend's."""
    from aiolm.engine import runner as runner_module
    from aiolm.engine.scheduler import Scheduler

    monkeypatch.setattr(runner_module, "HYBRID_EXTEND_SETTLES", False)
    pending = []
    schedule = Scheduler.schedule

    def counted(self):
        batch = schedule(self)
        if batch is not None and batch.decode_start is not None:
            pending.append(sum(1 for r in batch.reqs[batch.decode_start:] if r.pending))
        return batch

    monkeypatch.setattr(Scheduler, "schedule", counted)
    loaded = load("bfloat16")
    rnd = random.Random(2)
    arrivals = [[rnd.randrange(3, CONFIG["vocab_size"]) for _ in range(300)] for _ in range(3)]
    reference = staged_run(loaded, "torch", arrivals, cuda_graphs=False, overlap=False)
    pending.clear()
    cut_passes.clear()
    other = staged_run(loaded, "hybrid", arrivals, overlap=True)
    assert any(n >= 8 for n in pending)   # decode steps with tokens in flight rode along
    assert any(cut_passes)
    assert_same_greedy(reference, other, MARGIN["bfloat16"], new_tokens=NEW_TOKENS_RIDING,
                       min_compared=4 * NEW_TOKENS_RIDING)


def test_kv_pool_takes_mem_fraction_of_free_memory():
    from aiolm.backends.engine import Engine

    loaded = load("bfloat16")
    cfg = loaded.model_config
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    torch.cuda.empty_cache()
    free_before, _ = torch.cuda.mem_get_info()

    async def main():
        async with Engine(loaded, attention_backend="triton", mem_fraction=0.05,
                          max_running_requests=8) as engine:
            return engine.statistics().total_kv_slots

    slots = anyio.run(main)
    assert 0.9 * 0.05 * free_before <= slots * per_token <= 0.05 * free_before


@pytest.mark.skipif(not HAS_FLASHINFER, reason="flashinfer missing")
def test_the_next_engine_on_a_model_gets_the_same_pool():
    """An engine closes after a pass cut in two (riders at the end of an extend: the
    attention held that batch, and with it the KV pool); the next engine on the same
    LoadedModel sizes its pool from the memory the first gave back (on nvidia-h200 the
    second got 31,210 slots against 218,904 while the model kept the first's attention)."""
    from aiolm.backends.engine import Engine

    loaded = load("bfloat16")
    rnd = random.Random(3)
    arrivals = [[rnd.randrange(3, CONFIG["vocab_size"]) for _ in range(300)]]

    async def pool_size():
        async with Engine(loaded, attention_backend="hybrid", mem_fraction=0.3) as engine:
            return engine.statistics().total_kv_slots

    first = anyio.run(pool_size)
    staged_run(loaded, "hybrid", arrivals, max_total_tokens=None, mem_fraction=0.3,
               overlap=True)
    assert loaded.model.attn is None
    second = anyio.run(pool_size)
    assert abs(first - second) <= 0.02 * first
