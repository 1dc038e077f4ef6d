"""The engine's options, declared once and validated once (a frozen value object).

:class:`EngineConfig` declares every option of ``aiolm.Engine(...)``: its name, type,
default, allowed values and help text, each on its own field. Everything else is derived
from that declaration: the keyword arguments of :class:`aiolm.Engine` (whose signature
takes its defaults from here; tests/test_engine_config.py checks the two agree), the
engine flags of ``aiolm serve``, ``aiolm bench`` and ``aiolm demo`` (:mod:`aiolm.cli`),
and the option list in this class's docstring.

Building an :class:`EngineConfig` checks each value and raises ``ValueError`` /
``TypeError`` naming the argument, so a typo fails before any weights load. Values that
depend on the machine (``"auto"`` device, dtype, backend, KV size) are resolved later:
the device by :func:`resolve_device`, the rest by the runner, which knows what was
loaded where. Importing this module imports neither torch nor anything else heavy.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

import attrs

from ..constraints.limits import ConstraintLimits

if TYPE_CHECKING:
    import torch

__all__ = [
    "ATTENTION_BACKENDS",
    "DTYPES",
    "LOAD_FORMATS",
    "QUANTIZATIONS",
    "SCHEDULE_POLICIES",
    "EngineConfig",
    "check_quantization",
    "resolve_device",
]

ATTENTION_BACKENDS = ("auto", "torch", "triton", "flashinfer", "hybrid")
SCHEDULE_POLICIES = ("lpm", "dfs-weight", "fcfs")
LOAD_FORMATS = ("auto", "dummy")
DTYPES = ("auto", "float32", "float16", "bfloat16")
QUANTIZATIONS = ("auto", "int8", "int4", None)


def _check_choice(name: str, allowed: tuple[str | None, ...], value: Any) -> None:
    if value is None and None in allowed:
        return
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected a string, got {type(value).__name__}")
    if value not in allowed:
        raise ValueError(f"{name}: must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def check_quantization(value: Any) -> None:
    """Raise ValueError unless ``value`` is one of ``QUANTIZATIONS`` (TypeError for a
    value that is neither a string nor None)."""
    _check_choice("quantization", QUANTIZATIONS, value)


def _check_device_name(value: Any) -> None:
    if not isinstance(value, str):
        raise TypeError(f"device: expected a string, got {type(value).__name__}")
    head, _, index = value.partition(":")
    if value == "auto" or (head in ("cpu", "cuda") and (not index or index.isdigit())):
        if head == "cpu" and index:
            raise ValueError(f"device: 'cpu' takes no index, got {value!r}")
        return
    raise ValueError(f"device: must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}")


def resolve_device(device: str | torch.device) -> torch.device:
    """The ``torch.device`` an engine's ``device`` option means on this machine: ``"auto"``
    is CUDA when available, else the CPU; a ``torch.device`` is taken as it is.

    Raises ``ValueError`` naming ``device`` for a name that is not ``"auto"``, ``"cpu"``,
    ``"cuda"`` or ``"cuda:N"``, or for CUDA where there is none (``TypeError`` for
    another type). Imports torch.
    """
    import torch

    if isinstance(device, torch.device):
        dev = device
    else:
        _check_device_name(device)
        if device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {str(dev)!r} asked for, but CUDA is not available")
    return dev


# ------------------------------------------------------------------ validators
# Each names the option by its field (``attribute.name``), so that one validator serves
# every option of its kind.


def _one_of(allowed: tuple[str | None, ...]):
    def check(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        _check_choice(attribute.name, allowed, value)

    return check


def _int_at_least(lo: int, *, optional: bool = False):
    def check(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{attribute.name}: expected an int, got {type(value).__name__}")
        if value < lo:
            raise ValueError(f"{attribute.name}: must be >= {lo}, got {value}")

    return check


def _check_extend_graph_tokens(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    _int_at_least(0)(inst, attribute, value)
    if 0 < value < 32:
        raise ValueError(f"{attribute.name}: 0 (eager extends) or at least 32 (the smallest "
                         f"captured bucket), got {value}")


def _check_bool(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{attribute.name}: expected a bool, got {type(value).__name__}")


def _check_optional_bool(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None:
        _check_bool(_inst, attribute, value)


def _check_model(_inst: Any, _attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise TypeError(f"model: expected a path or a name, got {type(value).__name__}")
    if not value:
        raise ValueError("model: must not be empty (use None for the embedded default model)")


def _model_converter(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _check_device(_inst: Any, _attribute: attrs.Attribute, value: Any) -> None:
    _check_device_name(value)


def _check_mem_fraction(_inst: Any, _attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"mem_fraction: expected a number, got {type(value).__name__}")
    if not math.isfinite(value) or not 0.0 < value < 1.0:
        raise ValueError(f"mem_fraction: must be in (0, 1), got {value}")


def _check_seconds(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{attribute.name}: expected a number of seconds, got "
                        f"{type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{attribute.name}: must be a positive number of seconds, got {value}")


#: The most tensor-parallel ranks an engine runs (one host's GPUs).
MAX_TP_SIZE = 64


def _check_tp_size(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    _int_at_least(1)(_inst, attribute, value)
    if value > MAX_TP_SIZE:
        raise ValueError(f"tp_size: at most {MAX_TP_SIZE} ranks (the GPUs of one host), "
                         f"got {value}")


def _check_template(_inst: Any, _attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and not isinstance(value, str | os.PathLike):
        raise TypeError(f"chat_template: expected Jinja source or a path, got "
                        f"{type(value).__name__}")


def _check_constraint_limits(_inst: Any, _attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, ConstraintLimits):
        raise TypeError(f"constraint_limits: expected an aiolm.constraints.ConstraintLimits, "
                        f"got {type(value).__name__}")


def _option(default: Any, help: str, *, validator: Any = None, choices: tuple[Any, ...] = (),
            converter: Any = None, flag: str | None = None, cli: bool = True,
            aliases: tuple[str, ...] = ()) -> Any:
    """One option's declaration: an attrs field whose metadata carries what the command
    line and the docs need. ``choices``: the allowed values (validated here, offered as
    the flag's choices; ``None`` among them is ``none`` on the command line); ``flag``: the
    command-line name of a bool option's ``--X`` / ``--no-X`` pair (default: the name's);
    ``aliases``: more names of the flag (``"--tp"``); ``cli=False``: a structured value
    the command line does not take."""
    if choices:
        validator = _one_of(choices)
    return attrs.field(default=default, validator=validator, converter=converter,
                       metadata={"help": help, "choices": choices, "flag": flag, "cli": cli,
                                 "aliases": aliases})


@attrs.frozen(kw_only=True)
class EngineConfig:
    """Every option of :class:`aiolm.Engine` (the list below is built from the fields)."""

    model: str | None = _option(
        None, "a Hugging Face model directory or a .gguf file; with load_format 'dummy', a "
        "named config such as 'tiny-llama' (default: the embedded SmolLM2-135M-Instruct)",
        converter=_model_converter, validator=_check_model)
    dtype: str = _option(
        "auto", "the weights' and activations' dtype; 'auto' is float32 on the CPU and, on "
        "CUDA, the checkpoint's own (config.json's torch_dtype; bfloat16 for a GGUF file or "
        "when the config names none)", choices=DTYPES)
    device: str = _option(
        "auto", "'auto' (CUDA when available, else the CPU), 'cpu', 'cuda' or 'cuda:N'",
        validator=_check_device)
    attention_backend: str = _option(
        "auto", "'auto' is torch on the CPU; on CUDA, 'hybrid' (flashinfer for extend "
        "passes, our Triton kernels for decode) when flashinfer is installed and the model "
        "is float16/bfloat16, else 'triton'", choices=ATTENTION_BACKENDS)
    schedule_policy: str = _option(
        "lpm", "the order waiting requests are admitted in: 'lpm' (longest cached prefix "
        "first), 'dfs-weight' (the SGLang paper's DFS order), 'fcfs' (arrival)",
        choices=SCHEDULE_POLICIES)
    enable_radix_cache: bool = _option(
        True, "share KV across requests by prefix (off: the ablation)",
        validator=_check_bool, flag="radix-cache")
    chunked_prefill_size: int | None = _option(
        None, "the most prompt tokens one forward pass computes (default: 8192 on CUDA, "
        "2048 on the CPU)", validator=_int_at_least(1, optional=True))
    max_running_requests: int | None = _option(
        None, "the most requests decoding together (default: 512 on CUDA, fewer when the KV pool "
        "holds under 512 slots for each; 64 on the CPU)",
        validator=_int_at_least(1, optional=True))
    max_total_tokens: int | None = _option(
        None, "KV slots in the pool (default: mem_fraction of the free GPU memory; on the "
        "CPU, room for two full-context requests, at least 4096 slots, within 10% of the "
        "available RAM)", validator=_int_at_least(1, optional=True))
    mem_fraction: float = _option(
        0.85, "the share of the free GPU memory, after the weights load, given to the KV "
        "pool", validator=_check_mem_fraction)
    cuda_graphs: bool = _option(
        True, "replay decode steps from CUDA graphs captured at bucketed batch sizes (CUDA "
        "only)", validator=_check_bool)
    extend_graph_tokens: int = _option(
        512, "small extend passes (jump-forward's forced tokens and the decode steps riding "
        "with them, short appends) of at most this many tokens, none over 64 a request, "
        "replay from CUDA graphs captured at 32, 64, 128, ... tokens up to it (with "
        "cuda_graphs, the triton and hybrid backends, one device); 0: they run eagerly",
        validator=_check_extend_graph_tokens)
    load_format: str = _option(
        "auto", "'auto' (a Hugging Face directory or a .gguf file, by what the path is) or "
        "'dummy' (random weights of a named config, for tests and benchmarks)",
        choices=LOAD_FORMATS)
    quantization: str | None = _option(
        "auto", "weight-only quantized projections and LM head on the CPU: 'auto' keeps a "
        "quantized GGUF quantized (Q4_0/Q4_1 as int4, other types as int8) and does nothing "
        "on CUDA or for a float checkpoint; 'int8'/'int4' quantize any checkpoint at load "
        "(the CPU only); none keeps the exact float weights", choices=QUANTIZATIONS)
    tp_size: int = _option(
        1, "tensor parallelism: split the model over this many GPUs (cuda:0..N-1 from the "
        "engine's device; NCCL) or CPU processes (gloo), one worker process per rank beyond "
        "the engine's own; the dense Llama family, heads and intermediate size divisible by "
        "it (KV heads replicated when fewer); no CPU quantization or compile with it. A "
        "script that opens such an engine must guard its top level with if __name__ == "
        "'__main__' (the workers are spawned)", validator=_check_tp_size, aliases=("--tp",))
    seed: int = _option(0, "seeds dummy weights and the sampler's shared random generator",
                        validator=_int_at_least(0))
    jump_forward: bool = _option(
        True, "append the tokens a constraint forces in one forward pass",
        validator=_check_bool)
    mix_decode: bool = _option(
        True, "running requests that miss only their next token ride along in an extend pass "
        "(jump-forward, chunked prefill) instead of waiting for the next decode pass",
        validator=_check_bool)
    shared_prefix_min_tokens: int | None = _option(
        None, "decode reads a cached prefix of at least this many tokens that several "
        "running requests share (an image, few-shot examples, a fork's trunk) once for all "
        "of them, not once per request (cascade attention; the triton and hybrid backends, "
        "one device; CUDA graphs are captured a second time for the grouped steps). None "
        "(the default): 1024 for a multi-head model (as many KV heads as query heads) on "
        "CUDA, where it pays, else off; 0: off — see docs/engine.md for what was measured",
        validator=_int_at_least(0, optional=True))
    aging_limit: int = _option(
        16, "how many scheduling passes a waiting request may be overtaken by better-placed "
        "ones before it goes first (the starvation bound)", validator=_int_at_least(0))
    request_step_timeout: float = _option(
        5.0, "the watchdog: the seconds of host work one request may take in one engine step "
        "(its constraint mask, matcher, stop checks, detokenization); a request over it is "
        "aborted with EngineError while the others go on (the forward pass is not counted)",
        validator=_check_seconds)
    close_timeout: float = _option(
        10.0, "the most seconds closing the engine waits for its loop to stop (after its "
        "current step); past it the engine is marked failed and left",
        validator=_check_seconds)
    num_threads: int | None = _option(
        None, "torch's intra-op CPU threads for the engine's thread (default: on the CPU, the "
        "usable cores minus one, at least 1, leaving the event loop a core; on CUDA, torch's "
        "own setting). NOTE: torch's thread count is process-wide: later torch work in other "
        "threads gets it too", validator=_int_at_least(1, optional=True))
    overlap: bool | None = _option(
        None, "overlap the host's work with the device's: the next step is scheduled and "
        "launched while the current one runs, and each step's tokens are processed (stop "
        "checks, detokenization, streaming) while the next one runs; results are the same "
        "(see docs/engine.md for the steps that run serialized). Default: on with CUDA, off "
        "on the CPU (no asynchronous device: it would only reorder the work)",
        validator=_check_optional_bool)
    compile: bool = _option(
        False, "compile the CPU decode step with torch.compile (inductor), warmed at start and "
        "cached on disk; the first start compiles for about a minute. Ignored on CUDA (CUDA "
        "graphs)", validator=_check_bool)
    escape_special_tokens: bool = _option(
        True, "special-token text inside chat message content (a user typing "
        "'<|im_end|>') is encoded as ordinary tokens, so it cannot forge a turn; the chat "
        "template's own markers stay control tokens and raw text prompts are never escaped. "
        "Off: chat content is encoded as raw text too", validator=_check_bool)
    chat_template: str | os.PathLike[str] | None = _option(
        None, "a Jinja chat template used in place of the tokenizer's own (as vLLM's and "
        "SGLang's --chat-template): a file, read when the Engine is built; in Python also "
        "its source text (a string with '{' or a line break; any other string is a path)",
        validator=_check_template)
    constraint_limits: ConstraintLimits = _option(
        ConstraintLimits(), "how much work the grammar engine (llguidance) may do for one "
        "constrained request: lexer fuel, Earley items, lexer states, grammar size (a "
        "ConstraintLimits; Python only)", validator=_check_constraint_limits, cli=False)

    def __attrs_post_init__(self) -> None:
        if self.load_format == "dummy" and self.model is None:
            raise ValueError("model: load_format='dummy' needs a named config, e.g. 'tiny-llama'")
        if self.quantization in ("int8", "int4") and self.device.startswith("cuda"):
            raise ValueError(
                f"quantization: {self.quantization!r} is for the CPU only; on CUDA pass "
                "quantization=None or 'auto'"
            )
        if self.tp_size > 1 and self.quantization in ("int8", "int4"):
            raise ValueError(f"quantization: {self.quantization!r} does not combine with "
                             f"tp_size={self.tp_size}; pass quantization=None or 'auto' (float "
                             "weights)")
        if self.tp_size > 1 and self.compile:
            raise ValueError(f"compile: the compiled CPU decode step runs one process; it does "
                             f"not combine with tp_size={self.tp_size}")


def _document(cls: type) -> None:
    """Append each option, its default and its help to ``cls``'s docstring."""
    lines = [f"- ``{f.name}`` (default ``{f.default!r}``): {f.metadata['help']}."
             for f in attrs.fields(cls)]
    cls.__doc__ = f"{cls.__doc__}\n\n" + "\n".join(lines) + "\n"


_document(EngineConfig)
