"""Model implementations, looked up by Hugging Face architecture name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..model_config import MOE_ARCHITECTURES, SUPPORTED_ARCHITECTURES, check_architecture

if TYPE_CHECKING:
    from torch import nn

__all__ = ["SUPPORTED_ARCHITECTURES", "model_class"]


def model_class(architecture: str) -> type[nn.Module]:
    """The class implementing ``architecture``; ValueError listing the supported ones.

    Llama, Mistral, Qwen2 and Qwen3 share one implementation whose options (q/k/v bias,
    q/k norm, tied embeddings, RoPE scaling) come from the ``ModelConfig``.
    """
    check_architecture(architecture)
    if architecture == "Qwen2_5_VLForConditionalGeneration":
        from .qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration
    if architecture in ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration"):
        from . import llava

        return getattr(llava, architecture)
    if architecture == "LlavaNextVideoForConditionalGeneration":
        from .llava_video import LlavaNextVideoForConditionalGeneration

        return LlavaNextVideoForConditionalGeneration
    if architecture in MOE_ARCHITECTURES:  # Mixtral, Qwen3-MoE
        from .moe import MoEForCausalLM

        return MoEForCausalLM
    from .llama import LlamaForCausalLM

    return LlamaForCausalLM
