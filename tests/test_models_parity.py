"""Our Llama-family model against transformers, float32, on tiny random models.

Each family's transformers model gets random weights (norm weights and biases included, so
a mis-mapped tensor shows), is saved with ``save_pretrained`` and loaded through our loader
(the HF-directory path). Logits must agree within 1e-4 relative to the logits' scale in
every way a request reaches the model: prefill, decode, cached prefix, chunked prefill,
mixed batches; greedy generation must produce the same tokens as ``generate``.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from model_driver import ModelDriver, randomize_weights  # noqa: E402

from aiolm.engine.loader import load_model  # noqa: E402
from aiolm.engine.model_config import NAMED_CONFIGS  # noqa: E402

FAMILIES = {
    "llama": dict(NAMED_CONFIGS["tiny-llama"]),
    "llama-tied-bias": dict(NAMED_CONFIGS["tiny-llama"], tie_word_embeddings=True,
                            attention_bias=True),
    "llama3-rope-scaling": dict(NAMED_CONFIGS["tiny-llama3"]),
    "mistral": dict(NAMED_CONFIGS["tiny-mistral"]),
    "qwen2-tied": dict(NAMED_CONFIGS["tiny-qwen2"]),
    "qwen3": dict(NAMED_CONFIGS["tiny-qwen3"]),
}
MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
               "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
SEQ_LEN = 48


def _hf_model(hf_config: dict, seed: int):
    cfg = dict(hf_config)
    model_type = MODEL_TYPES[cfg["architectures"][0]]
    cfg.pop("torch_dtype", None)
    config = transformers.AutoConfig.for_model(model_type, **cfg)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return randomize_weights(model)


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    """(transformers model, our model, our config) with the same weights."""
    hf = _hf_model(FAMILIES[request.param], seed=1234)
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory, safe_serialization=True)
    ours, config = load_model(directory, dtype="float32")
    return hf, ours, config


def _reference(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def _tokens(config, n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, config.vocab_size, (n,), generator=gen).tolist()


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    assert scale > 1.0  # the random weights give logits of a meaningful size
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * scale)


def test_prefill_logits_match_transformers(pair):
    hf, ours, config = pair
    ids = _tokens(config, SEQ_LEN, seed=1)
    driver = ModelDriver(ours, config)
    logits = driver.extend([(driver.new_request(), ids)])
    assert logits.dtype == torch.float32
    assert_logits_close(logits, _reference(hf, ids))


def test_last_logits_are_the_last_token_of_each_request(pair):
    hf, ours, config = pair
    a, b = _tokens(config, 20, seed=2), _tokens(config, 7, seed=3)
    driver = ModelDriver(ours, config)
    logits = driver.extend([(driver.new_request(), a), (driver.new_request(), b)],
                           return_logits="last")
    assert logits.shape == (2, config.vocab_size)
    assert_logits_close(logits[0], _reference(hf, a)[-1])
    assert_logits_close(logits[1], _reference(hf, b)[-1])


def test_step_by_step_decode_matches_transformers(pair):
    hf, ours, config = pair
    ids = _tokens(config, SEQ_LEN, seed=4)
    ref = _reference(hf, ids)
    driver = ModelDriver(ours, config)
    row = driver.new_request()
    driver.extend([(row, ids[:8])])
    steps = [driver.decode([(row, tok)])[0] for tok in ids[8:]]
    assert_logits_close(torch.stack(steps), ref[8:])


def test_extend_over_a_cached_prefix_matches_transformers(pair):
    hf, ours, config = pair
    ids = _tokens(config, SEQ_LEN, seed=5)
    driver = ModelDriver(ours, config)
    first = driver.new_request()
    driver.extend([(first, ids[:30] + _tokens(config, 10, seed=6))])
    second = driver.new_request(share_prefix_of=first, prefix_len=30)
    logits = driver.extend([(second, ids[30:])])
    assert_logits_close(logits, _reference(hf, ids)[30:])


def test_chunked_prefill_matches_transformers(pair):
    hf, ours, config = pair
    ids = _tokens(config, SEQ_LEN, seed=7)
    driver = ModelDriver(ours, config)
    row = driver.new_request()
    chunks = [driver.extend([(row, ids[:17])]), driver.extend([(row, ids[17:])])]
    assert_logits_close(torch.cat(chunks), _reference(hf, ids))


def test_mixed_batches_of_different_lengths_match_transformers(pair):
    hf, ours, config = pair
    seqs = [_tokens(config, n, seed=10 + n) for n in (5, 33, 18)]
    refs = [_reference(hf, s) for s in seqs]
    driver = ModelDriver(ours, config)
    rows = [driver.new_request() for _ in seqs]
    # One extend batch: the first two requests from scratch, the third's first part.
    logits = driver.extend([(rows[0], seqs[0][:4]), (rows[1], seqs[1][:30]),
                            (rows[2], seqs[2][:9])])
    assert_logits_close(logits, torch.cat([refs[0][:4], refs[1][:30], refs[2][:9]]))
    # A mixed extend: one request finishing its prompt with a prefix in the pool.
    logits = driver.extend([(rows[2], seqs[2][9:]), (rows[1], seqs[1][30:32])])
    assert_logits_close(logits, torch.cat([refs[2][9:], refs[1][30:32]]))
    # A decode batch over sequences of lengths 5, 33 and 18.
    logits = driver.decode([(rows[0], seqs[0][4]), (rows[1], seqs[1][32]),
                            (rows[2], _tokens(config, 1, seed=99)[0])])
    assert_logits_close(logits[0], refs[0][4])
    assert_logits_close(logits[1], refs[1][32])
    tail = _reference(hf, seqs[2] + _tokens(config, 1, seed=99))[-1]
    assert_logits_close(logits[2], tail)


def test_greedy_generation_matches_transformers_generate(pair):
    hf, ours, config = pair
    prompts = [_tokens(config, 12, seed=20), _tokens(config, 5, seed=21)]
    expected = []
    for prompt in prompts:
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32,
                              attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        expected.append(out[0, len(prompt):].tolist())
    driver = ModelDriver(ours, config)
    assert driver.greedy(prompts, max_new_tokens=32) == expected
    assert all(len(e) == 32 for e in expected)
