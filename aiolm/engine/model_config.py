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

__all__ = ["ModelConfig", "RopeScaling", "SUPPORTED_ARCHITECTURES", "NAMED_CONFIGS",
           "MOE_ARCHITECTURES"]

# Architecture name -> the model-family options it implies.
_ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {"qkv_bias": None, "qk_norm": False},
    "MistralForCausalLM": {"qkv_bias": None, "qk_norm": False},
    "Qwen2ForCausalLM": {"qkv_bias": True, "qk_norm": False},
    "Qwen3ForCausalLM": {"qkv_bias": None, "qk_norm": True},
    # Mixture-of-Experts families (aiolm/engine/models/moe.py).
    "MixtralForCausalLM": {"qkv_bias": None, "qk_norm": False},
    "Qwen3MoeForCausalLM": {"qkv_bias": None, "qk_norm": True},
}
MOE_ARCHITECTURES: frozenset[str] = frozenset({"MixtralForCausalLM", "Qwen3MoeForCausalLM"})
# Multimodal architectures (aiolm/engine/models/llava.py): the language model is the one
# their ``text_config`` describes; ``ModelConfig.hf_config`` keeps the whole config.
_ARCH_DEFAULTS.update(dict.fromkeys(
    ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration"),
    {"qkv_bias": None, "qk_norm": False}))
MULTIMODAL_ARCHITECTURES: frozenset[str] = frozenset(
    {"LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration"})
