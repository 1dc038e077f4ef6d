"""The engine's options, validated once (a frozen value object).

:class:`EngineConfig` holds every option of ``aiolm.Engine(...)``. Building one checks each
value and raises ``ValueError`` / ``TypeError`` naming the argument, so a typo fails before
any weights load. Values that depend on the machine (``"auto"`` device, dtype, backend,
KV size) are resolved later by the runner, which knows what was loaded where.
"""

from __future__ import annotations

import math
from typing import Any

import attrs

__all__ = [
    "ATTENTION_BACKENDS",
    "DTYPES",
    "LOAD_FORMATS",
    "QUANTIZATIONS",
    "SCHEDULE_POLICIES",
    "EngineConfig",
    "check_quantization",
]

ATTENTION_BACKENDS = ("auto", "torch", "triton", "flashinfer", "hybrid")
SCHEDULE_POLICIES = ("lpm", "dfs-weight", "fcfs")
LOAD_FORMATS = ("auto", "dummy")
DTYPES = ("auto", "float32", "float16", "bfloat16")
QUANTIZATIONS = ("auto", "int8", "int4", None)


def check_quantization(value: Any) -> None:
    """Raise ValueError unless ``value`` is one of ``QUANTIZATIONS``."""
    if value not in QUANTIZATIONS:
        raise ValueError(
            f"quantization: must be one of {', '.join(map(repr, QUANTIZATIONS))}, got {value!r}"
        )


def _one_of(name: str, allowed: tuple[str, ...]):
    def check(_inst: Any, _attr: Any, value: Any) -> None:
        if not isinstance(value, str):
            raise TypeError(f"{name}: expected a string, got {type(value).__name__}")
        if value not in allowed:
            raise ValueError(f"{name}: must be one of {', '.join(map(repr, allowed))}, got {value!r}")

    return check


def _int_at_least(name: str, lo: int, *, optional: bool = False):
    def check(_inst: Any, _attr: Any, value: Any) -> None:
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
        if value < lo:
            raise ValueError(f"{name}: must be >= {lo}, got {value}")

    return check


def _bool(name: str):
    def check(_inst: Any, _attr: Any, value: Any) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")

    return check


def _check_model(_inst: Any, _attr: Any, value: Any) -> None:
    import os

    if value is None:
        return
    if not isinstance(value, str | os.PathLike):
        raise TypeError(f"model: expected a path or a name, got {type(value).__name__}")
    if not str(value):
        raise ValueError("model: must not be empty (use None for the embedded default model)")


def _model_converter(value: Any) -> Any:
    import os

    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _check_device(_inst: Any, _attr: Any, value: Any) -> None:
    if not isinstance(value, str):
        raise TypeError(f"device: expected a string, got {type(value).__name__}")
    head, _, index = value.partition(":")
    if value == "auto" or (head in ("cpu", "cuda") and (not index or index.isdigit())):
        if head == "cpu" and index:
            raise ValueError(f"device: 'cpu' takes no index, got {value!r}")
        return
    raise ValueError(f"device: must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}")


def _check_mem_fraction(_inst: Any, _attr: Any, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"mem_fraction: expected a number, got {type(value).__name__}")
    if not math.isfinite(value) or not 0.0 < value < 1.0:
        raise ValueError(f"mem_fraction: must be in (0, 1), got {value}")


def _positive_seconds(name: str):
    def check(_inst: Any, _attr: Any, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{name}: expected a number of seconds, got {type(value).__name__}")
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name}: must be a positive number of seconds, got {value}")

    return check


def _check_tp_size(_inst: Any, _attr: Any, value: Any) -> None:
    _int_at_least("tp_size", 1)(_inst, _attr, value)
    if value != 1:
        raise ValueError(
            f"tp_size: only 1 is supported (one device per engine), got {value}; "
            "run one Engine per GPU instead"
        )


