"""Loading weights: the embedded SmolLM2 GGUF, sharded HF directories, dummy weights, errors."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import smollm2  # noqa: E402
from model_driver import ModelDriver  # noqa: E402

from aiolm.engine.loader import load_model  # noqa: E402
from aiolm.engine.model_config import NAMED_CONFIGS, SUPPORTED_ARCHITECTURES, ModelConfig  # noqa: E402


@pytest.fixture(scope="module")
def smol():
    return smollm2.model()


def _transformers_reference(config):
    """transformers' LlamaForCausalLM holding the GGUF's tensors, prepared the way
    transformers' own GGUF loader prepares them: the gguf package's dequantize, gguf's
    tensor-name table, and transformers' LlamaTensorProcessor for the Q/K unpermutation.

    (``from_pretrained(dir, gguf_file=...)`` itself does exactly this but takes 40-60 s on
    a 2-core machine, rebuilding gguf's name table once per tensor; too slow for the suite.)
    """
    import gguf
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    hf_config = config.to_hf()
    model_type = hf_config.pop("model_type")
    hf = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(model_type, **hf_config), dtype=torch.float32
    ).eval()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_layers)
    processor = LlamaTensorProcessor(config={"num_attention_heads": config.num_heads,
                                             "num_key_value_heads": config.num_kv_heads})
    tensors = {t.name: t for t in smollm2.gguf_reader().tensors}
    state = {}
    for key in hf.state_dict():
        if key == "lm_head.weight":
            continue  # tied to the embedding
        tensor = tensors[names.get_name(key, try_suffixes=(".weight", ".bias"))]
        weights = gguf.dequantize(tensor.data, tensor.tensor_type)
        weights = processor.process(weights, tensor.name).weights
        state[key] = torch.tensor(weights.copy())
    hf.load_state_dict(state, strict=False)
    return hf


@pytest.mark.slow
def test_smollm2_gguf_logits_match_transformers_on_the_same_tensors(smol):
    """Both sides hold the same float32 weights (the gguf package's dequantization of the
    same blocks), so the only difference is float32 rounding from a different operation
    order (fused projections, our attention) over 30 layers. We allow 1e-4 of the logits'
    scale; the observed difference is ~2e-6 of it (5.8e-5 on logits up to 37; the same
    against ``from_pretrained(gguf_file=...)``, checked by hand)."""
    model, config = smol
    hf = _transformers_reference(config)
    ids = smollm2.tokenizer().encode("The quick brown fox jumps over the lazy dog. Paris is")
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    driver = ModelDriver(model, config)
    logits = driver.extend([(driver.new_request(), ids)])
    scale = ref.abs().max().item()
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.slow
def test_smollm2_answers_the_capital_of_france(smol):
    model, config = smol
    tokenizer = smollm2.tokenizer()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}]
    )
    driver = ModelDriver(model, config)
    [out] = driver.greedy([tokenizer.encode(prompt)], max_new_tokens=24,
                          eos_token_ids=tokenizer.eos_token_ids)
    assert "Paris" in tokenizer.decode(out)


@pytest.mark.slow
def test_smollm2_config_comes_from_gguf_metadata(smol):
    _, config = smol
    assert (config.architecture, config.num_layers, config.hidden_size) == (
        "LlamaForCausalLM", 30, 576)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (9, 3, 64)
    assert config.tie_word_embeddings
    assert config.eos_token_ids == (2,)
    assert config.max_position_embeddings == 8192
    assert config.dtype == "float32"


def _tiny_hf_model(**overrides):
    cfg = dict(NAMED_CONFIGS["tiny-llama"], **overrides)
    cfg.pop("torch_dtype")
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model("llama", **cfg)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def test_sharded_hf_directory_loads_every_shard(tmp_path):
    hf = _tiny_hf_model()
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model, config = load_model(tmp_path)
    ids = list(range(3, 40))
    driver = ModelDriver(model, config)
    logits = driver.extend([(driver.new_request(), ids)])
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-5)


def test_checkpoint_missing_a_weight_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    _tiny_hf_model().save_pretrained(tmp_path, safe_serialization=True)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.qkv_proj\.weight \(k\)"):
        load_model(tmp_path)


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_model(missing)
    with pytest.raises(FileNotFoundError, match=r"no-such\.gguf"):
        load_model(tmp_path / "no-such.gguf")


def test_unknown_architecture_lists_supported_ones(tmp_path):
    config = dict(NAMED_CONFIGS["tiny-llama"], architectures=["GPTNeoXForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    for source, kwargs in ((tmp_path, {}), (config, {"load_format": "dummy"})):
        with pytest.raises(ValueError, match="GPTNeoXForCausalLM") as info:
            load_model(source, **kwargs)
        assert all(arch in str(info.value) for arch in SUPPORTED_ARCHITECTURES)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="load_format"):
        load_model("tiny-llama", load_format="pt")
    with pytest.raises(FileNotFoundError, match="tiny-nothing.*not a named config"):
        load_model("tiny-nothing", load_format="dummy")
    with pytest.raises(FileNotFoundError, match="load_format='dummy'"):
        load_model("tiny-llama")
    with pytest.raises(ValueError, match="dtype"):
        load_model("tiny-llama", load_format="dummy", dtype="int8")


def test_dummy_weights_are_deterministic_by_seed():
    a, _ = load_model("tiny-qwen3", load_format="dummy", seed=1)
    b, _ = load_model("tiny-qwen3", load_format="dummy", seed=1)
    c, _ = load_model("tiny-qwen3", load_format="dummy", seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])


@pytest.mark.parametrize("name", [n for n in NAMED_CONFIGS if n.startswith("tiny-")])
def test_named_dummy_models_run(name):
    model, config = load_model(name, load_format="dummy", dtype="bfloat16")
    assert config.dtype == "bfloat16"
    driver = ModelDriver(model, config)
    logits = driver.extend([(driver.new_request(), [1, 2, 3, 4])], return_logits="last")
    assert logits.shape == (1, config.vocab_size)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_llama_3_8b_preset_has_the_real_shape():
    from aiolm.engine.models import model_class

    config = ModelConfig.named("llama-3-8b")
    with torch.device("meta"):
        model = model_class(config.architecture)(config)
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248
    assert (config.num_layers, config.hidden_size, config.intermediate_size) == (32, 4096, 14336)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (32, 8, 128)
    assert (config.vocab_size, config.rope_theta, config.max_position_embeddings) == (
        128256, 500000.0, 8192)


def test_llama3_rope_scaling_and_qwen_options_are_read_from_hf_configs():
    config = ModelConfig.from_hf({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
        "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192},
        "eos_token_id": [5, 6],
    })
    assert config.rope_theta == 500000.0
    assert config.rope_scaling.rope_type == "llama3" and config.rope_scaling.factor == 32.0
    assert config.eos_token_ids == (5, 6)
    assert config.num_kv_heads == 2 and config.head_dim == 4
    qwen2 = ModelConfig.named("tiny-qwen2")
    assert qwen2.attention_bias and not qwen2.o_bias and qwen2.tie_word_embeddings
    assert ModelConfig.named("tiny-qwen3").qk_norm


def _llama_cpp_permute(weights, n_head):
    """llama.cpp's convert_hf_to_gguf row permutation of Q/K for llama-arch RoPE."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _llama3_rope_freqs(head_dim, theta, scaling):
    """The per-frequency divisors llama.cpp's converter writes for llama3 RoPE scaling."""
    import math

    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(scaling["factor"])
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / scaling["factor"] + smooth))
    return factors


