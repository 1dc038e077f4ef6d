"""Building blocks of the Llama-family models (plain torch)."""

from .activation import SiluAndMul
from .embedding import LMHead, VocabEmbedding
from .linear import MergedLinear
from .norm import RMSNorm
from .rotary import RotaryEmbedding, rope_inv_freq

__all__ = [
    "LMHead", "MergedLinear", "RMSNorm", "RotaryEmbedding", "SiluAndMul", "VocabEmbedding",
    "rope_inv_freq",
]