# Qwen2.5-VL (aiolm/engine/models/qwen2_5_vl.py): a Qwen2 language model with M-RoPE.
_ARCH_DEFAULTS["Qwen2_5_VLForConditionalGeneration"] = {"qkv_bias": True, "qk_norm": False}
MULTIMODAL_ARCHITECTURES |= {"Qwen2_5_VLForConditionalGeneration"}
# LLaVA-NeXT-Video (aiolm/engine/models/llava_video.py): LLaVA-NeXT and pooled video frames.
_ARCH_DEFAULTS["LlavaNextVideoForConditionalGeneration"] = {"qkv_bias": None, "qk_norm": False}
MULTIMODAL_ARCHITECTURES |= {"LlavaNextVideoForConditionalGeneration"}
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
        if rope_type in ("default", "mrope"):  # M-RoPE: plain frequencies (Qwen2.5-VL's)
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

    Mixture-of-Experts models (Mixtral, Qwen3-MoE) set ``num_experts`` (0: a dense model)
    routed experts of ``moe_intermediate_size``, ``num_experts_per_tok`` of them per token;
    ``norm_topk_prob`` renormalises the chosen routing weights to sum to 1. Layer ``i`` is
    sparse unless it is in ``mlp_only_layers`` or ``(i + 1) % decoder_sparse_step != 0``
    (Qwen3-MoE's rule); a dense layer's MLP is ``intermediate_size`` wide.
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
    #: The whole HF config of a multimodal architecture (its vision tower, projector, image
    #: token); None for a text model, whose config is the fields above.
    hf_config: Mapping[str, Any] | None = attrs.field(default=None, eq=False, repr=False)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = attrs.field(default=(), converter=tuple)

    def __attrs_post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads: {self.num_kv_heads} does not divide num_heads {self.num_heads}"
            )
        if self.architecture in MOE_ARCHITECTURES:
            _check_moe(self)

    @property
    def is_moe(self) -> bool:
        """Whether some layer's MLP is a Mixture of Experts."""
        return self.num_experts > 0

    def is_sparse_layer(self, layer_id: int) -> bool:
        """Whether layer ``layer_id``'s MLP is the routed experts (else a dense MLP)."""
        return (self.num_experts > 0 and layer_id not in self.mlp_only_layers
                and (layer_id + 1) % self.decoder_sparse_step == 0)

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
        multimodal: tuple[str, dict[str, Any]] | None = None
        if arch in MULTIMODAL_ARCHITECTURES:  # the geometry is the language model's
            multimodal, cfg = (arch, cfg), _text_config(cfg)
            arch = check_architecture(_arch_from_model_type(cfg))
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
        moe = _moe_fields(arch, cfg)
        return cls(
            architecture=multimodal[0] if multimodal is not None else arch,
            hf_config=multimodal[1] if multimodal is not None else None,
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
            **moe,
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
        if self.hf_config is not None:
            return dict(self.hf_config)
        model_type = {
            "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
            "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
            "MixtralForCausalLM": "mixtral", "Qwen3MoeForCausalLM": "qwen3_moe",
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
        if self.architecture in ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
            out["attention_bias"] = self.qkv_bias
        if self.architecture == "LlamaForCausalLM":
            out["mlp_bias"] = self.mlp_bias
        if self.architecture in ("MistralForCausalLM", "MixtralForCausalLM"):
            out["sliding_window"] = None
        if self.architecture == "MixtralForCausalLM":
            out.update(num_local_experts=self.num_experts,
                       num_experts_per_tok=self.num_experts_per_tok,
                       intermediate_size=self.moe_intermediate_size)
        if self.architecture == "Qwen3MoeForCausalLM":
            out.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                       moe_intermediate_size=self.moe_intermediate_size,
                       norm_topk_prob=self.norm_topk_prob,
                       decoder_sparse_step=self.decoder_sparse_step,
                       mlp_only_layers=list(self.mlp_only_layers), use_sliding_window=False)
        return out


def _moe_fields(arch: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The Mixture-of-Experts fields of a HF config (none for a dense architecture).

    Mixtral: ``num_local_experts`` experts of ``intermediate_size``, top-k weights always
    renormalised, every layer sparse. Qwen3-MoE: ``num_experts`` (transformers 5 may write
    ``num_local_experts``) of ``moe_intermediate_size``, ``norm_topk_prob``,
    ``decoder_sparse_step`` and ``mlp_only_layers``.
    """
    if arch == "MixtralForCausalLM":
        return {"num_experts": int(cfg["num_local_experts"]),
                "num_experts_per_tok": int(cfg["num_experts_per_tok"]),
                "moe_intermediate_size": int(cfg["intermediate_size"]), "norm_topk_prob": True}
    if arch == "Qwen3MoeForCausalLM":
        experts = cfg.get("num_experts", cfg.get("num_local_experts"))
        if experts is None:
            raise ValueError("num_experts: a Qwen3-MoE config must give the number of experts")
        return {"num_experts": int(experts),
                "num_experts_per_tok": int(cfg["num_experts_per_tok"]),
                "moe_intermediate_size": int(cfg["moe_intermediate_size"]),
                "norm_topk_prob": bool(cfg.get("norm_topk_prob", False)),
                "decoder_sparse_step": int(cfg.get("decoder_sparse_step", 1)),
                "mlp_only_layers": tuple(int(i) for i in cfg.get("mlp_only_layers") or ())}
    return {}


def _check_moe(config: ModelConfig) -> None:
    """ValueError naming the first inconsistent Mixture-of-Experts field."""
    if config.num_experts <= 0:
        raise ValueError(f"num_experts: {config.architecture} needs at least one expert, "
                         f"got {config.num_experts}")
    if not 1 <= config.num_experts_per_tok <= config.num_experts:
        raise ValueError(f"num_experts_per_tok: must be between 1 and num_experts "
                         f"({config.num_experts}), got {config.num_experts_per_tok}")
    if config.moe_intermediate_size <= 0:
        raise ValueError(f"moe_intermediate_size: must be positive, got "
                         f"{config.moe_intermediate_size}")
    if config.decoder_sparse_step <= 0:
        raise ValueError(f"decoder_sparse_step: must be positive, got "
                         f"{config.decoder_sparse_step}")


def _text_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A multimodal config's ``text_config``, with the dtype and special tokens the whole
    config gives where the text part leaves them out; ValueError without one."""
    text = cfg.get("text_config")
    if text is None and cfg.get("model_type") == "qwen2_5_vl":
        # A flat (pre-transformers-5) Qwen2.5-VL config: the text fields at the top level.
        text = {k: v for k, v in cfg.items() if k != "vision_config"}
        text["model_type"] = "qwen2_5_vl_text"
    if not isinstance(text, Mapping):
        raise ValueError(f"text_config: a {cfg.get('architectures')} config needs the "
                         "language model's config as its text_config")
    out = dict(text)
    for key in ("torch_dtype", "dtype", "eos_token_id", "bos_token_id"):
        if out.get(key) is None and cfg.get(key) is not None:
            out[key] = cfg[key]
    out.setdefault("model_type", "llama")
    return out


def _arch_from_model_type(cfg: Mapping[str, Any]) -> list[str]:
    names = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
             "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
             "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
             "qwen2_5_vl_text": "Qwen2ForCausalLM"}
    model_type = cfg.get("model_type")
    return [names.get(model_type, str(model_type))]


def _sliding_window(arch: str, cfg: Mapping[str, Any]) -> int | None:
    if (arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
            and not cfg.get("use_sliding_window")):
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
    "llama-3-70b": {
        "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 8192,
        "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
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
    # Mixture of Experts (aiolm/engine/models/moe.py).
    "tiny-mixtral": _tiny("MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2,
                          rope_theta=1000000.0, sliding_window=None),
    "tiny-qwen3-moe": _tiny("Qwen3MoeForCausalLM", num_experts=8, num_experts_per_tok=2,
                            moe_intermediate_size=32, norm_topk_prob=True, decoder_sparse_step=1,
                            mlp_only_layers=[], rope_theta=1000000.0),
    "mixtral-8x7b": {
        "architectures": ["MixtralForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
        "max_position_embeddings": 32768, "tie_word_embeddings": False, "hidden_act": "silu",
        "num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": None,
        "eos_token_id": 2, "bos_token_id": 1, "torch_dtype": "bfloat16",
    },
    "qwen3-30b-a3b": {
        "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 151936, "hidden_size": 2048,
        "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
        "tie_word_embeddings": False, "hidden_act": "silu", "num_experts": 128,
        "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "attention_bias": False, "use_sliding_window": False,
        "eos_token_id": 151645, "bos_token_id": 151643, "torch_dtype": "bfloat16",
    },
}


def _qwen2_5_vl(text: dict[str, Any], vision: dict[str, Any], **tokens: int) -> dict[str, Any]:
    """A Qwen2.5-VL config as transformers 5 saves it (text and vision configs nested)."""
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "text_config": {"model_type": "qwen2_5_vl_text", "hidden_act": "silu",
                        "use_sliding_window": False, "tie_word_embeddings": False, **text},
        "vision_config": {"model_type": "qwen2_5_vl_vision", "hidden_act": "silu",
                          "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2,
                          "temporal_patch_size": 2, **vision},
        "tie_word_embeddings": False, **tokens,
    }


# Qwen2.5-VL (aiolm/engine/models/qwen2_5_vl.py): a tiny random one for tests and the 7B
# geometry for dummy-weight benchmarks.
NAMED_CONFIGS["tiny-qwen2.5-vl"] = _qwen2_5_vl(
    {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
     "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
     "max_position_embeddings": 2048, "eos_token_id": 2, "bos_token_id": 1,
     "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                         "mrope_section": [2, 3, 3]}, "dtype": "float32"},
    {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
     "out_hidden_size": 64, "window_size": 56, "fullatt_block_indexes": [1],
     "tokens_per_second": 4},
    image_token_id=500, video_token_id=501, vision_start_token_id=502, vision_end_token_id=503,
)
NAMED_CONFIGS["qwen2.5-vl-7b"] = _qwen2_5_vl(
    {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
     "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
     "rms_norm_eps": 1e-6, "max_position_embeddings": 128000, "eos_token_id": 151645,
     "bos_token_id": 151643, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                                 "mrope_section": [16, 24, 24]},
     "dtype": "bfloat16"},
    {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
     "out_hidden_size": 3584, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
     "tokens_per_second": 2},
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
    vision_end_token_id=151653,
)


def _llava(arch: str, text: dict[str, Any], vision: dict[str, Any],
           **extra: Any) -> dict[str, Any]:
    """A LLaVA config as transformers 5 saves it: a Llama text config and a CLIP vision
    config nested, the image token and the feature selection at the top level."""
    return {
        "architectures": [arch], "model_type": "llava_next" if "Next" in arch else "llava",
        "text_config": {"model_type": "llama", "hidden_act": "silu", **text},
        "vision_config": {"model_type": "clip_vision_model", "hidden_act": "quick_gelu",
                          "layer_norm_eps": 1e-5, "num_channels": 3, **vision},
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
        "tie_word_embeddings": False, "dtype": text.get("dtype", "bfloat16"), **extra,
    }


# LLaVA (aiolm/engine/models/llava.py): tiny random ones for tests (16 image tokens per
# 56-pixel tile), and LLaVA-1.5-7B's geometry (CLIP ViT-L/14-336, Vicuna-7B) for benchmarks.
_TINY_LLAVA_TEXT = {
    "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": False,
    "eos_token_id": 2, "bos_token_id": 1, "dtype": "float32",
}
_TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "image_size": 56, "patch_size": 14,
              "projection_dim": 32}
