"""Weight-only int8/int4 layers on the CPU, the GGUF Q4_1 mapping, and the option.

Tolerances (relative error of a layer's output, ``|y - ref| / |ref|`` over the whole
output), per scheme:

- against the float weight the layer *stands for* (its codes times its scales, as the
  kernel sees them): 1e-2 for both schemes. What is left is the bfloat16 rounding of the
  input and the output (2^-9 each; ~2e-3 observed).
- against the original float weight (the quantization's own error on N(0, 1) weights):
  int8 per row 2e-2 (~1e-2 observed), int4 in groups of 32 1.5e-1 (~8e-2 observed).
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import smollm2  # noqa: E402
from model_driver import ModelDriver  # noqa: E402

from aiolm.engine.config import EngineConfig  # noqa: E402
from aiolm.engine.layers import MergedLinear  # noqa: E402
from aiolm.engine.layers.quant import (  # noqa: E402
    INT4_GROUP,
    Int4Codes,
    Int4Linear,
    Int8Linear,
    int4_codes,
    quantize_model,
)
from aiolm.engine.loader import load_model, resolve_quantization  # noqa: E402


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def weight_and_input(n: int = 192, k: int = 576, m: int = 5):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, k, generator=gen), torch.randn(m, k, generator=gen)


def int4_reference(codes: Int4Codes) -> torch.Tensor:
    """The weight an ``Int4Linear`` multiplies by: scale and zero rounded to bfloat16, as
    the kernel's ``(q - 8) * scale + zero`` takes them."""
    n, k = codes.shape
    scale = bf16(codes.scale)
    zero = bf16(codes.offset + 8 * codes.scale)
    groups = codes.codes.view(n, k // INT4_GROUP, INT4_GROUP).float()
    return ((groups - 8) * scale[..., None] + zero[..., None]).view(n, k)


def test_int8_layer_matches_its_dequantized_weight():
    w, x = weight_and_input()
    layer = Int8Linear.from_float(w)
    assert layer.weight.dtype == torch.int8 and layer.scales.shape == (192,)
    dequantized = layer.weight.float() * layer.scales.float()[:, None]
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (5, 192)
    assert rel_error(y, bf16(x) @ dequantized.T) < 1e-2
    assert rel_error(y, x @ w.T) < 2e-2


def test_int4_layer_matches_its_dequantized_weight():
    w, x = weight_and_input()
    codes = int4_codes(w)
    assert codes.codes.dtype == torch.uint8 and int(codes.codes.max()) <= 15
    layer = Int4Linear(codes)
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (5, 192)
    assert rel_error(y, bf16(x) @ int4_reference(codes).T) < 1e-2
    assert rel_error(y, x @ w.T) < 1.5e-1


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_prefill_sized_inputs_take_the_dense_path_with_the_same_weight(scheme, monkeypatch):
    # The dense bfloat16 path (CPUs with native bfloat16), forced on whatever this CPU is:
    # from DENSE_MIN_ROWS rows a layer multiplies by its dequantized weight; the result
    # matches the kernel path's reference to the same tolerance.
    from aiolm.engine.layers import quant

    monkeypatch.setattr(quant, "dense_bf16_is_fast", lambda: True)
    w, _ = weight_and_input()
    x = torch.randn(quant.DENSE_MIN_ROWS + 3, w.shape[1], generator=torch.Generator().manual_seed(1))
    if scheme == "int8":
        layer = Int8Linear.from_float(w)
        reference = layer.weight.float() * layer.scales.float()[:, None]
    else:
        codes = int4_codes(w)
        layer = Int4Linear(codes)
        reference = int4_reference(codes)
        assert layer.nibbles is not None and layer.nibbles.numel() == w.numel() // 2
    by_kernel = torch.cat([layer(rows) for rows in x.split(64)])  # under DENSE_MIN_ROWS
    calls = []
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(a))
    monkeypatch.setattr(torch, "_weight_int4pack_mm_for_cpu", lambda *a: calls.append(a))
    y = layer(x)
    assert not calls, "a prefill-sized input went through the matrix-vector kernel"
    assert rel_error(y, bf16(x) @ reference.T) < 1e-2
    assert rel_error(y, by_kernel) < 1e-2


def test_int4_codes_round_trip_their_own_dequantization():
    w, _ = weight_and_input()
    codes = int4_codes(w)
    again = int4_codes(codes.dequantize())
    assert torch.equal(again.codes, codes.codes)
    torch.testing.assert_close(again.scale, codes.scale, rtol=1e-5, atol=0)


def test_quantized_layers_keep_leading_dims_bias_and_shards():
    w, x = weight_and_input(n=64, k=64)
    bias = torch.linspace(-1, 1, 64)
    for layer in (Int8Linear.from_float(w, bias=bias, shard_sizes=[32, 16, 16]),
                  Int4Linear.from_float(w, bias=bias, shard_sizes=[32, 16, 16])):
        y = layer(x.view(5, 1, 64))
        assert y.shape == (5, 1, 64)
        assert rel_error(y.view(5, 64), x @ w.T + bias) < 1.5e-1
        assert [part.shape[-1] for part in layer.split(y)] == [32, 16, 16]


