"""Attention backends: ``torch`` (exact, CPU and reference), ``triton``, ``flashinfer``."""

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


register("torch", _torch)
register("triton", _triton)
register("flashinfer", _flashinfer)

__all__ = ["AttentionBackend", "available", "create", "register"]