NAMED_CONFIGS["tiny-llava"] = _llava("LlavaForConditionalGeneration", _TINY_LLAVA_TEXT,
                                     _TINY_CLIP, image_token_index=500)
NAMED_CONFIGS["tiny-llava-next"] = _llava(
    "LlavaNextForConditionalGeneration", _TINY_LLAVA_TEXT, _TINY_CLIP, image_token_index=500,
    image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]])
NAMED_CONFIGS["llava-1.5-7b"] = _llava(
    "LlavaForConditionalGeneration",
    {"vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 11008,
     "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
     "head_dim": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
     "max_position_embeddings": 4096, "tie_word_embeddings": False, "eos_token_id": 2,
     "bos_token_id": 1, "dtype": "bfloat16"},
    {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
     "num_attention_heads": 16, "image_size": 336, "patch_size": 14, "projection_dim": 768},
    image_token_index=32000)

# LLaVA-NeXT (v1.6) -Vicuna-7B's geometry: the same tower and language model, images tiled
# at any resolution (a 672 x 504 picture: the base view and 2 x 2 tiles, ~2,300 tokens).
NAMED_CONFIGS["llava-next-7b"] = _llava(
    "LlavaNextForConditionalGeneration", NAMED_CONFIGS["llava-1.5-7b"]["text_config"],
    NAMED_CONFIGS["llava-1.5-7b"]["vision_config"], image_token_index=32000,
    image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])


