"""Mixture-of-Experts models (Mixtral, Qwen3-MoE) against transformers, float32, on the CPU.

As tests/test_models_parity.py does for the dense families: each family's transformers
model gets random weights, is saved with ``save_pretrained`` (transformers writes the
per-expert hub layout) and loaded through our loader; logits must agree within 1e-4
relative to their scale for prefill, decode, a cached prefix and mixed batches, and greedy
generation must match ``generate``. Then the pieces: the routers' renormalisation per
family, the plain torch expert loop against a per-token reference (empty experts too), the
weight loader's layouts and errors, the named configs, and the Triton kernels of the CUDA
path under Triton's interpreter.
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from model_driver import ModelDriver, randomize_weights  # noqa: E402
from test_models_parity import _reference, _tokens, assert_logits_close  # noqa: E402

from aiolm.engine.layers.fused_moe import FusedMoE, torch_experts, torch_route  # noqa: E402
from aiolm.engine.loader import load_model  # noqa: E402
from aiolm.engine.model_config import NAMED_CONFIGS, ModelConfig  # noqa: E402

FAMILIES = {
    "mixtral": dict(NAMED_CONFIGS["tiny-mixtral"]),
    "qwen3-moe": dict(NAMED_CONFIGS["tiny-qwen3-moe"]),
    # Dense layers: 0 and 2 by decoder_sparse_step, 3 by mlp_only_layers; no renormalisation.
    "qwen3-moe-dense-layers": dict(NAMED_CONFIGS["tiny-qwen3-moe"], num_hidden_layers=4,
                                   decoder_sparse_step=2, mlp_only_layers=[3],
                                   norm_topk_prob=False, num_experts_per_tok=3),
}
MODEL_TYPES = {"MixtralForCausalLM": "mixtral", "Qwen3MoeForCausalLM": "qwen3_moe"}
SEQ_LEN = 40


def _hf_model(hf_config: dict, seed: int):
    cfg = dict(hf_config)
    model_type = MODEL_TYPES[cfg["architectures"][0]]
    cfg.pop("torch_dtype", None)
    config = transformers.AutoConfig.for_model(model_type, **cfg)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return randomize_weights(model, normal={"gate.weight": 0.5})


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    """(transformers model, our model, our config) with the same weights."""
    hf = _hf_model(FAMILIES[request.param], seed=4321)
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory, safe_serialization=True)
    ours, config = load_model(directory, dtype="float32")
    return hf, ours, config


def test_prefill_logits_match_transformers(pair):
    hf, ours, config = pair
    ids = _tokens(config, SEQ_LEN, seed=1)
    driver = ModelDriver(ours, config)
    assert_logits_close(driver.extend([(driver.new_request(), ids)]), _reference(hf, ids))


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
    driver.extend([(first, ids[:25] + _tokens(config, 10, seed=6))])
    second = driver.new_request(share_prefix_of=first, prefix_len=25)
    assert_logits_close(driver.extend([(second, ids[25:])]), _reference(hf, ids)[25:])


def test_mixed_batches_match_transformers(pair):
    hf, ours, config = pair
    seqs = [_tokens(config, n, seed=10 + n) for n in (5, 31, 18)]
    refs = [_reference(hf, s) for s in seqs]
    driver = ModelDriver(ours, config)
    rows = [driver.new_request() for _ in seqs]
    logits = driver.extend([(rows[0], seqs[0][:4]), (rows[1], seqs[1][:30]),
                            (rows[2], seqs[2][:9])])
    assert_logits_close(logits, torch.cat([refs[0][:4], refs[1][:30], refs[2][:9]]))
    logits = driver.extend([(rows[2], seqs[2][9:]), (rows[1], seqs[1][30:31])])
    assert_logits_close(logits, torch.cat([refs[2][9:], refs[1][30:31]]))
    logits = driver.decode([(rows[0], seqs[0][4]), (rows[2], _tokens(config, 1, seed=99)[0])])
    assert_logits_close(logits[0], refs[0][4])
    assert_logits_close(logits[1], _reference(hf, seqs[2] + _tokens(config, 1, seed=99))[-1])


def test_greedy_generation_matches_transformers_generate(pair):
    hf, ours, config = pair
    prompts = [_tokens(config, 12, seed=20), _tokens(config, 5, seed=21)]
    expected = []
    for prompt in prompts:
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16,
                              attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        expected.append(out[0, len(prompt):].tolist())
    assert all(len(e) == 16 for e in expected)
    assert ModelDriver(ours, config).greedy(prompts, max_new_tokens=16) == expected


def test_sparse_and_dense_layers_follow_the_config(pair):
    _hf, ours, config = pair
    kinds = [type(layer.mlp).__name__ for layer in ours.model.layers]
    expected = ["SparseMoeBlock" if config.is_sparse_layer(i) else "LlamaMLP"
                for i in range(config.num_layers)]
    assert kinds == expected
    if config.num_layers == 4:
        assert expected == ["LlamaMLP", "SparseMoeBlock", "LlamaMLP", "LlamaMLP"]


# ----------------------------------------------------------------------- weight loading


def _saved(tmp_path, hf, state: dict) -> str:
    from safetensors.torch import save_file

    hf.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    return str(tmp_path)


def test_the_fused_in_memory_layout_loads_too(tmp_path):
    """transformers 5's in-memory names (experts packed, router at ``mlp.gate``)."""
    hf = _hf_model(FAMILIES["mixtral"], seed=7)
    state = dict(hf.state_dict())
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    ours, config = load_model(_saved(tmp_path, hf, state), dtype="float32")
    ids = _tokens(config, 20, seed=3)
    driver = ModelDriver(ours, config)
    assert_logits_close(driver.extend([(driver.new_request(), ids)]), _reference(hf, ids))


