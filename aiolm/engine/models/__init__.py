"""Model implementations, looked up by Hugging Face architecture name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..model_config import SUPPORTED_ARCHITECTURES, check_architecture

if TYPE_CHECKING:
    from torch import nn

__all__ = ["SUPPORTED_ARCHITECTURES", "model_class"]


def model_class(architecture: str) -> type[nn.Module]:
    """The class implementing ``architecture``; ValueError listing the supported ones.

    Llama, Mistral, Qwen2 and Qwen3 share one implementation whose options (q/k/v bias,
    q/k norm, tied embeddings, RoPE scaling) come from the ``ModelConfig``.
    """
    check_architecture(architecture)
    from .llama import LlamaForCausalLM

    return LlamaForCausalLM