def _llava_next_video(text: dict[str, Any], vision: dict[str, Any],
                      **extra: Any) -> dict[str, Any]:
    """A LLaVA-NeXT-Video config as transformers 5 saves it (a LLaVA config, the video
    token and the frames' spatial pooling at the top level)."""
    return {**_llava("LlavaNextVideoForConditionalGeneration", text, vision, **extra),
            "model_type": "llava_next_video"}


# LLaVA-NeXT-Video (aiolm/engine/models/llava_video.py): a tiny random one for tests (4
# video tokens per frame: its 4 x 4 patches pooled 2 x 2), and LLaVA-NeXT-Video-7B's
# geometry (CLIP ViT-L/14-336, Vicuna-7B; 144 tokens per frame) for benchmarks.
NAMED_CONFIGS["tiny-llava-next-video"] = _llava_next_video(
    _TINY_LLAVA_TEXT, _TINY_CLIP, image_token_index=500, video_token_index=501,
    image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]],
    spatial_pool_mode="average", spatial_pool_stride=2)
NAMED_CONFIGS["llava-next-video-7b"] = _llava_next_video(
    {"vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 11008,
     "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
     "head_dim": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
     "rope_scaling": {"rope_type": "linear", "factor": 2.5},
     "max_position_embeddings": 4096, "tie_word_embeddings": False, "eos_token_id": 2,
     "bos_token_id": 1, "dtype": "bfloat16"},
    {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
     "num_attention_heads": 16, "image_size": 336, "patch_size": 14, "projection_dim": 768},
    image_token_index=32001, video_token_index=32000,
    image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    spatial_pool_mode="average", spatial_pool_stride=2)
