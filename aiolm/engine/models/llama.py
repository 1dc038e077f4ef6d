"""The Llama family as one model class: Llama 2/3 (incl. llama3 RoPE), SmolLM2, Mistral,
Qwen2/2.5 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm), with GQA and tied or untied
embeddings. The options come from ``ModelConfig``.

Parameter names follow the Hugging Face layout except that q/k/v and gate/up are fused
(``qkv_proj``, ``gate_up_proj``); ``load_weights`` maps checkpoint names onto them.

Built with ``tp=`` a :class:`~aiolm.engine.parallel.TPGroup` of several ranks, the model is
one rank's shard (:mod:`aiolm.engine.parallel`): its query and KV heads, gate/up rows and
vocabulary rows; ``load_weights`` takes them out of the full checkpoint tensors.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..attention.base import AttentionBackend
from ..forward_batch import ForwardBatch
from ..layers import LMHead, MergedLinear, RMSNorm, RotaryEmbedding, SiluAndMul, VocabEmbedding
from ..layers.linear import RowParallelLinear
from ..layers.quant import KERNEL_DTYPE, Int4Codes, Int4Linear, Int8Linear
from ..model_config import ModelConfig
from ..parallel import TPGroup, check_tensor_parallel, kv_head_range, local_heads

__all__ = ["LlamaForCausalLM"]

# HF projection name -> (our fused module, shard).
_FUSED = {
    "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up"),
}
_FUSED_NAME = re.compile(r"^(.*)\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.(weight|bias)$")


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.head_dim = d = config.head_dim
        q_size = config.num_heads * d
        kv_size = config.num_kv_heads * d
        rows = None
        if tp is None:
            self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        else:
            self.num_heads, self.num_kv_heads = local_heads(config.num_heads,
                                                            config.num_kv_heads, tp.size)
            first_kv, _ = kv_head_range(tp.rank, tp.size, config.num_kv_heads)
            kv_rows = (first_kv * d, self.num_kv_heads * d)
            rows = {"q": (tp.rank * self.num_heads * d, self.num_heads * d),
                    "k": kv_rows, "v": kv_rows}
        # NOTE: parameters are registered in the checkpoint's order (dummy weights are
        # drawn in it): qkv before o.
        self.qkv_proj = MergedLinear(
            config.hidden_size, [("q", q_size), ("k", kv_size), ("v", kv_size)],
            bias=config.qkv_bias, rows=rows,
        )
        self.o_proj: nn.Module = (
            nn.Linear(q_size, config.hidden_size, bias=config.o_bias) if tp is None
            else RowParallelLinear(q_size, config.hidden_size, bias=config.o_bias, tp=tp))
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, rotary: RotaryEmbedding,
                attn: AttentionBackend, batch: ForwardBatch) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        if (self.q_norm is None and qkv.device.type == "cpu"
                and not torch.compiler.is_compiling()):
            # Eager CPU: rotate q and k heads together (fewer, per-op overhead bound ops).
            q_size = self.num_heads * self.head_dim
            qk, v = qkv.split([q_size + self.num_kv_heads * self.head_dim,
                               self.num_kv_heads * self.head_dim], dim=-1)
            qk = rotary.rotate(positions, qk.view(-1, self.num_heads + self.num_kv_heads,
                                                  self.head_dim))
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            out = attn.forward(q, k, v.view(-1, self.num_kv_heads, self.head_dim),
                               self.layer_id, batch)
            return self.o_proj(out.reshape(-1, self.num_heads * self.head_dim))
        q, k, v = self.qkv_proj.split(qkv)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q, k = rotary(positions, q, k)
        out = attn.forward(q, k, v, self.layer_id, batch)
        return self.o_proj(out.reshape(-1, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPGroup | None = None) -> None:
        super().__init__()
        size = config.intermediate_size
        rows = None
        if tp is not None:
            local = size // tp.size
            rows = {"gate": (tp.rank * local, local), "up": (tp.rank * local, local)}
        self.gate_up_proj = MergedLinear(
            config.hidden_size, [("gate", size), ("up", size)], bias=config.mlp_bias, rows=rows
        )
        self.act = SiluAndMul()
        self.down_proj: nn.Module = (
            nn.Linear(size, config.hidden_size, bias=config.mlp_bias) if tp is None
            else RowParallelLinear(size, config.hidden_size, bias=config.mlp_bias, tp=tp))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.gate_up_proj, self.down_proj
        if (x.device.type == "cpu" and isinstance(gate_up, Int4Linear | Int8Linear)
                and isinstance(down, Int4Linear | Int8Linear) and gate_up.bias is None):
            # CPU weight-only kernels compute in bfloat16: keep the activation in it from
            # gate/up through SiLU * up into down (no float round trip in between).
            hidden = gate_up(x, KERNEL_DTYPE)
            return down(self.act(hidden), x.dtype)
        return down(self.act(gate_up(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_id, tp)
        self.mlp = LlamaMLP(config, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None, rotary: RotaryEmbedding,
                attn: AttentionBackend, batch: ForwardBatch,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """One block in residual-stream form: returns ``(mlp_out, residual)``, whose sum
        is the block's output. ``residual`` is None for the first layer (``hidden`` is the
        embedding then); otherwise the previous block's sum is formed here, inside the
        (fused, on CUDA) add + norm."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, rotary, attn, batch)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, tp=tp)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, tp)
                                    for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta,
            config.rope_scaling,
        )


