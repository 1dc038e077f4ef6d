"""Attention backends: ``torch`` (exact, CPU and reference), ``triton``, ``flashinfer``,
and ``hybrid`` (flashinfer for extend, triton for decode)."""

from .base import AttentionBackend, available, create, register


def _torch():
    from .torch_backend import TorchAttention

    return TorchAttention


def _triton():
    from .triton import TritonAttention

    return TritonAttention


def _flashinfer():
    from .flashinfer import FlashInferAttention

    return FlashInferAttention


def _hybrid():
    from .hybrid import HybridAttention

    return HybridAttention


register("torch", _torch)
register("triton", _triton)
register("flashinfer", _flashinfer)
register("hybrid", _hybrid)

__all__ = ["AttentionBackend", "available", "create", "register"]
