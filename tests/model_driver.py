"""A minimal test driver for a model over the KV pool: no scheduler, no sampler.

It keeps one ``req_to_token`` row per request, allocates slots for new tokens, builds the
``ForwardBatch`` the runner would build, and returns the model's logits. Used by the model
parity and loader tests.
"""

from __future__ import annotations

import torch

from aiolm.cache.pool import KVPool, ReqToTokenPool, TokenSlotAllocator
from aiolm.engine.attention.torch_backend import TorchAttention
from aiolm.engine.forward_batch import ForwardBatch, ForwardMode
from aiolm.engine.model_config import ModelConfig


class ModelDriver:
    """Runs extend / decode passes of ``model`` for requests identified by their row."""

    def __init__(self, model: torch.nn.Module, config: ModelConfig, *, pool_size: int = 4096,
                 max_requests: int = 8, max_context: int = 1024) -> None:
        self.model = model
        self.allocator = TokenSlotAllocator(pool_size)
        self.kv_pool = KVPool(config.num_layers, config.num_kv_heads, config.head_dim, pool_size,
                              config.torch_dtype, "cpu")
        self.req_to_token = ReqToTokenPool(max_requests, max_context)
        self.lens: dict[int, int] = {}
        model.set_attention(TorchAttention(
            num_q_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim, scale=config.head_dim ** -0.5, device="cpu",
        ))

    def new_request(self, *, share_prefix_of: int | None = None, prefix_len: int = 0) -> int:
        """A new row; optionally its first ``prefix_len`` tokens reuse another row's K/V."""
        row = self.req_to_token.alloc()
        assert row is not None
        self.lens[row] = 0
        if share_prefix_of is not None:
            slots = self.req_to_token.read(share_prefix_of, 0, prefix_len)
            self.req_to_token.write(row, 0, slots)
            self.lens[row] = prefix_len
        return row

    def extend(self, requests: list[tuple[int, list[int]]], *,
               return_logits: str = "all") -> torch.Tensor:
        """One EXTEND pass: each ``(row, new_token_ids)`` continues its row."""
        ids, positions, prefix_lens, ext_lens = [], [], [], []
        slots_all = []
        for row, tokens in requests:
            start = self.lens[row]
            slots = self.allocator.alloc(len(tokens))
            assert slots is not None
            self.req_to_token.write(row, start, slots)
            slots_all.append(slots)
            ids.extend(tokens)
            positions.extend(range(start, start + len(tokens)))
            prefix_lens.append(start)
            ext_lens.append(len(tokens))
            self.lens[row] = start + len(tokens)
        seq_lens = [self.lens[row] for row, _ in requests]
        batch = ForwardBatch(
            mode=ForwardMode.EXTEND, batch_size=len(requests),
            input_ids=torch.tensor(ids), positions=torch.tensor(positions),
            out_cache_loc=torch.cat(slots_all),
            req_pool_indices=torch.tensor([row for row, _ in requests]),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            extend_prefix_lens=torch.tensor(prefix_lens, dtype=torch.int32),
            extend_seq_lens=torch.tensor(ext_lens, dtype=torch.int32),
            seq_lens_cpu=seq_lens, extend_prefix_lens_cpu=prefix_lens,
            extend_seq_lens_cpu=ext_lens, return_logits=return_logits,
            kv_pool=self.kv_pool, req_to_token_pool=self.req_to_token,
        )
        return self.model(batch)

    def decode(self, requests: list[tuple[int, int]]) -> torch.Tensor:
        """One DECODE pass: each ``(row, token_id)`` appends one token; logits ``[bs, V]``."""
        slots = self.allocator.alloc(len(requests))
        assert slots is not None
        positions = []
        for i, (row, _) in enumerate(requests):
            positions.append(self.lens[row])
            self.req_to_token.write(row, self.lens[row], slots[i:i + 1])
            self.lens[row] += 1
        seq_lens = [self.lens[row] for row, _ in requests]
        batch = ForwardBatch(
            mode=ForwardMode.DECODE, batch_size=len(requests),
            input_ids=torch.tensor([tok for _, tok in requests]),
            positions=torch.tensor(positions), out_cache_loc=slots,
            req_pool_indices=torch.tensor([row for row, _ in requests]),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32), seq_lens_cpu=seq_lens,
            return_logits="last", kv_pool=self.kv_pool, req_to_token_pool=self.req_to_token,
        )
        return self.model(batch)

    def greedy(self, prompts: list[list[int]], max_new_tokens: int,
               eos_token_ids: tuple[int, ...] = ()) -> list[list[int]]:
        """Batched greedy generation: one prefill of all prompts, then batched decode."""
        rows = [self.new_request() for _ in prompts]
        logits = self.extend(list(zip(rows, prompts, strict=True)), return_logits="last")
        outputs: list[list[int]] = [[] for _ in prompts]
        active = list(range(len(prompts)))
        next_tokens = logits.argmax(-1).tolist()
        while active:
            for i, tok in zip(active, next_tokens, strict=True):
                outputs[i].append(tok)
            active = [i for i in active
                      if len(outputs[i]) < max_new_tokens and outputs[i][-1] not in eos_token_ids]
            if not active:
                break
            logits = self.decode([(rows[i], outputs[i][-1]) for i in active])
            next_tokens = logits.argmax(-1).tolist()
        return outputs


#: The names of normalization weights across the families the parity tests load.
NORM_SUFFIXES = ("norm.weight", "norm1.weight", "norm2.weight", "layrnorm.weight", "ln_q.weight")


@torch.no_grad()
def randomize_weights(model, *, normal: dict[str, float] | None = None):
    """Give a transformers ``model`` random weights under which a mis-mapped tensor shows:
    norm weights in U[0.5, 1.5], biases N(0, 0.1), the rest N(0, 0.15) — or N(0, std) for
    a name ending in a key of ``normal`` (MoE routers: clear choices); and generation that
    never stops at EOS. Returns ``model``."""
    special = tuple((normal or {}).items())
    for name, param in model.named_parameters():
        if name.endswith(NORM_SUFFIXES):
            param.uniform_(0.5, 1.5)
            continue
        std = next((s for suffix, s in special if name.endswith(suffix)), None)
        if std is not None:
            param.normal_(0.0, std)
        elif name.endswith("bias"):
            param.normal_(0.0, 0.1)
        else:
            param.normal_(0.0, 0.15)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model