class LlamaForCausalLM(nn.Module):
    """A Llama-family causal LM over the engine's paged KV cache.

    ``forward(batch)`` returns float32 logits: one row per request (its last new token) when
    ``batch.return_logits == "last"``, one per new token when ``"all"``. Attention goes
    through the backend given to ``set_attention``. ``tp``: build this rank's shard of a
    tensor-parallel model (ValueError naming ``tp_size`` when the model cannot be split so);
    every rank must then run the same passes, as its layers' collectives pair up.
    """

    def __init__(self, config: ModelConfig, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.config = config
        if tp is not None and tp.size == 1:
            tp = None
        if tp is not None:
            check_tensor_parallel(config, tp.size)
        self.tp = tp
        self.model = LlamaModel(config, tp)
        self.lm_head = LMHead(
            config.vocab_size, config.hidden_size,
            tied=self.model.embed_tokens if config.tie_word_embeddings else None, tp=tp,
        )
        self.attn: AttentionBackend | None = None

    def set_attention(self, backend: AttentionBackend | None) -> None:
        """Use ``backend`` for every layer's attention from the next forward on (None: no
        attention until another is set; the engine that closes detaches its own)."""
        self.attn = backend

    def init_buffers(self) -> None:
        """Recompute derived buffers (the RoPE table) after weights were materialised."""
        self.model.rotary_emb.reset_cache()

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, inputs_embeds: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Run the batch's new tokens; writes their K/V to the pool; returns logits.
        ``inputs_embeds`` [num_tokens, hidden]: the tokens' embeddings, given by a model
        that wraps this one (a multimodal model's image rows), else looked up here;
        ``positions``: what the rotary embedding takes in place of ``batch.positions``
        (M-RoPE's ``[3, num_tokens]``)."""
        attn = self.attn
        if attn is None:
            raise RuntimeError("no attention backend: call model.set_attention(backend) first")
        if batch.return_logits not in ("last", "all"):
            raise ValueError(f"return_logits: expected 'last' or 'all', got {batch.return_logits!r}")
        attn.init_forward(batch)
        inner = self.model
        if not torch.compiler.is_compiling():
            inner.rotary_emb.new_pass()
        hidden = inner.embed_tokens(batch.input_ids) if inputs_embeds is None else inputs_embeds
        if positions is None:
            positions = batch.positions
        residual: torch.Tensor | None = None
        for layer in inner.layers:
            hidden, residual = layer(positions, hidden, residual, inner.rotary_emb, attn, batch)
        if batch.return_logits == "last" and not batch.is_decode:
            last = _last_token_indices(batch)
            hidden = hidden[last]
            residual = residual[last]
        hidden, _ = inner.norm(hidden, residual)  # every model has at least one layer
        return self.lm_head(hidden)

    def multimodal_embeddings(self, batch: ForwardBatch) -> torch.Tensor | None:
        """The pass's token embeddings with rows ``batch.mm_rows`` taken from
        ``batch.mm_embeds`` (their ids are pad ids, never looked up), or None for a pass
        without images."""
        if batch.mm_embeds is None:
            return None
        ids = batch.input_ids.clamp(max=self.config.vocab_size - 1)
        hidden = self.model.embed_tokens(ids)
        return hidden.index_copy(0, batch.mm_rows, batch.mm_embeds.to(hidden.dtype))

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | Int4Codes | Any]],
                     ) -> dict[tuple[str, str | None], Int4Codes]:
        """Copy checkpoint tensors (Hugging Face names) into the parameters.

        A tensor may also be a lazy slice (``.shape``, read by ``[...]``): a sharded model
        reads only its rank's part of it (see :mod:`aiolm.engine.parallel`).

        A tensor given as ``Int4Codes`` is returned keyed ``(parameter name, shard or
        None)`` for ``quantize_model`` to pack. NOTE: its float parameter is left unset (no
        float copy of 4-bit weights is made): ``quantize_model`` must follow.
        Raises ValueError naming any tensor that does not belong to the model, any shape
        mismatch, and every parameter the checkpoint did not provide.
        """
        stored: dict[tuple[str, str | None], Int4Codes] = {}
        params = dict(self.named_parameters())
        expected: set[tuple[str, str | None]] = set()
        for pname, _ in params.items():
            module_name, _, kind = pname.rpartition(".")
            module = self.get_submodule(module_name)
            if isinstance(module, MergedLinear):
                expected.update((pname, shard) for shard in module.shard_names)
            else:
                expected.add((pname, None))
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            codes = tensor if isinstance(tensor, Int4Codes) else None
            match = _FUSED_NAME.match(name)
            if match:
                prefix, proj, kind = match.groups()
                module_name, shard = _FUSED[proj]
                target = f"{prefix}.{module_name}.{kind}"
                if target not in params:
                    raise ValueError(f"checkpoint tensor {name!r} does not belong to this model")
                merged = self.get_submodule(f"{prefix}.{module_name}")
                if codes is None:
                    merged.load_shard(shard, kind, tensor)
                else:
                    merged.check_shard(shard, kind, codes.shape)
                    stored[(target, shard)] = codes
                expected.discard((target, shard))
                continue
            if name not in params:
                raise ValueError(f"checkpoint tensor {name!r} does not belong to this model")
            param = params[name]
            if codes is None:
                tensor = self._rank_part(name, tensor)
            if param.shape != tensor.shape:
                raise ValueError(
                    f"{name}: checkpoint shape {tuple(tensor.shape)} does not match "
                    f"{tuple(param.shape)}"
                )
            if codes is None:
                param.copy_(tensor)
            else:
                stored[(name, None)] = codes
            expected.discard((name, None))
        if expected:
            names = sorted(p if s is None else f"{p} ({s})" for p, s in expected)
            shown = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
            raise ValueError(f"checkpoint lacks {len(names)} weight(s): {shown}")
        return stored

    def _rank_part(self, name: str, tensor: Any) -> torch.Tensor:
        """``tensor`` (the whole checkpoint tensor ``name``) as this rank holds it: a
        sharded module's part of it, else all of it (a lazy slice read whole)."""
        module_name, _, kind = name.rpartition(".")
        module = self.get_submodule(module_name)
        if self.tp is not None and hasattr(module, "take_shard"):
            want = module.full_shape(kind)
            if tuple(tensor.shape) != want:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} does not "
                                 f"match {want}")
            return module.take_shard(kind, tensor)
        return tensor if isinstance(tensor, torch.Tensor) else tensor[:]


def _last_token_indices(batch: ForwardBatch) -> torch.Tensor:
    if batch.extend_seq_lens is not None:
        return torch.cumsum(batch.extend_seq_lens, dim=0) - 1
    ends: list[int] = []
    total = 0
    for n in batch.extend_seq_lens_cpu:
        total += n
        ends.append(total - 1)
    return torch.tensor(ends, device=batch.input_ids.device)
