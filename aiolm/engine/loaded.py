"""Loaded weights, model config and tokenizer, shareable by engines opened one after another."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .model_config import ModelConfig
    from .parallel import TPGroup
    from .tokenizer import Tokenizer

__all__ = ["LoadedModel"]

_log = logging.getLogger("aiolm.engine")


@attrs.define(eq=False, kw_only=True)
class LoadedModel:
    """Weights, model config and tokenizer, loaded once.

    Pass it as ``Engine(model=loaded)`` to open engines without reloading (one open engine
    at a time: the weights carry the engine's attention backend).
    """

    model: nn.Module
    model_config: ModelConfig
    tokenizer: Tokenizer | None
    device: torch.device
    source: str
    load_format: str
    in_use: bool = False

    @classmethod
    def load(cls, model: str | os.PathLike[str] | None = None, *, dtype: str = "auto",
             device: str = "auto", load_format: str = "auto", seed: int = 0,
             quantization: str | None = "auto", tp: TPGroup | None = None) -> LoadedModel:
        """Load ``model`` (blocking): a HF directory, a ``.gguf`` file, or a named dummy config.

        ``None`` is the embedded SmolLM2. ``quantization`` as :func:`load_model` takes it
        (``"auto"``: a quantized GGUF stays quantized on the CPU). ``tp``: load one
        tensor-parallel rank's shard (:func:`~aiolm.engine.loader.load_model`). Each stage logs its time
        on the ``aiolm.engine`` logger at INFO. Raises ``FileNotFoundError`` for a missing
        model (saying how to install the default one), ``ValueError`` for bad arguments.
        """
        from .config import resolve_device
        from .default_model import default_model_path
        from .loader import load_model

        source = os.fspath(model) if model is not None else default_model_path()
        dev = resolve_device(device)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            tokenizer_future = None
            if load_format != "dummy":  # the tokenizer loads while the weights do
                tokenizer_future = pool.submit(_load_tokenizer, source)
            module, config = load_model(source, load_format=load_format, dtype=dtype,
                                        device=dev, seed=seed, quantization=quantization,
                                        tp=tp)
            tokenizer = tokenizer_future.result() if tokenizer_future is not None else None
        return cls(model=module, model_config=config, tokenizer=tokenizer, device=dev,
                   source=source, load_format=load_format)


def _load_tokenizer(source: str) -> Tokenizer:
    from .tokenizer import Tokenizer

    started = time.perf_counter()
    tokenizer = Tokenizer.from_pretrained(source)
    _log.info("built the tokenizer: %.2f s", time.perf_counter() - started)
    return tokenizer
