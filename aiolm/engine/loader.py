"""Build a model and fill its weights: a local Hugging Face directory, a GGUF file, or dummy.

- HF directory: ``config.json`` + ``*.safetensors`` (one file, or shards with an index json).
- GGUF file: the config from the file's metadata, tensors dequantized with the ``gguf``
  package to the target dtype (llama.cpp's Q/K row permutation for llama-arch RoPE undone).
- ``load_format="dummy"``: random weights (deterministic by ``seed``) of a named config
  (``ModelConfig.named``), a ``ModelConfig``, a HF config dict, or a path's config.

Nothing here touches the network. The model is built on the meta device and materialised
once on the target device, so no time goes into default initialisation.

``quantization`` swaps the projections and the LM head for weight-only int8/int4 layers
after loading (the CPU only; ``layers/quant.py``). Each stage logs its time on the
``aiolm.engine`` logger at INFO.

``tp`` (a :class:`~aiolm.engine.parallel.TPGroup`) loads one rank's shard of a
tensor-parallel model: safetensors are read through lazy slices (only the rank's rows or
columns leave the file), a GGUF file's tensors are dequantized whole and cut, and dummy
weights are drawn at full size in the single-device order, then cut, so every ``tp_size``
gives the same model.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import LOAD_FORMATS, check_quantization, resolve_device
from .model_config import NAMED_CONFIGS, ModelConfig, dtype_name

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .parallel import TPGroup

__all__ = ["load_model", "read_model_config"]

_DUMMY_STD = 0.02
_log = logging.getLogger("aiolm.engine")


def load_model(
    model: str | os.PathLike[str] | ModelConfig | Mapping[str, Any],
    *,
    load_format: str = "auto",
    dtype: Any = "auto",
    device: Any = "cpu",
    seed: int = 0,
    quantization: str | None = None,
    tp: TPGroup | None = None,
) -> tuple[nn.Module, ModelConfig]:
    """Return ``(model, config)``; ``config.dtype`` is the dtype the weights were loaded in.

    ``model``: a HF directory, a ``.gguf`` file, or (with ``load_format="dummy"``) a named
    config / ``ModelConfig`` / HF config dict. ``dtype="auto"`` is float32 on the CPU and the
    checkpoint's dtype elsewhere. ``quantization``: None keeps the float weights;
    ``"int8"``/``"int4"`` quantize the projections and LM head (the CPU only);
    ``"auto"`` does what a quantized GGUF stores on the CPU (Q4_0/Q4_1 → ``"int4"``, other
    quantized types → ``"int8"``) and nothing on CUDA or for a float checkpoint.
    ``tp``: load this rank's shard (see the module docstring); quantization is then
    ``None`` or ``"auto"`` (which keeps the weights float).
    Raises FileNotFoundError naming a missing path, ValueError for an unsupported
    architecture (listing the supported ones) or a bad argument.
    """
    import torch

    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format: must be one of {', '.join(map(repr, LOAD_FORMATS))}, "
                         f"got {load_format!r}")
    check_quantization(quantization)
    device = resolve_device(device)
    started = time.perf_counter()
    source, config = _resolve_source(model, load_format)
    if source is not None:
        _log.info("read %s: %.2f s", _shown(model), time.perf_counter() - started)
    target = _resolve_dtype(dtype, config, device)
    config = _with_dtype(config, target)
    sharded = tp is not None and tp.size > 1
    if sharded:
        from .parallel import check_tensor_parallel

        check_tensor_parallel(config, tp.size)
        if quantization not in (None, "auto"):
            raise ValueError(f"quantization: {quantization!r} does not combine with tp_size > 1 "
                             "(the CPU's quantized kernels run one process); pass None or 'auto'")
        quantization = None
    scheme = resolve_quantization(quantization, source, device)

    from .models import model_class

    started = time.perf_counter()
    cls = model_class(config.architecture)
    with torch.device("meta"):
        module = cls(config, tp=tp) if sharded else cls(config)
    module = module.to(dtype=getattr(torch, target)).to_empty(device=device)
    stored: dict[Any, Any] = {}
    if load_format == "dummy":
        _fill_dummy(module, seed, device, sharded=sharded)
    elif isinstance(source, Path):
        module.load_weights(_safetensors_weights(source, lazy=sharded))
    else:
        stored = module.load_weights(source.weights(config, keep_int4=scheme == "int4"))
    module.init_buffers()
    module.eval()
    _log.info("built the model (%s, %s): %.2f s", config.architecture, target,
              time.perf_counter() - started)
    if scheme is not None:
        from .layers.quant import quantize_model

        started = time.perf_counter()
        from_codes = len(stored)   # quantize_model takes the entries it packs
        counts = quantize_model(module, scheme, stored)
        _log.info("quantized to %s (%d int4 and %d int8 layers; %d weight shards packed "
                  "from the file's 4-bit codes): %.2f s", scheme, counts["int4"],
                  counts["int8"], from_codes - len(stored), time.perf_counter() - started)
    return module, config


def read_model_config(model: str | os.PathLike[str], load_format: str = "auto") -> ModelConfig:
    """The :class:`ModelConfig` of ``model`` (a HF directory's ``config.json``, a GGUF file's
    metadata, or a named config with ``load_format="dummy"``), without loading weights.
    Raises as :func:`load_model` does for a missing or unsupported model."""
    return _resolve_source(model, load_format)[1]


def resolve_quantization(quantization: str | None, source: Any,
                         device: torch.device) -> str | None:
    """The scheme ``quantization`` means for this checkpoint on ``device``: ``"int8"``,
    ``"int4"`` or None. Raises ValueError for ``"int8"``/``"int4"`` off the CPU."""
    if quantization is None:
        return None
    if device.type != "cpu":
        if quantization == "auto":
            return None
        raise ValueError(
            f"quantization: {quantization!r} is for the CPU only (torch's weight-only "
            f"kernels); on {device.type} pass quantization=None or 'auto'"
        )
    if quantization != "auto":
        return quantization
    stored = getattr(source, "stored_quantization", None)
    return stored() if stored is not None else None


def _shown(model: Any) -> str:
    return repr(os.fspath(model)) if isinstance(model, str | os.PathLike) else "the config"


def _resolve_source(model: Any, load_format: str) -> tuple[Any, ModelConfig]:
    """``(source, config)``: source is a HF directory, a ``GGUFCheckpoint`` or None (dummy)."""
    if isinstance(model, ModelConfig):
        _require_dummy(load_format, "a ModelConfig")
        return None, model
    if isinstance(model, Mapping):
        _require_dummy(load_format, "a config dict")
        return None, ModelConfig.from_hf(model)
    if not isinstance(model, str | os.PathLike):
        raise TypeError(
            f"model: expected a path, a named config, a ModelConfig or a config dict, "
            f"got {type(model).__name__}"
        )
    if load_format == "dummy" and str(model) in NAMED_CONFIGS:
        return None, ModelConfig.named(str(model))
    path = Path(model).expanduser()
    if not path.exists():
        if str(model) in NAMED_CONFIGS:
            hint = f" ({model!r} is a named config: pass load_format='dummy' for random weights)"
        elif load_format == "dummy":
            hint = f" and not a named config ({', '.join(NAMED_CONFIGS)})"
        elif "/" in str(model) and not str(model).startswith((".", "/", "~")):
            hint = (f" ({model!r} looks like a Hugging Face hub id: aiolm never downloads "
                    "weights; download the model yourself and pass its local directory)")
        else:
            hint = ""
        raise FileNotFoundError(f"model: no such file or directory: {str(path)!r}{hint}")
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"model: {str(path)!r} has no config.json")
        return path, ModelConfig.from_hf(json.loads(config_file.read_text()))
    if path.suffix == ".gguf":
        from .gguf_weights import GGUFCheckpoint

        checkpoint = GGUFCheckpoint(path)
        return checkpoint, checkpoint.config
    raise ValueError(
        f"model: {str(path)!r} is neither a Hugging Face directory nor a .gguf file"
    )


def _require_dummy(load_format: str, what: str) -> None:
    if load_format != "dummy":
        raise ValueError(f"model: {what} has no weights; pass load_format='dummy'")


def _resolve_dtype(dtype: Any, config: ModelConfig, device: torch.device) -> str:
    if dtype == "auto":
        # CPU half-precision matmuls are slow and drift from the references: use float32.
        return "float32" if device.type == "cpu" else config.dtype
    return dtype_name(dtype)


def _with_dtype(config: ModelConfig, dtype: str) -> ModelConfig:
    import attrs

    return attrs.evolve(config, dtype=dtype)


def _fill_dummy(module: nn.Module, seed: int, device: torch.device, *,
                sharded: bool = False) -> None:
    """Norm weights 1, everything else N(0, 0.02): finite, bounded activations at any size.

    ``sharded``: a sharded parameter is drawn at its full size and cut (its module's
    ``full_shape`` / ``take_shard``), so the generator runs as for the whole model."""
    import torch

    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            module_name, _, kind = name.rpartition(".")
            owner = module.get_submodule(module_name)
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif sharded and hasattr(owner, "take_shard"):
                full = torch.empty(owner.full_shape(kind), dtype=param.dtype, device=device)
                param.copy_(owner.take_shard(kind, full.normal_(0.0, _DUMMY_STD,
                                                                generator=generator)))
            else:
                param.normal_(0.0, _DUMMY_STD, generator=generator)


class _LazySlice:
    """A checkpoint tensor not yet read: ``.shape``, and ``[...]`` reads that part of it."""

    def __init__(self, handle: Any) -> None:
        import torch

        self._handle = handle
        self.shape = torch.Size(handle.get_shape())

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self._handle[index]


def _safetensors_weights(directory: Path, *, lazy: bool = False,
                         ) -> Iterator[tuple[str, torch.Tensor | _LazySlice]]:
    """Every tensor of the directory's safetensors files; with ``lazy``, as
    :class:`_LazySlice` (valid until the next one is yielded)."""
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({directory / name for name in weight_map.values()})
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model: {str(directory)!r} has no *.safetensors weights")
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"model: shard {str(file)!r} listed in the index is missing")
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, _LazySlice(f.get_slice(name)) if lazy else f.get_tensor(name)
