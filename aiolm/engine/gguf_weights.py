"""Read a GGUF file (llama.cpp's format): the model config from its metadata and its
tensors dequantized and renamed to Hugging Face names, or Q4_0/Q4_1 tensors kept as their
4-bit codes (``Int4Codes``) for the CPU's int4 layers.

llama.cpp's converter permutes the rows of the Q and K projections of llama-arch models
(it pairs rotary dimensions as interleaved pairs, HF as two halves); the permutation is
undone here exactly as ``transformers``' GGUF loader does. Qwen2/Qwen3 are stored unpermuted.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .model_config import ModelConfig, RopeScaling

if TYPE_CHECKING:
    import torch

    from .layers.quant import Int4Codes

__all__ = ["GGUFCheckpoint"]

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM"}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_INT4_TYPES = frozenset({2, 3})  # GGMLQuantizationType.Q4_0, Q4_1


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


class GGUFCheckpoint:
    """An opened GGUF file: ``config`` from its metadata, ``weights()`` to stream tensors.

    ``reader``: the file's ``gguf.GGUFReader`` when the caller already parsed it (parsing
    costs seconds: every metadata array element is read one by one). Raises ValueError for
    an architecture we do not implement (listing the supported ones) or for ``rope_freqs``
    factors other than the standard llama3 scaling.
    """

    def __init__(self, path: Path, reader: Any = None) -> None:
        from gguf import GGUFReader

        self.path = path
        self.reader = reader if reader is not None else GGUFReader(str(path))
        self.config = _config(path, self.reader)

    def weights(self, config: ModelConfig, *, keep_int4: bool = False,
                ) -> Iterator[tuple[str, torch.Tensor | Int4Codes]]:
        """Yield ``(hf_name, tensor)`` for every tensor, dequantized to ``config.dtype``;
        with ``keep_int4``, Q4_0/Q4_1 tensors come as their ``Int4Codes`` instead."""
        return _weights(self.reader, config, keep_int4)

    def stored_quantization(self) -> str | None:
        """What the file's projections are stored as: ``"int4"`` when any is Q4_0/Q4_1,
        ``"int8"`` when any other is quantized (Q8_0, K-quants: dequantized, then int8),
        None when all are float."""
        from gguf import GGMLQuantizationType as Q

        kinds = {t.tensor_type for t in self.reader.tensors
                 if _BLOCK.match(t.name) and t.name.endswith(".weight") and len(t.shape) == 2}
        if kinds & _INT4_TYPES:
            return "int4"
        if kinds - {Q.F32, Q.F16, Q.BF16}:
            return "int8"
        return None


def _config(path: Path, reader: Any) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"model: GGUF architecture {arch!r} is not supported; supported GGUF "
            f"architectures are {', '.join(_ARCHITECTURES)}"
        )
    tensor_names = {t.name for t in reader.tensors}
    name = str(_field(reader, "general.name", "") or "").lower()
    architecture = _ARCHITECTURES[arch]
    if arch == "llama" and "mistral" in name:
        architecture = "MistralForCausalLM"

    def key(suffix: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{suffix}", default)

    num_heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    vocab = key("vocab_size")
    if vocab is None:
        vocab = len(_field(reader, "tokenizer.ggml.tokens"))
    hf: dict[str, Any] = {
        "architectures": [architecture],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(key("attention.head_count_kv", num_heads)),
        "head_dim": int(key("attention.key_length", hidden // num_heads)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": any(".attn_output.bias" in n for n in tensor_names),
        # End of turn / end of message ids (Llama 3 chat) end generation too.
        "eos_token_id": list(dict.fromkeys(
            int(v) for v in (_field(reader, f"tokenizer.ggml.{k}_token_id")
                             for k in ("eos", "eot", "eom")) if v is not None
        )),
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "torch_dtype": "bfloat16",
    }
    if key("rope.scaling.type") == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    config = ModelConfig.from_hf(hf)
    rope_freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if rope_freqs is not None:
        config = _with_llama3_rope(path, config, rope_freqs,
                                   key("rope.scaling.original_context_length"))
    return config


def _with_llama3_rope(path: Path, config: ModelConfig, tensor: Any,
                      original_len: int | None) -> ModelConfig:
    """Recognise llama.cpp's ``rope_freqs`` (per-frequency divisors) as llama3 scaling.

    GGUF stores only the divisors, not the llama3 parameters; the standard ones (low/high
    frequency factors 1 and 4, original context 8192, factor = the largest divisor) are
    accepted only if they reproduce every stored divisor.
    """
    import attrs
    import numpy as np
    from gguf import dequantize

    from .layers.rotary import rope_inv_freq

    stored = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float64).ravel()
    scaling = RopeScaling(rope_type="llama3", factor=float(stored.max()), low_freq_factor=1.0,
                          high_freq_factor=4.0,
                          original_max_position_embeddings=int(original_len or 8192))
    plain = rope_inv_freq(config.head_dim, config.rope_theta, None).double().numpy()
    scaled = rope_inv_freq(config.head_dim, config.rope_theta, scaling).double().numpy()
    if stored.shape != plain.shape or not np.allclose(plain / scaled, stored, rtol=1e-3):
        raise ValueError(
            f"model: {str(path)!r} has RoPE frequency factors (rope_freqs) that are not the "
            "standard llama3 scaling; load the Hugging Face directory instead"
        )
    return attrs.evolve(config, rope_scaling=scaling)


def _weights(reader: Any, config: ModelConfig, keep_int4: bool,
             ) -> Iterator[tuple[str, torch.Tensor | Int4Codes]]:
    import numpy as np
    import torch
    from gguf import dequantize

    arch = _field(reader, "general.architecture")
    target = config.torch_dtype
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            continue  # folded into config.rope_scaling
        hf_name = _hf_name(tensor.name)
        if hf_name is None:
            raise ValueError(f"model: GGUF tensor {tensor.name!r} has no counterpart in our model")
        if keep_int4 and tensor.tensor_type in _INT4_TYPES and tensor.data.ndim == 2:
            yield hf_name, _int4_codes(tensor, arch, config)
            continue
        weights = dequantize(tensor.data, tensor.tensor_type)
        if arch == "llama":
            if ".attn_q." in tensor.name:
                weights = _unpermute(weights, config.num_heads)
            elif ".attn_k." in tensor.name:
                weights = _unpermute(weights, config.num_kv_heads)
        # F32 tensors come back as read-only views of the memory map: copy those.
        yield hf_name, torch.from_numpy(np.require(weights, requirements=["C", "W"])).to(target)


def _int4_codes(tensor: Any, arch: str, config: ModelConfig) -> Int4Codes:
    """A Q4_1 (``w = d q + m``) or Q4_0 (``w = d (q - 8)``) tensor's blocks as
    ``Int4Codes``: the 4-bit codes as stored, ``scale = d``, ``offset = m`` or ``-8 d``.

    Each block of 32 is ``d`` (f16), [``m`` (f16)], 16 bytes of codes: element ``i`` in the
    low nibble of byte ``i``, element ``16 + i`` in its high nibble.
    """
    import numpy as np
    import torch

    from .layers.quant import Int4Codes

    rows = tensor.data.shape[0]
    blocks = np.asarray(tensor.data).reshape(rows, -1, 20 if tensor.tensor_type == 3 else 18)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if tensor.tensor_type == 3:  # Q4_1
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        packed = blocks[..., 4:]
    else:  # Q4_0
        m = -8 * d
        packed = blocks[..., 2:]
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).reshape(rows, -1)
    if arch == "llama":
        if ".attn_q." in tensor.name:
            codes, d, m = (_unpermute(a, config.num_heads) for a in (codes, d, m))
        elif ".attn_k." in tensor.name:
            codes, d, m = (_unpermute(a, config.num_kv_heads) for a in (codes, d, m))
    return Int4Codes(codes=torch.from_numpy(np.ascontiguousarray(codes)),
                     scale=torch.from_numpy(np.ascontiguousarray(d)),
                     offset=torch.from_numpy(np.ascontiguousarray(m)))


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _BLOCK.match(name)
    if match is None or match.group(2) not in _BLOCK_NAMES:
        return None
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"


def _unpermute(weights: Any, num_heads: int) -> Any:
    """Undo llama.cpp's per-head row interleaving of rotary dims (as transformers does)."""
    half = weights.shape[0] // num_heads // 2
    w = weights.reshape(num_heads, half, 2, *weights.shape[1:])
    return w.swapaxes(2, 1).reshape(weights.shape)
