"""Mixture-of-Experts decoders: Mixtral and Qwen3-MoE, as one model class.

Everything but the MLP is the Llama family's (:mod:`.llama`: attention with GQA and
Qwen3's per-head q/k norm, RMSNorm, RoPE, embedding, LM head and the forward pass); a
sparse layer's MLP is a router (``mlp.gate``) over routed experts (``mlp.experts``,
:class:`~aiolm.engine.layers.fused_moe.FusedMoE`), a dense layer's (Qwen3-MoE's
``mlp_only_layers`` / ``decoder_sparse_step``) the Llama MLP. Which layers are sparse, the
expert count, ``top_k`` and the renormalisation come from the ``ModelConfig``.

Parameter names follow transformers 5's in-memory layout (``mlp.gate.weight``,
``mlp.experts.gate_up_proj [E, 2*I, H]``, ``mlp.experts.down_proj [E, H, I]``).
``load_weights`` takes that layout and the per-expert one checkpoints store (Mixtral's
``block_sparse_moe.experts.{e}.w1/w3/w2``, Qwen3-MoE's ``mlp.experts.{e}.gate_proj/
up_proj/down_proj``), packing each layer's experts as their tensors arrive.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..layers.fused_moe import FusedMoE, route
from ..layers.quant import Int4Codes
from ..model_config import ModelConfig
from .llama import LlamaDecoderLayer, LlamaForCausalLM

if TYPE_CHECKING:
    from ..parallel import TPGroup

__all__ = ["MoEForCausalLM", "SparseMoeBlock"]

# A per-expert checkpoint tensor: (layer prefix, expert, projection).
_PER_EXPERT = re.compile(
    r"^(model\.layers\.\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\."
    r"(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
# Projection -> (packed parameter, rows of it: "gate" half, "up" half, or all).
_PROJ = {"w1": ("gate_up_proj", "gate"), "gate_proj": ("gate_up_proj", "gate"),
         "w3": ("gate_up_proj", "up"), "up_proj": ("gate_up_proj", "up"),
         "w2": ("down_proj", "all"), "down_proj": ("down_proj", "all")}


class MoERouter(nn.Module):
    """Router logits ``x @ weight.T`` (``weight [E, H]``).

    Not an ``nn.Linear``, so CPU weight quantization (which swaps every ``nn.Linear``)
    leaves the routing decisions exact.
    """

    def __init__(self, num_experts: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight)


class SparseMoeBlock(nn.Module):
    """Route each token to ``top_k`` experts and sum their outputs by routing weight."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.renormalize = config.norm_topk_prob
        self.gate = MoERouter(config.num_experts, config.hidden_size)
        self.experts = FusedMoE(config.num_experts, config.hidden_size,
                                config.moe_intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)
        return self.experts(x, weights, ids)


class MoEDecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer whose MLP is a :class:`SparseMoeBlock` where the config says."""

    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__(config, layer_id)
        if config.is_sparse_layer(layer_id):
            self.mlp = SparseMoeBlock(config)


class MoEForCausalLM(LlamaForCausalLM):
    """Mixtral / Qwen3-MoE over the engine's paged KV cache; see the module docstring.

    ``forward`` (the Llama family's) returns float32 logits as ``LlamaForCausalLM`` does.
    Raises ValueError for a config without experts or a ``tp`` group of several ranks (the
    experts are not sharded across ranks).
    """

    def __init__(self, config: ModelConfig, tp: TPGroup | None = None) -> None:
        if not config.is_moe:
            raise ValueError(f"{config.architecture}: the config has no experts (num_experts=0)")
        if tp is not None and tp.size > 1:
            raise ValueError(
                f"tp_size: Mixture-of-Experts models ({config.architecture}) run on one "
                f"device; tensor parallelism shards dense models only, got tp_size={tp.size}")
        super().__init__(config)
        # NOTE: the dense layers built above live on the meta device when the loader builds
        # the model, so replacing them costs nothing.
        self.model.layers = nn.ModuleList(
            MoEDecoderLayer(config, i) for i in range(config.num_layers))

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | Int4Codes]],
                     ) -> dict[tuple[str, str | None], Int4Codes]:
        """Copy checkpoint tensors into the parameters (see ``LlamaForCausalLM``), packing
        per-expert tensors into each layer's ``gate_up_proj`` / ``down_proj``.

        Raises ValueError for 4-bit codes on an expert (GGUF MoE files are not supported),
        a per-expert tensor of a dense layer or an out-of-range expert, a shape mismatch,
        an expert given twice or missing, and everything ``LlamaForCausalLM`` raises for.
        """
        return super().load_weights(self._packed(weights))

    def _packed(self, weights: Iterable[tuple[str, torch.Tensor | Int4Codes]],
                ) -> Iterator[tuple[str, torch.Tensor | Int4Codes]]:
        """The checkpoint's tensors with per-expert ones packed: each layer's packed
        tensor is yielded once its last expert arrived; Mixtral's ``block_sparse_moe``
        renamed ``mlp``."""
        params = dict(self.named_parameters())
        pending: dict[str, tuple[torch.Tensor, set[tuple[int, str]]]] = {}
        for name, tensor in weights:
            match = _PER_EXPERT.match(name)
            if match is None:
                yield name.replace(".block_sparse_moe.", ".mlp."), tensor
                continue
            if isinstance(tensor, Int4Codes):
                raise ValueError(f"checkpoint tensor {name!r}: quantized expert weights are "
                                 f"not supported (load a float checkpoint)")
            prefix, expert, proj = match.group(1), int(match.group(2)), match.group(3)
            packed_name, half = _PROJ[proj]
            target = f"{prefix}.mlp.experts.{packed_name}"
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} does not belong to this model "
                                 f"(its layer has no experts)")
            param = params[target]
            if target not in pending:
                pending[target] = (torch.empty(param.shape, dtype=param.dtype), set())
            packed, seen = pending[target]
            _copy_expert(name, packed, expert, half, tensor, seen)
            if len(seen) == packed.shape[0] * (2 if half != "all" else 1):
                del pending[target]
                yield target, packed
        if pending:
            target, (packed, seen) = next(iter(pending.items()))
            halves = ("gate", "up") if target.endswith("gate_up_proj") else ("all",)
            missing = [f"{e}.{h}" for e in range(packed.shape[0]) for h in halves
                       if (e, h) not in seen]
            raise ValueError(f"checkpoint lacks expert weight(s) of {target}: "
                             f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")


def _copy_expert(name: str, packed: torch.Tensor, expert: int, half: str,
                 tensor: torch.Tensor, seen: set[tuple[int, str]]) -> None:
    """Copy one expert's projection into its rows of ``packed``; ValueError when it does
    not fit or was given before."""
    if not 0 <= expert < packed.shape[0]:
        raise ValueError(f"checkpoint tensor {name!r}: expert {expert} out of range (the "
                         f"config has {packed.shape[0]} experts)")
    if (expert, half) in seen:
        raise ValueError(f"checkpoint tensor {name!r} given twice")
    rows = packed.shape[1] // 2
    dest = packed[expert]
    if half == "gate":
        dest = dest[:rows]
    elif half == "up":
        dest = dest[rows:]
    if dest.shape != tensor.shape:
        raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} does not match "
                         f"{tuple(dest.shape)}")
    dest.copy_(tensor)
    seen.add((expert, half))