def _per_expert_state(hf) -> dict:
    """The hub layout of a Mixtral model (what ``save_pretrained`` writes)."""
    state = {}
    for name, tensor in hf.state_dict().items():
        if ".mlp.experts.gate_up_proj" in name:
            prefix = name.replace(".mlp.experts.gate_up_proj", ".block_sparse_moe.experts")
            for e, packed in enumerate(tensor):
                gate, up = packed.chunk(2)
                state[f"{prefix}.{e}.w1.weight"] = gate
                state[f"{prefix}.{e}.w3.weight"] = up
        elif ".mlp.experts.down_proj" in name:
            prefix = name.replace(".mlp.experts.down_proj", ".block_sparse_moe.experts")
            for e, packed in enumerate(tensor):
                state[f"{prefix}.{e}.w2.weight"] = packed
        else:
            state[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = tensor
    return state


def test_a_missing_expert_is_named(tmp_path):
    hf = _hf_model(FAMILIES["mixtral"], seed=7)
    state = _per_expert_state(hf)
    del state["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.experts\.gate_up_proj: 2\.up"):
        load_model(_saved(tmp_path, hf, state), dtype="float32")


def test_a_misshapen_or_stray_expert_is_refused(tmp_path):
    hf = _hf_model(FAMILIES["mixtral"], seed=7)
    state = _per_expert_state(hf)
    state["model.layers.0.block_sparse_moe.experts.1.w2.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"experts\.1\.w2\.weight: checkpoint shape \(3, 3\)"):
        load_model(_saved(tmp_path / "a", hf, state), dtype="float32")
    state = _per_expert_state(hf)
    state["model.layers.0.block_sparse_moe.experts.9.w1.weight"] = torch.zeros(128, 64)
    with pytest.raises(ValueError, match="expert 9 out of range"):
        load_model(_saved(tmp_path / "b", hf, state), dtype="float32")


# ------------------------------------------------------------------------------ routing


def test_mixtral_router_renormalises_like_transformers():
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    config = transformers.MixtralConfig(hidden_size=16, num_local_experts=8,
                                        num_experts_per_tok=2)
    router = MixtralTopKRouter(config)
    torch.manual_seed(0)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(33, 16)
    _, ref_weights, ref_ids = router(x)
    weights, ids = torch_route(x @ router.weight.T, 2, renormalize=True)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights)
    torch.testing.assert_close(weights.sum(-1), torch.ones(33))


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_qwen3_moe_router_follows_norm_topk_prob(norm_topk_prob):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    config = transformers.Qwen3MoeConfig(hidden_size=16, num_experts=16, num_experts_per_tok=4,
                                         norm_topk_prob=norm_topk_prob)
    router = Qwen3MoeTopKRouter(config)
    torch.manual_seed(1)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(21, 16)
    _, ref_weights, ref_ids = router(x)
    weights, ids = torch_route(x @ router.weight.T, 4, renormalize=norm_topk_prob)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights)
    sums = weights.sum(-1)
    if norm_topk_prob:
        torch.testing.assert_close(sums, torch.ones(21))
    else:  # the raw softmax probabilities of the chosen experts
        assert (sums < 1).all()