def test_int4_rejects_shapes_its_kernel_does_not_take():
    w, _ = weight_and_input(n=24, k=64)
    with pytest.raises(ValueError, match="rows % 16"):
        Int4Linear.from_float(w)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_tiny_model_stays_close_to_its_float_logits(scheme):
    model, config = load_model("tiny-llama", load_format="dummy", seed=0)
    ids = list(range(3, 40))
    driver = ModelDriver(model, config)
    ref = driver.extend([(driver.new_request(), ids)])
    counts = quantize_model(model, scheme, {})
    # 2 layers x (qkv, o, gate_up, down) + the LM head; the head is int8 under both schemes.
    assert counts == ({"int4": 0, "int8": 9} if scheme == "int8" else {"int4": 8, "int8": 1})
    assert not any(isinstance(m, MergedLinear | torch.nn.Linear) for m in model.modules())
    driver = ModelDriver(model, config)
    logits = driver.extend([(driver.new_request(), ids)])
    assert logits.dtype == torch.float32
    assert rel_error(logits, ref) < (3e-2 if scheme == "int8" else 2e-1)


def test_safetensors_checkpoint_quantizes_at_load(tmp_path):
    transformers = pytest.importorskip("transformers")
    from aiolm.engine.model_config import NAMED_CONFIGS

    cfg = dict(NAMED_CONFIGS["tiny-llama"])
    cfg.pop("torch_dtype")
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model("llama", **cfg), dtype=torch.float32).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model, _ = load_model(tmp_path, quantization="int8")
    assert isinstance(model.lm_head, Int8Linear)
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, Int8Linear)
    float_model, _ = load_model(tmp_path, quantization="auto")  # a float checkpoint
    assert isinstance(float_model.model.layers[0].self_attn.qkv_proj, MergedLinear)


@pytest.mark.slow
def test_q4_1_tensors_map_to_int4_exactly():
    """The codes, scales and offsets taken from the file's Q4_1 blocks give back the gguf
    package's dequantization bit for bit (attn_q also goes through the Q/K unpermutation),
    and the packed layer multiplies by them up to the bfloat16 scales."""
    import gguf

    from aiolm.engine.gguf_weights import GGUFCheckpoint, _unpermute

    reader = smollm2.gguf_reader()
    checkpoint = GGUFCheckpoint(Path(smollm2.gguf_path()), reader)
    assert checkpoint.stored_quantization() == "int4"
    config = checkpoint.config
    wanted = {"model.layers.3.mlp.up_proj.weight": "blk.3.ffn_up.weight",
              "model.layers.3.self_attn.q_proj.weight": "blk.3.attn_q.weight"}
    found = {name: w for name, w in checkpoint.weights(config, keep_int4=True) if name in wanted}
    tensors = {t.name: t for t in reader.tensors}
    for name, gguf_name in wanted.items():
        tensor = tensors[gguf_name]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.Q4_1
        expected = gguf.dequantize(tensor.data, tensor.tensor_type)
        if "attn_q" in gguf_name:
            expected = _unpermute(expected, config.num_heads)
        codes = found[name]
        assert isinstance(codes, Int4Codes)
        assert torch.equal(codes.dequantize(), torch.from_numpy(expected.copy()))
        layer = Int4Linear(codes)
        x = torch.randn(3, codes.shape[1], generator=torch.Generator().manual_seed(1))
        assert rel_error(layer(x), bf16(x) @ int4_reference(codes).T) < 1e-2


def test_quantization_option_is_validated():
    with pytest.raises(ValueError, match="quantization: must be one of"):
        EngineConfig(quantization="int2")
    with pytest.raises(ValueError, match="quantization: 'int4' is for the CPU only"):
        EngineConfig(device="cuda", quantization="int4")
    assert EngineConfig(device="cuda", quantization="auto").quantization == "auto"
    assert EngineConfig().quantization == "auto"
    with pytest.raises(ValueError, match="quantization"):
        load_model("tiny-llama", load_format="dummy", quantization="fp8")
    with pytest.raises(ValueError, match="CPU only"):
        resolve_quantization("int8", None, torch.device("cuda"))
    assert resolve_quantization("auto", None, torch.device("cuda")) is None
    assert resolve_quantization("auto", None, torch.device("cpu")) is None  # dummy weights
    assert resolve_quantization("int4", None, torch.device("cpu")) == "int4"


def test_engine_rejects_a_bad_quantization_before_loading():
    from aiolm.backends.engine import Engine

    with pytest.raises(ValueError, match="quantization"):
        Engine("tiny-llama", load_format="dummy", quantization="int3")


def test_serve_quantization_flag_reaches_the_engine_options():
    from aiolm.server.cli import build_parser, engine_options

    assert engine_options(build_parser().parse_args([]))["quantization"] == "auto"
    args = build_parser().parse_args(["--quantization", "none"])
    assert engine_options(args)["quantization"] is None
    args = build_parser().parse_args(["--quantization", "int8"])
    assert engine_options(args)["quantization"] == "int8"
