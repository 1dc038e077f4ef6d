"""Small extend passes replayed from CUDA graphs give the eager passes' tokens (GPU only).

``extend_graph_tokens`` (default 512) captures extend passes at 32, 64, ... tokens; a pass
whose requests bring at most 64 new tokens each replays the smallest bucket it fits. The
same prompts are run with it and with ``extend_graph_tokens=0`` (eager extends): appends to
cached prompts (short extends over a cached prefix, several requests a pass) and JSON
programs with jump-forward (forced tokens, decode steps riding along). Greedy tokens may part
only where the eager run's top two tokens nearly tie (tests/test_gpu_engine.py's rule).
"""

from __future__ import annotations

import importlib.util
import json
import random

import pytest

torch = pytest.importorskip("torch")
anyio = pytest.importorskip("anyio")

from test_gpu_engine import CONFIG, MARGIN, load  # noqa: E402
from test_gpu_engine import assert_same_greedy as engine_check  # noqa: E402

pytestmark = pytest.mark.gpu

HAS_FLASHINFER = importlib.util.find_spec("flashinfer") is not None
NEW_TOKENS = 16
CASES = [
    ("triton", "float32"),
    pytest.param("hybrid", "bfloat16",
                 marks=pytest.mark.skipif(not HAS_FLASHINFER, reason="flashinfer missing")),
]


def appended(loaded, vocab=CONFIG["vocab_size"], **engine_options):
    """Twelve prompts are cached, then each comes back with 3..60 more tokens, all at once;
    returns the second round's results and how many extend passes replayed a graph."""
    from aiolm.backends.engine import Engine

    rnd = random.Random(1)
    prompts = [[rnd.randrange(3, vocab) for _ in range(rnd.randrange(80, 400))]
               for _ in range(12)]
    longer = [p + [rnd.randrange(3, vocab) for _ in range(rnd.randrange(3, 61))]
              for p in prompts]

    async def main():
        opts = dict(max_total_tokens=32768, max_running_requests=32, device="cuda")
        opts.update(engine_options)
        async with Engine(loaded, **opts) as engine:
            async def run(batch, n, out):
                async def one(i):
                    out[i] = await engine.generate(
                        input_ids=batch[i], max_tokens=n, ignore_eos=True, temperature=0.0,
                        logprobs=True, top_logprobs=5)

                async with anyio.create_task_group() as tg:
                    for i in range(len(batch)):
                        tg.start_soon(one, i)

            first = [None] * len(prompts)
            await run(prompts, 1, first)
            results = [None] * len(longer)
            await run(longer, NEW_TOKENS, results)
            graphs = engine._core.runner.graph_runner  # noqa: SLF001 - what replayed
            return results, graphs.extend_replays if graphs is not None else 0

    return anyio.run(main)


def assert_same_greedy(reference, other, margin):
    """test_gpu_engine's check, with half the tokens of every request agreeing."""
    engine_check(reference, other, margin, new_tokens=NEW_TOKENS,
                 min_compared=len(reference) * NEW_TOKENS // 2)


@pytest.mark.parametrize(("backend", "dtype"), CASES)
def test_short_extends_replay_from_graphs_with_the_eager_tokens(backend, dtype):
    loaded = load(dtype)
    eager, eager_replays = appended(loaded, attention_backend=backend, extend_graph_tokens=0)
    graphed, replays = appended(loaded, attention_backend=backend)
    assert eager_replays == 0
    assert replays >= 1   # the appends' pass at least
    assert_same_greedy(eager, graphed, MARGIN[dtype])


@pytest.mark.parametrize("family", ["mixtral", "qwen3-moe"])
def test_moe_short_extends_replay_from_graphs_with_the_eager_tokens(family, tmp_path):
    """The fused MoE kernels inside an extend graph: routing changes from replay to replay."""
    from test_gpu_moe import _load
    from test_moe import FAMILIES, _hf_model

    _hf_model(FAMILIES[family], seed=4321).save_pretrained(tmp_path, safe_serialization=True)
    loaded = _load(tmp_path, "cuda")
    vocab = FAMILIES[family]["vocab_size"]
    eager, _ = appended(loaded, vocab, attention_backend="triton", extend_graph_tokens=0)
    graphed, replays = appended(loaded, vocab, attention_backend="triton")
    assert replays >= 1
    assert_same_greedy(eager, graphed, MARGIN["float32"])


def json_outputs(loaded, **engine_options):
    """The json-decode workload's small shape: records (text) and graph replays."""
    from aiolm.backends.engine import Engine
    from aiolm.bench import json_decode

    inputs = json_decode.make_inputs("small", 0) * 4

    async def main():
        opts = dict(max_total_tokens=32768, max_running_requests=32, device="cuda",
                    attention_backend="triton")
        opts.update(engine_options)
        async with Engine(loaded, **opts) as engine:
            states = await json_decode.extract_record.run_batch(inputs, backend=engine,
                                                                temperature=0.0)
            graphs = engine._core.runner.graph_runner  # noqa: SLF001
            return [st["record"] for st in states], graphs.extend_replays

    return anyio.run(main), [inp["schema"] for inp in inputs]


def test_json_programs_with_jump_forward_replay_their_forced_tokens_from_graphs():
    from aiolm.bench.dummy_tokenizer import bench_tokenizer
    from aiolm.engine.tokenizer import Tokenizer

    loaded = load("float32")
    loaded.tokenizer = Tokenizer(bench_tokenizer(CONFIG["vocab_size"], seed=0))
    (eager, eager_replays), schemas = json_outputs(loaded, extend_graph_tokens=0)
    (graphed, replays), _ = json_outputs(loaded)
    assert eager_replays == 0 and replays >= 1
    for text, schema in zip(graphed, schemas, strict=True):
        record = json.loads(text)
        assert set(record) == set(schema["properties"])
    same = sum(a == b for a, b in zip(eager, graphed, strict=True))
    assert same >= 0.9 * len(eager), f"only {same} of {len(eager)} records agree"