# ------------------------------------------------------------------ the torch expert loop


def naive_experts(x, w13, w2, weights, ids):
    """Token by token, expert by expert: the definition."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    inter = w13.shape[1] // 2
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            h = x[t].double()
            gate = w13[e, :inter].double() @ h
            up = w13[e, inter:].double() @ h
            out[t] += float(weights[t, k]) * (w2[e].double() @ (torch.nn.functional.silu(gate) * up))
    return out


def random_experts(num_experts, hidden, inter, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) * 0.2).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=gen) * 0.2).to(dtype)
    return w13, w2


def skewed_routing(tokens, num_experts, top_k, used, seed):
    """Routing that only ever picks experts in ``used`` (the others stay empty)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, num_experts, generator=gen)
    mask = torch.full((num_experts,), float("-inf"))
    mask[list(used)] = 0.0
    return torch_route(logits + mask, top_k, renormalize=True)


@pytest.mark.parametrize(("tokens", "num_experts", "top_k", "used"), [
    (1, 4, 2, range(4)), (9, 8, 2, (1, 5)), (17, 8, 1, (0, 3, 7)), (6, 16, 4, range(0, 16, 3)),
])
def test_torch_experts_match_a_per_token_reference(tokens, num_experts, top_k, used):
    w13, w2 = random_experts(num_experts, 24, 20, seed=tokens)
    x = torch.randn(tokens, 24, generator=torch.Generator().manual_seed(3))
    weights, ids = skewed_routing(tokens, num_experts, top_k, used, seed=tokens)
    assert set(ids.unique().tolist()) <= set(used)
    out = torch_experts(x, w13, w2, weights, ids)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), naive_experts(x, w13, w2, weights, ids),
                               rtol=1e-5, atol=1e-5)


def test_expert_arguments_that_do_not_fit_are_refused():
    w13, w2 = random_experts(4, 8, 6, seed=0)
    weights, ids = torch_route(torch.randn(3, 4), 2, renormalize=True)
    with pytest.raises(ValueError, match="do not fit"):
        torch_experts(torch.randn(3, 9), w13, w2, weights, ids)
    with pytest.raises(ValueError, match=r"must both be \[3, top_k\]"):
        torch_experts(torch.randn(3, 8), w13, w2, weights[:2], ids[:2])
    with pytest.raises(ValueError, match="top_k: must be between 1 and the 4 experts"):
        from aiolm.engine.layers.fused_moe import route

        route(torch.randn(3, 4), 5, renormalize=True)
    module = FusedMoE(4, 8, 6)
    assert module.gate_up_proj.shape == (4, 12, 8) and module.down_proj.shape == (4, 8, 6)


# --------------------------------------------------------------------- configs and models


def test_hub_configs_read_the_expert_fields():
    mixtral = ModelConfig.named("mixtral-8x7b")
    assert (mixtral.num_experts, mixtral.num_experts_per_tok, mixtral.moe_intermediate_size,
            mixtral.norm_topk_prob) == (8, 2, 14336, True)
    qwen = ModelConfig.from_hf(dict(NAMED_CONFIGS["qwen3-30b-a3b"], norm_topk_prob=False))
    assert (qwen.num_experts, qwen.num_experts_per_tok, qwen.moe_intermediate_size,
            qwen.norm_topk_prob, qwen.qk_norm) == (128, 8, 768, False, True)
    for name in ("tiny-mixtral", "tiny-qwen3-moe", "mixtral-8x7b", "qwen3-30b-a3b"):
        config = ModelConfig.named(name)
        assert ModelConfig.from_hf(config.to_hf()) == config
    with pytest.raises(ValueError, match="num_experts_per_tok: must be between 1 and"):
        ModelConfig.from_hf(dict(NAMED_CONFIGS["tiny-mixtral"], num_experts_per_tok=5))
    with pytest.raises(ValueError, match="num_experts: a Qwen3-MoE config must give"):
        cfg = dict(NAMED_CONFIGS["tiny-qwen3-moe"])
        del cfg["num_experts"]
        ModelConfig.from_hf(cfg)