def _write_gguf(path, hf, hf_config, arch):
    """Write ``hf`` as llama.cpp would: F32 tensors, gguf names, Q/K permuted for llama."""
    import gguf
    import numpy as np

    heads, kv_heads = hf_config["num_attention_heads"], hf_config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny test model")
    writer.add_block_count(hf_config["num_hidden_layers"])
    writer.add_context_length(hf_config["max_position_embeddings"])
    writer.add_embedding_length(hf_config["hidden_size"])
    writer.add_feed_forward_length(hf_config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(hf_config["head_dim"])
    writer.add_rope_freq_base(hf_config["rope_theta"])
    writer.add_layer_norm_rms_eps(hf_config["rms_norm_eps"])
    writer.add_vocab_size(hf_config["vocab_size"])
    writer.add_eos_token_id(hf_config["eos_token_id"])
    writer.add_eot_token_id(7)
    writer.add_bos_token_id(hf_config["bos_token_id"])
    names = gguf.get_tensor_name_map(
        {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
         "qwen3": gguf.MODEL_ARCH.QWEN3}[arch], hf_config["num_hidden_layers"])
    for key, tensor in hf.state_dict().items():
        if key == "lm_head.weight" and hf_config["tie_word_embeddings"]:
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        data = tensor.numpy().copy()
        if arch == "llama" and ".attn_q." in name:
            data = _llama_cpp_permute(data, heads)
        elif arch == "llama" and ".attn_k." in name:
            data = _llama_cpp_permute(data, kv_heads)
        writer.add_tensor(name, data)
    scaling = hf_config.get("rope_scaling")
    if scaling:
        writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
        writer.add_tensor("rope_freqs.weight", np.array(_llama3_rope_freqs(
            hf_config["head_dim"], hf_config["rope_theta"], scaling), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(("named", "arch"), [
    ("tiny-llama", "llama"), ("tiny-llama3", "llama"), ("tiny-qwen2", "qwen2"),
    ("tiny-qwen3", "qwen3"),
])
def test_gguf_in_llama_cpp_layout_matches_transformers(tmp_path, named, arch):
    """Q/K permutation undone, biases, q/k norms, tied heads and llama3 rope_freqs."""
    hf_config = dict(NAMED_CONFIGS[named])
    hf_config.pop("torch_dtype")
    torch.manual_seed(0)
    model_type = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}[arch]
    hf = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(model_type, **hf_config), dtype=torch.float32
    ).eval()
    with torch.no_grad():
        for param in hf.parameters():
            param.normal_(0.0, 0.15)
    _write_gguf(tmp_path / "model.gguf", hf, hf_config, arch)
    model, config = load_model(tmp_path / "model.gguf")
    assert config.eos_token_ids == (hf_config["eos_token_id"], 7)
    assert config.tie_word_embeddings == hf_config["tie_word_embeddings"]
    assert config.rope_scaling == ModelConfig.from_hf(hf_config).rope_scaling
    ids = list(range(3, 70))
    driver = ModelDriver(model, config)
    logits = driver.extend([(driver.new_request(), ids)])
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
