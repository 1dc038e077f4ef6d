"""The model geometry the engine needs, read from a Hugging Face config or a named preset.

``ModelConfig.from_hf`` accepts a ``config.json`` dict or a ``transformers`` config object
(old ``rope_theta`` / ``rope_scaling`` keys and the newer ``rope_parameters`` dict alike).
``ModelConfig.named`` returns the presets used for dummy weights (benchmarks and tests).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    import torch

__all__ = ["ModelConfig", "RopeScaling", "SUPPORTED_ARCHITECTURES", "NAMED_CONFIGS"]

# Architecture name -> the model-family options it implies.
_ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {"qkv_bias": None, "qk_norm": False},
    "MistralForCausalLM": {"qkv_bias": None, "qk_norm": False},
    "Qwen2ForCausalLM": {"qkv_bias": True, "qk_norm": False},
    "Qwen3ForCausalLM": {"qkv_bias": None, "qk_norm": True},
}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_ARCH_DEFAULTS)

_DTYPE_NAMES = {
    "float32": "float32", "float": "float32", "fp32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "half": "float16", "fp16": "float16",
}


def check_architecture(architectures: list[str] | tuple[str, ...] | str | None) -> str:
    """Return the first supported name in ``architectures``; ValueError listing ours if none."""
    if isinstance(architectures, str):
        architectures = [architectures]
    for arch in architectures or ():
        if arch in _ARCH_DEFAULTS:
            return arch
    raise ValueError(
        f"architecture: unsupported {list(architectures or [])!r}; supported architectures are "
        f"{', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def dtype_name(dtype: Any) -> str:
    """Normalise a dtype given as a string or ``torch.dtype`` to ``"float32"`` etc."""
    name = str(dtype).removeprefix("torch.")
    try:
        return _DTYPE_NAMES[name]
    except KeyError:
        raise ValueError(
            f"dtype: unsupported {dtype!r}; use float32, bfloat16 or float16"
        ) from None


@attrs.frozen(kw_only=True)
class RopeScaling:
    """RoPE frequency scaling: ``"linear"`` (positions divided by ``factor``) or ``"llama3"``."""

    rope_type: str = attrs.field(validator=attrs.validators.in_(("linear", "llama3")))
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf(cls, params: Mapping[str, Any] | None, *,
                max_position_embeddings: int = 8192) -> RopeScaling | None:
        """Parse HF ``rope_scaling`` / ``rope_parameters``; None for plain RoPE.

        ``max_position_embeddings`` is the default of llama3's original context length.
        """
        if not params:
            return None
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type == "default":
            return None
        if rope_type == "linear":
            return cls(rope_type="linear", factor=float(params["factor"]))
        if rope_type == "llama3":
            return cls(
                rope_type="llama3",
                factor=float(params["factor"]),
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position_embeddings=int(
                    params.get("original_max_position_embeddings", max_position_embeddings)
                ),
            )
        raise ValueError(
            f"rope_scaling: unsupported rope type {rope_type!r}; supported: default, linear, llama3"
        )

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rope_type": self.rope_type, "factor": self.factor}
        if self.rope_type == "llama3":
            out.update(
                low_freq_factor=self.low_freq_factor,
                high_freq_factor=self.high_freq_factor,
                original_max_position_embeddings=self.original_max_position_embeddings,
            )
        return out


def _positive(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name}: must be positive, got {value}")


@attrs.frozen(kw_only=True)
class ModelConfig:
    """Geometry and options of a Llama-family decoder.

    ``qkv_bias``: biases on q/k/v projections (Qwen2, Llama ``attention_bias``);
    ``o_bias``: bias on the output projection (Llama/Qwen3 ``attention_bias``);
    ``qk_norm``: per-head RMSNorm of q and k before RoPE (Qwen3).
    ``dtype`` is the dtype name of the weights (``"bfloat16"`` ...); ``torch_dtype`` the object.
    ``max_position_embeddings`` is the usable context length (capped at the sliding window
    where a model declares one, so full attention stays exact).
    """

    architecture: str = attrs.field(validator=lambda _i, _a, v: check_architecture(v))
    vocab_size: int = attrs.field(validator=_positive)
    hidden_size: int = attrs.field(validator=_positive)
    intermediate_size: int = attrs.field(validator=_positive)
    num_layers: int = attrs.field(validator=_positive)
    num_heads: int = attrs.field(validator=_positive)
    num_kv_heads: int = attrs.field(validator=_positive)
    head_dim: int = attrs.field(validator=_positive)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = attrs.field(default=4096, validator=_positive)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    eos_token_ids: tuple[int, ...] = attrs.field(default=(), converter=tuple)
    bos_token_id: int | None = None
    dtype: str = attrs.field(default="bfloat16", converter=dtype_name)

    def __attrs_post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads: {self.num_kv_heads} does not divide num_heads {self.num_heads}"
            )

    @property
    def attention_bias(self) -> bool:
        """Whether the q/k/v projections carry a bias (Qwen2; Llama ``attention_bias``)."""
        return self.qkv_bias

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)

    @property
    def context_len(self) -> int:
        return self.max_position_embeddings

    @classmethod
    def from_hf(cls, config: Mapping[str, Any] | Any) -> ModelConfig:
        """Build from a HF ``config.json`` dict or a ``transformers`` config object.

        Raises ValueError for an unsupported architecture (listing the supported ones), an
        unsupported activation or RoPE type.
        """
        cfg = dict(config) if isinstance(config, Mapping) else config.to_dict()
        arch = check_architecture(cfg.get("architectures") or _arch_from_model_type(cfg))
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act: unsupported {cfg['hidden_act']!r}; only silu")
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        rope_params = cfg.get("rope_parameters") or {}
        rope_theta = float(cfg.get("rope_theta") or rope_params.get("rope_theta") or 10000.0)
        rope_scaling = RopeScaling.from_hf(
            cfg.get("rope_scaling") or rope_params,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        )
        eos = cfg.get("eos_token_id")
        eos_ids = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        attention_bias = bool(cfg.get("attention_bias", False))
        family = _ARCH_DEFAULTS[arch]
        qkv_bias = family["qkv_bias"] if family["qkv_bias"] is not None else attention_bias
        o_bias = attention_bias if arch != "Qwen2ForCausalLM" else False
        max_pos = int(cfg.get("max_position_embeddings", 4096))
        window = _sliding_window(arch, cfg)
        if window is not None:
            max_pos = min(max_pos, window)
        dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=family["qk_norm"],
            eos_token_ids=eos_ids,
            bos_token_id=cfg.get("bos_token_id"),
            dtype=dtype,
        )

    @classmethod
    def named(cls, name: str) -> ModelConfig:
        """A preset for dummy weights: one of ``NAMED_CONFIGS``; ValueError naming them."""
        try:
            hf = NAMED_CONFIGS[name]
        except KeyError:
            raise ValueError(
                f"model: unknown named config {name!r}; choose one of {', '.join(NAMED_CONFIGS)}"
            ) from None
        return cls.from_hf(hf)

    def to_hf(self) -> dict[str, Any]:
        """A HF ``config.json`` dict describing the same model (for ``transformers``)."""
        model_type = {
            "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
            "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
        }[self.architecture]
        out: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.to_hf() if self.rope_scaling else None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "dtype": self.dtype,
            "eos_token_id": list(self.eos_token_ids) or None,
            "bos_token_id": self.bos_token_id,
        }
        if self.architecture in ("LlamaForCausalLM", "Qwen3ForCausalLM"):
            out["attention_bias"] = self.qkv_bias
        if self.architecture == "LlamaForCausalLM":
            out["mlp_bias"] = self.mlp_bias
        if self.architecture == "MistralForCausalLM":
            out["sliding_window"] = None
        return out


def _arch_from_model_type(cfg: Mapping[str, Any]) -> list[str]:
    names = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
             "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    model_type = cfg.get("model_type")
    return [names.get(model_type, str(model_type))]


def _sliding_window(arch: str, cfg: Mapping[str, Any]) -> int | None:
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and not cfg.get("use_sliding_window"):
        return None
    window = cfg.get("sliding_window")
    return int(window) if window else None


def _tiny(arch: str, **extra: Any) -> dict[str, Any]:
    base = {
        "architectures": [arch], "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": 2048, "tie_word_embeddings": False, "hidden_act": "silu",
        "eos_token_id": 2, "bos_token_id": 1, "torch_dtype": "float32",
    }
    base.update(extra)
    return base


NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3-8b": {
        "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "max_position_embeddings": 8192, "tie_word_embeddings": False, "hidden_act": "silu",
        "eos_token_id": [128001, 128009], "bos_token_id": 128000, "torch_dtype": "bfloat16",
    },
    "tiny-llama": _tiny("LlamaForCausalLM"),
    "tiny-llama3": _tiny(
        "LlamaForCausalLM", rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    ),
    "tiny-mistral": _tiny("MistralForCausalLM", sliding_window=None),
    "tiny-qwen2": _tiny("Qwen2ForCausalLM", tie_word_embeddings=True, rope_theta=1000000.0),
    "tiny-qwen3": _tiny("Qwen3ForCausalLM", rope_theta=1000000.0),
}