@pytest.mark.parametrize(("name", "billions"), [
    ("mixtral-8x7b", 46.70), ("qwen3-30b-a3b", 30.53), ("llama-3-70b", 70.55),
])
def test_named_configs_build_the_published_parameter_counts(name, billions):
    from aiolm.engine.models import model_class

    config = ModelConfig.named(name)
    with torch.device("meta"):
        model = model_class(config.architecture)(config)
    params = sum(p.numel() for p in model.parameters())
    assert params / 1e9 == pytest.approx(billions, abs=0.01)


def test_moe_models_refuse_tensor_parallelism():
    from aiolm.engine.models.moe import MoEForCausalLM
    from aiolm.engine.parallel import TPGroup

    with torch.device("meta"), pytest.raises(ValueError, match="tp_size: Mixture-of-Experts"):
        MoEForCausalLM(ModelConfig.named("tiny-mixtral"), tp=TPGroup(rank=0, size=2))
    with pytest.raises(ValueError, match="tp_size: tensor parallelism runs the dense Llama"):
        load_model("tiny-mixtral", load_format="dummy", tp=TPGroup(rank=0, size=2))


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-qwen3-moe"])
def test_dummy_models_run_through_the_engine(name):
    """The architecture is registered end to end: the engine's greedy tokens on a dummy
    model equal the driver's over the same weights."""
    import anyio

    from aiolm.backends.engine import Engine, LoadedModel

    loaded = LoadedModel.load(name, load_format="dummy", device="cpu", seed=0)
    prompt = _tokens(loaded.model_config, 9, seed=2)

    async def run() -> list[int]:
        async with Engine(loaded, max_total_tokens=512) as engine:
            done = await engine.generate(input_ids=prompt, max_tokens=8, ignore_eos=True)
            return list(done.token_ids)

    tokens = anyio.run(run)
    driver = ModelDriver(loaded.model, loaded.model_config)
    assert tokens == driver.greedy([prompt], max_new_tokens=8)[0]


# ------------------------------------------------- the CUDA path's kernels, interpreted