@attrs.frozen(kw_only=True)
class EngineConfig:
    """Every option of :class:`aiolm.Engine`.

    - ``model``: a local Hugging Face directory, a ``.gguf`` file, or (with
      ``load_format="dummy"``) a named config such as ``"tiny-llama"``; ``None`` is the
      embedded SmolLM2-135M-Instruct.
    - ``dtype``: weights/activations dtype; ``"auto"`` is float32 on the CPU, bfloat16 on CUDA.
    - ``device``: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    - ``attention_backend``: ``"auto"`` picks torch on the CPU and the fastest kernels on
      CUDA (``"hybrid"``: flashinfer for extend, triton for decode; ``"triton"`` without
      flashinfer).
    - ``schedule_policy``: the order waiting requests are admitted in (``"lpm"``: longest
      prefix match; ``"dfs-weight"``: the paper's DFS order; ``"fcfs"``).
    - ``enable_radix_cache``: share KV across requests by prefix (off: the ablation).
    - ``chunked_prefill_size``: the most prompt tokens one forward pass computes
      (``None``: 8192 on CUDA, 2048 on the CPU).
    - ``max_running_requests``: the most requests decoding together (``None``: 256 on CUDA,
      64 on the CPU).
    - ``max_total_tokens``: KV slots in the pool (``None``: sized from ``mem_fraction`` of
      free GPU memory; on the CPU, room for two full-context requests, at least 4096
      slots, within 10% of available RAM).
    - ``mem_fraction``: the share of free GPU memory after loading the weights given to KV.
    - ``cuda_graphs``: capture decode steps in CUDA graphs (CUDA only).
    - ``load_format``: ``"auto"`` (a Hugging Face directory or a ``.gguf`` file, by what
      the path is) or ``"dummy"`` (random weights of a named config, for tests and benchmarks).
    - ``quantization``: weight-only quantized projections and LM head on the CPU.
      ``"auto"`` keeps a quantized GGUF quantized (Q4_0/Q4_1 → int4, other types → int8)
      and does nothing on CUDA or for float checkpoints; ``"int8"``/``"int4"`` quantize
      any checkpoint at load (the CPU only); None keeps the exact float weights.
    - ``tp_size``: tensor parallelism; only 1 is supported.
    - ``seed``: seeds dummy weights and the sampler's shared random generator.
    - ``jump_forward``: append the tokens a constraint forces in one pass.
    - ``aging_limit``: how many scheduling passes a waiting request may be overtaken by
      better-placed ones before it goes first (the starvation bound).
    - ``request_step_timeout``: the engine's watchdog. The seconds of host-side work one
      request may take in one step (its constraint mask, advancing its matcher, stop checks,
      detokenization); a request over it is aborted with an ``EngineError`` while the
      others go on. The forward pass itself cannot be interrupted and is not counted.
    - ``close_timeout``: the most seconds ``Engine.aclose()`` waits for the loop to stop
      (it stops after its current step); past it the engine is marked failed and left.
    - ``num_threads``: torch's intra-op CPU threads for the engine's thread (``None``: on the
      CPU, the usable cores minus one, at least 1, leaving the event loop a core; on CUDA,
      torch's own setting is kept). NOTE: ``torch.set_num_threads`` is process-wide in
      effect: it also becomes the count of every thread that starts torch work later
      (threads that already ran torch work keep theirs).
    - ``compile``: compile the CPU decode step with ``torch.compile`` (inductor's CPU code),
      warmed at start and cached on disk by inductor. Off by default: the first start
      compiles for about a minute on a small laptop CPU. Ignored on CUDA (CUDA graphs).
    """

    model: str | None = attrs.field(default=None, converter=_model_converter, validator=_check_model)
    dtype: str = attrs.field(default="auto", validator=_one_of("dtype", DTYPES))
    device: str = attrs.field(default="auto", validator=_check_device)
    attention_backend: str = attrs.field(
        default="auto", validator=_one_of("attention_backend", ATTENTION_BACKENDS)
    )
    schedule_policy: str = attrs.field(
        default="lpm", validator=_one_of("schedule_policy", SCHEDULE_POLICIES)
    )
    enable_radix_cache: bool = attrs.field(default=True, validator=_bool("enable_radix_cache"))
    chunked_prefill_size: int | None = attrs.field(
        default=None, validator=_int_at_least("chunked_prefill_size", 1, optional=True)
    )
    max_running_requests: int | None = attrs.field(
        default=None, validator=_int_at_least("max_running_requests", 1, optional=True)
    )
    max_total_tokens: int | None = attrs.field(
        default=None, validator=_int_at_least("max_total_tokens", 1, optional=True)
    )
    mem_fraction: float = attrs.field(default=0.85, validator=_check_mem_fraction)
    cuda_graphs: bool = attrs.field(default=True, validator=_bool("cuda_graphs"))
    load_format: str = attrs.field(default="auto", validator=_one_of("load_format", LOAD_FORMATS))
    quantization: str | None = attrs.field(
        default="auto", validator=lambda _inst, _attr, value: check_quantization(value))
    tp_size: int = attrs.field(default=1, validator=_check_tp_size)
    seed: int = attrs.field(default=0, validator=_int_at_least("seed", 0))
    jump_forward: bool = attrs.field(default=True, validator=_bool("jump_forward"))
    aging_limit: int = attrs.field(default=16, validator=_int_at_least("aging_limit", 0))
    request_step_timeout: float = attrs.field(
        default=5.0, validator=_positive_seconds("request_step_timeout"))
    close_timeout: float = attrs.field(default=10.0, validator=_positive_seconds("close_timeout"))
    num_threads: int | None = attrs.field(
        default=None, validator=_int_at_least("num_threads", 1, optional=True))
    compile: bool = attrs.field(default=False, validator=_bool("compile"))

    def __attrs_post_init__(self) -> None:
        if self.load_format == "dummy" and self.model is None:
            raise ValueError("model: load_format='dummy' needs a named config, e.g. 'tiny-llama'")
        if self.quantization in ("int8", "int4") and self.device.startswith("cuda"):
            raise ValueError(
                f"quantization: {self.quantization!r} is for the CPU only; on CUDA pass "
                "quantization=None or 'auto'"
            )
