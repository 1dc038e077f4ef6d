"""Shared-prefix decode in the engine on a GPU: replayed from CUDA graphs, it gives the
tokens of plain decode (``shared_prefix_min_tokens``, aiolm/engine/shared_prefix.py).

28 requests decode together: 18 behind one 1,500-token trunk (more than a group holds, so
two groups), 5 behind a 700-token trunk, 3 behind a 300-token one, 2 alone. The trunks are
cached first, so every step of the batch groups them; the batch of 28 replays the 32-request
bucket's grouped graph (4 padding rows, groups short of the bucket's capacity).
"""

from __future__ import annotations

import random

import pytest
from test_gpu_engine import MARGIN, load

torch = pytest.importorskip("torch")
anyio = pytest.importorskip("anyio")

pytestmark = pytest.mark.gpu

NEW_TOKENS = 16


def run(loaded, **options):
    """Greedy completions of every request, and the prefix-group counts of the grouped
    decode passes (replayed from a graph, or eager)."""
    from aiolm.backends.engine import Engine

    rnd = random.Random(3)
    trunks = [[rnd.randrange(3, 2048) for _ in range(n)] for n in (1500, 700, 300)]
    prompts = [trunk + [rnd.randrange(3, 2048) for _ in range(rnd.randrange(1, 40))]
               for trunk, count in zip(trunks, (18, 5, 3), strict=True) for _ in range(count)]
    prompts += [[rnd.randrange(3, 2048) for _ in range(n)] for n in (90, 1200)]

    async def main():
        grouped: list[tuple[str, int]] = []
        async with Engine(loaded, device="cuda", attention_backend="triton",
                          max_total_tokens=65536, max_running_requests=32, **options) as eng:
            runner = eng._core.runner
            forward, replay = runner.model.forward, None
            if runner.graph_runner is not None:
                replay = runner.graph_runner.replay

                def spy_replay(fb, replay=replay):
                    if fb.prefix_groups is not None:
                        grouped.append(("graph", fb.prefix_groups.count))
                    return replay(fb)

                runner.graph_runner.replay = spy_replay

            def spy_forward(fb, forward=forward):
                if fb.prefix_groups is not None:
                    grouped.append(("eager", fb.prefix_groups.count))
                return forward(fb)

            runner.model.forward = spy_forward   # the instance's: removed below
            try:
                return await serve(eng, results=[None] * len(prompts)), grouped
            finally:
                del runner.model.forward

    async def serve(eng, results):
        for trunk in trunks:   # cached first: every step of the batch groups them
            await eng.generate(input_ids=trunk, max_tokens=1, temperature=0.0)

        async def one(i):
            results[i] = await eng.generate(
                input_ids=prompts[i], max_tokens=NEW_TOKENS, ignore_eos=True,
                temperature=0.0, logprobs=True, top_logprobs=5)

        async with anyio.create_task_group() as tg:
            for i in range(len(prompts)):
                tg.start_soon(one, i)
        report = await eng.check_integrity()
        assert report.idle and report.request_slots == 0 and report.locked_tokens == 0
        return results

    return anyio.run(main)


def assert_same(reference, other, margin):
    """Greedy tokens equal, but where the reference's top two (nearly) tie."""
    for ref, got in zip(reference, other, strict=True):
        assert len(got.token_ids) == NEW_TOKENS
        for i, (a, b) in enumerate(zip(ref.token_ids, got.token_ids, strict=True)):
            if a != b:
                top = {tid: lp for tid, _text, lp in ref.logprobs[i].top}
                assert b in top and top[a] - top[b] <= margin, (i, a, b, top)
                break


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_grouped_decode_replays_from_graphs_with_plain_decodes_tokens(dtype):
    loaded = load(dtype)
    plain, none = run(loaded, cuda_graphs=True)
    graphed, grouped = run(loaded, cuda_graphs=True, shared_prefix_min_tokens=256)
    eager, grouped_eager = run(loaded, cuda_graphs=False, shared_prefix_min_tokens=256)
    assert none == []
    # Every grouped step replayed a graph; the full batch holds four groups (18 = 16 + 2).
    assert grouped and {where for where, _ in grouped} == {"graph"}
    assert max(count for _, count in grouped) >= 3
    assert grouped_eager and {where for where, _ in grouped_eager} == {"eager"}
    assert_same(plain, graphed, MARGIN[dtype])
    assert_same(plain, eager, MARGIN[dtype])
    if dtype == "float32":   # exact arithmetic but the summation order: the same tokens
        assert [r.token_ids for r in graphed] == [r.token_ids for r in plain]


def test_a_multi_head_model_groups_its_long_prefixes_by_default():
    """``shared_prefix_min_tokens=None`` (the default) is on for a model with as many KV
    heads as query heads: only the 1,500-token trunk is long enough (at least
    ``AUTO_MIN_TOKENS``), its 18 requests in two groups; 0 turns it off."""
    from test_gpu_engine import CONFIG, DEVICE

    from aiolm.backends.engine import LoadedModel
    from aiolm.engine.loader import load_model
    from aiolm.engine.shared_prefix import AUTO_MIN_TOKENS

    config = dict(CONFIG, num_key_value_heads=CONFIG["num_attention_heads"],
                  torch_dtype="bfloat16")
    model, model_config = load_model(config, load_format="dummy", dtype="bfloat16",
                                     device=DEVICE, seed=0)
    loaded = LoadedModel(model=model, model_config=model_config, tokenizer=None,
                         device=torch.device(DEVICE), source="gpu-test-mha",
                         load_format="dummy")
    assert 700 < AUTO_MIN_TOKENS <= 1500
    default, grouped = run(loaded, cuda_graphs=True)
    off, none = run(loaded, cuda_graphs=True, shared_prefix_min_tokens=0)
    assert none == []
    assert grouped and {where for where, _ in grouped} == {"graph"}
    assert max(count for _, count in grouped) == 2
    assert_same(off, default, MARGIN["bfloat16"])