@pytest.fixture(scope="module")
def kernels():
    """aiolm.engine.layers.fused_moe_kernels under Triton's interpreter (CPU tensors)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("interpreter tests run without a GPU; tests/test_gpu_moe.py runs there")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 must be set before triton is imported (tests/conftest.py)")
    from aiolm.engine.layers import fused_moe_kernels

    return fused_moe_kernels


@pytest.mark.parametrize(("tokens", "num_experts", "top_k", "renormalize"), [
    (1, 4, 2, True), (13, 8, 2, True), (5, 6, 3, False), (3, 128, 8, True),
])
def test_route_kernel_matches_torch(kernels, tokens, num_experts, top_k, renormalize):
    logits = torch.randn(tokens, num_experts, generator=torch.Generator().manual_seed(tokens))
    weights, ids = kernels.route(logits, top_k, renormalize)
    ref_weights, ref_ids = torch_route(logits, top_k, renormalize)
    assert ids.dtype == torch.int32 and torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(weights, ref_weights)


@pytest.mark.parametrize(("tokens", "num_experts", "top_k", "used", "block_m"), [
    (1, 8, 2, range(8), 16), (20, 8, 2, (2, 6), 16), (40, 4, 3, range(4), 32),
    (7, 64, 8, range(0, 64, 5), 16),
])
def test_alignment_lays_each_experts_assignments_in_whole_blocks(
        kernels, tokens, num_experts, top_k, used, block_m):
    _weights, ids = skewed_routing(tokens, num_experts, top_k, used, seed=tokens)
    sorted_ids, expert_ids, num_padded = kernels.align_by_expert(ids, num_experts, block_m)
    flat = ids.reshape(-1)
    n = flat.numel()
    counts = torch.bincount(flat, minlength=num_experts)
    padded = ((counts + block_m - 1) // block_m * block_m)
    assert num_padded.item() == padded.sum().item()
    assert sorted_ids.numel() == kernels.align_capacity(n, num_experts, block_m)
    used_slots = sorted_ids[:num_padded.item()]
    real = used_slots[used_slots < n]
    assert sorted(real.tolist()) == list(range(n))  # every assignment exactly once
    assert (sorted_ids[num_padded.item():] == n).all()
    for block in range(num_padded.item() // block_m):
        rows = used_slots[block * block_m:(block + 1) * block_m]
        rows = rows[rows < n]
        assert len(rows) > 0  # no block of an empty expert
        assert (flat[rows.long()] == expert_ids[block]).all()
        assert rows.tolist() == sorted(rows.tolist())  # token order within an expert


@pytest.mark.parametrize(("tokens", "num_experts", "top_k", "used", "dtype"), [
    (1, 4, 2, range(4), torch.float32), (9, 8, 2, (1, 5), torch.float32),
    (40, 8, 1, (0, 3, 7), torch.float32), (5, 16, 4, range(16), torch.bfloat16),
])
def test_fused_experts_match_the_torch_loop_interpreted(kernels, tokens, num_experts, top_k,
                                                        used, dtype):
    w13, w2 = random_experts(num_experts, 32, 24, seed=tokens, dtype=dtype)
    x = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(5)).to(dtype)
    weights, ids = skewed_routing(tokens, num_experts, top_k, used, seed=tokens)
    out = kernels.fused_experts(x, w13, w2, weights, ids)
    ref = torch_experts(x, w13, w2, weights, ids)
    scale = ref.abs().max().item()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol * scale)


# ---------------------------------------------------------------------------- roofline


def test_moe_decode_roofline_counts_only_the_touched_experts():
    from aiolm.bench.limits import add_roofline_figures, expected_experts_touched, weight_figures
    from aiolm.engine.models import model_class

    assert expected_experts_touched(8, 2, 1) == pytest.approx(2.0)
    assert expected_experts_touched(8, 2, 2) == pytest.approx(8 * (1 - 0.75 ** 2))
    assert expected_experts_touched(128, 8, 10_000) == pytest.approx(128.0)
    config = ModelConfig.named("mixtral-8x7b")
    with torch.device("meta"):
        model = model_class(config.architecture)(config).to(torch.bfloat16)
    figures = weight_figures(model)
    layer = config.hidden_size * config.moe_intermediate_size * 3 * 2  # one expert, bf16
    expert_bytes = config.num_layers * config.num_experts * layer
    embedding = config.vocab_size * config.hidden_size * 2   # untied: one row read a step
    assert figures["weight_bytes"] == 2 * figures["parameters"]
    assert figures["decode_weight_bytes"] == pytest.approx(
        figures["weight_bytes"] - embedding - expert_bytes * 6 / 8)
    assert figures["active_parameters"] / 1e9 == pytest.approx(12.88, abs=0.01)
    assert weight_figures(model, decode_batch_size=64)["decode_weight_bytes"] == pytest.approx(
        figures["weight_bytes"] - embedding, rel=1e-6)
    record = {"name": "decode-bs1", "runs": {"engine": {"output_tok_per_s": 100.0}}}
    add_roofline_figures(record, {"copy_bandwidth_gbps": 4000.0}, figures)
    run = record["runs"]["engine"]
    assert run["bandwidth_roofline_tok_per_s"] == pytest.approx(
        4000e9 / figures["decode_weight_bytes"])
    dense = weight_figures(torch.nn.Linear(4, 4))
    assert set(dense) == {"parameters", "weight_bytes", "decode_weight_bytes"}
    assert dense["decode_weight_bytes"] == dense["weight_bytes"]


@pytest.mark.parametrize("tied", [False, True])
def test_decode_roofline_leaves_out_an_embedding_table_the_head_does_not_read(tied):
    """A decode step reads one row of an untied embedding table; a tied one is the LM
    head, read whole."""
    import attrs

    from aiolm.bench.limits import weight_figures
    from aiolm.engine.models import model_class

    config = attrs.evolve(ModelConfig.named("llama-3-8b"), tie_word_embeddings=tied)
    with torch.device("meta"):
        model = model_class(config.architecture)(config).to(torch.bfloat16)
    figures = weight_figures(model)
    embedding = config.vocab_size * config.hidden_size * 2
    assert figures["decode_weight_bytes"] == figures["weight_bytes"] - (0 if tied else embedding)
