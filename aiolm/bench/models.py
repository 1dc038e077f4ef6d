"""Loading the benchmarked model once, for the engine and for the transformers peer alike.

:func:`load_for_bench` loads weights the way the engine does (``LoadedModel``) and gives
dummy weights a tokenizer (:func:`~aiolm.bench.dummy_tokenizer.bench_tokenizer`), since the
workloads are text programs. :func:`to_transformers` builds the ``transformers`` model of
the same config whose parameters *are* the engine's tensors (views, no copy), so both
systems run exactly the same weights, random or not.
"""

from __future__ import annotations

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

        loaded.tokenizer = Tokenizer(bench_tokenizer(loaded.model_config.vocab_size, seed=seed))
    return loaded


def to_transformers(loaded: LoadedModel) -> Any:
    """A ``transformers`` causal LM of ``loaded``'s config sharing its weight tensors.

    Raises ``ValueError`` if a parameter of either model has no counterpart.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..engine.layers import MergedLinear

    hf_config = loaded.model_config.to_hf()
    hf_config.pop("architectures")
    config = AutoConfig.for_model(hf_config.pop("model_type"), **hf_config)
    weights: dict[str, torch.Tensor] = {}
    fused: set[str] = set()
    for name, module in loaded.model.named_modules():
        if isinstance(module, MergedLinear):
            parent = name.rsplit(".", 1)[0]
            for shard, (start, size) in module.offsets.items():
                weights[f"{parent}.{_SHARD_NAMES[shard]}.weight"] = module.weight[start:start + size]
                if module.bias is not None:
                    weights[f"{parent}.{_SHARD_NAMES[shard]}.bias"] = module.bias[start:start + size]
            fused.update({f"{name}.weight", f"{name}.bias"})
    for name, param in loaded.model.named_parameters():
        if name not in fused:
            weights[name] = param
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
