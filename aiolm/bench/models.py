"""Loading the benchmarked model once, for the engine and for the transformers peer alike.

:func:`load_for_bench` loads weights the way the engine does (``LoadedModel``) and gives
dummy weights a tokenizer (:func:`~aiolm.bench.dummy_tokenizer.bench_tokenizer`), since the
workloads are text programs. :func:`to_transformers` builds the ``transformers`` model of
the same config whose parameters *are* the engine's tensors (views, no copy), so both
systems run exactly the same weights, random or not; for a multimodal model (LLaVA,
Qwen2.5-VL) that is transformers' ``...ForConditionalGeneration`` of the checkpoint's
config, vision tower included.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..backends.engine import LoadedModel

__all__ = ["load_for_bench", "to_transformers"]

# Our fused projections' shards -> the Hugging Face module names.
_SHARD_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "gate": "gate_proj", "up": "up_proj"}


def load_for_bench(model: str | None = None, *, load_format: str = "auto", seed: int = 0,
                   device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load ``model`` (blocking) as the engine would, with float weights (the transformers
    peer shares the very tensors); dummy weights get a bench tokenizer."""
    from ..backends.engine import LoadedModel

    loaded = LoadedModel.load(model, dtype=dtype, device=device, load_format=load_format,
                              seed=seed, quantization=None)
    if loaded.tokenizer is None:
        from ..engine.tokenizer import Tokenizer
        from .dummy_tokenizer import bench_tokenizer

        loaded.tokenizer = Tokenizer(bench_tokenizer(_text_vocab_size(loaded), seed=seed))
    return loaded


#: The special token ids of multimodal models (the model's attributes of these names).
_MULTIMODAL_TOKENS = ("image_token_id", "video_token_id", "vision_start_token_id",
                      "vision_end_token_id")


def _text_vocab_size(loaded: LoadedModel) -> int:
    """The most tokens a bench tokenizer for ``loaded`` may have: the vocabulary, kept below
    a multimodal model's image and video token ids so that no text encodes to one (the
    images of a prompt then go first, after BOS: :mod:`aiolm.engine.multimodal`'s rule for
    a prompt without image tokens, followed by the engine and the peer alike)."""
    reserved = [int(getattr(loaded.model, name)) for name in _MULTIMODAL_TOKENS
                if getattr(loaded.model, name, None) is not None]
    return min([loaded.model_config.vocab_size, *reserved])


def to_transformers(loaded: LoadedModel) -> Any:
    """A ``transformers`` model of ``loaded``'s config sharing its weight tensors: a causal
    LM, or for a multimodal model its ``...ForConditionalGeneration`` (:func:`_multimodal`).

    Raises ``ValueError`` if a parameter of either model has no counterpart.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..engine.multimodal import is_multimodal

    if is_multimodal(loaded.model):
        return _multimodal(loaded)
    hf_config = loaded.model_config.to_hf()
    hf_config.pop("architectures")
    config = AutoConfig.for_model(hf_config.pop("model_type"), **hf_config)
    weights = _unfused_parameters(loaded.model)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config, dtype=loaded.model_config.torch_dtype)
    expected = {n for n, _ in hf.named_parameters()}
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    if set(weights) != expected:
        raise ValueError(
            f"model: no transformers counterpart for {sorted(set(weights) ^ expected)[:8]}"
        )
    hf.load_state_dict(weights, assign=True, strict=False)
    if config.tie_word_embeddings:
        hf.tie_weights()
    # Buffers (RoPE frequencies) were built on the meta device: build them for real.
    for name, module in list(hf.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):
            parent_name, _, attr = name.rpartition(".")
            with torch.device(loaded.device):
                setattr(hf.get_submodule(parent_name), attr, type(module)(config))
    return hf.eval()


def _unfused_parameters(model: Any) -> dict[str, Any]:
    """``model``'s parameters by the names of a model without fused projections: each
    shard of a ``MergedLinear`` (``qkv_proj``, ``gate_up_proj``) as a view named like
    Hugging Face's separate projection (``q_proj`` ...)."""
    from ..engine.layers import MergedLinear

    weights: dict[str, Any] = {}
    fused: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, MergedLinear):
            parent = name.rsplit(".", 1)[0]
            for shard, (start, size) in module.offsets.items():
                weights[f"{parent}.{_SHARD_NAMES[shard]}.weight"] = module.weight[start:start + size]
                if module.bias is not None:
                    weights[f"{parent}.{_SHARD_NAMES[shard]}.bias"] = module.bias[start:start + size]
            fused.update({f"{name}.weight", f"{name}.bias"})
    for name, param in model.named_parameters():
        if name not in fused:
            weights[name] = param
    return weights


def _checkpoint_names(model: Any) -> Callable[[str], str]:
    """How ``model``'s loader maps a checkpoint (transformers) parameter name to ours."""
    from ..engine.models import llava, llava_video, qwen2_5_vl

    # The loaders' own mappings: one rule for the checkpoint's names and the peer's.
    by_class = {
        "LlavaForConditionalGeneration": llava._our_name,
        "LlavaNextForConditionalGeneration": llava._our_name,
        "Qwen2_5_VLForConditionalGeneration": qwen2_5_vl._our_name,
        "LlavaNextVideoForConditionalGeneration":
            lambda n: llava._our_name(llava_video._our_name(n)),
    }
    name = type(model).__name__
    if name not in by_class:
        raise ValueError(f"model: no transformers peer for the multimodal {name}")
    return by_class[name]


def _multimodal(loaded: LoadedModel) -> Any:
    """transformers' class of the checkpoint's ``architectures`` (``LlavaForConditionalGeneration``,
    ``Qwen2_5_VLForConditionalGeneration`` ...) built from its whole config (vision part
    included), every parameter a view of ours found through the loader's name mapping.

    Parameters are made on the meta device and assigned; buffers (RoPE frequencies, CLIP's
    position ids) are built for real on the CPU, then moved to ``loaded.device``.
    """
    import accelerate
    import transformers
    from transformers import AutoConfig

    hf_config = dict(loaded.model_config.hf_config or {})
    arch = (hf_config.pop("architectures", None) or [type(loaded.model).__name__])[0]
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise ValueError(f"model: transformers has no {arch} (the checkpoint's architecture)")
    config = AutoConfig.for_model(hf_config.pop("model_type"), **hf_config)
    with accelerate.init_empty_weights(include_buffers=False):
        hf = cls._from_config(config, dtype=loaded.model_config.torch_dtype)
    ours = _unfused_parameters(loaded.model)
    to_ours = _checkpoint_names(loaded.model)
    weights = {}
    for name, _ in hf.named_parameters():
        mapped = to_ours(name)
        if mapped in ours:
            weights[name] = ours.pop(mapped)
    missing = sorted({n for n, _ in hf.named_parameters()} - set(weights))
    if missing or ours:
        raise ValueError(f"model: no transformers counterpart for {(missing + sorted(ours))[:8]}")
    hf.load_state_dict(weights, assign=True, strict=False)
    hf.tie_weights()  # a no-op unless the config ties the embeddings
    return hf.to(loaded.device).eval()
