"""A tiny random-weight Llama with SmolLM2's real tokenizer (its 49,152-token vocabulary)
and a chat template of the test's choosing: fast enough for server and program tests,
with real text, real special tokens and a template that renders tools or thinking."""

from __future__ import annotations

import functools

import smollm2

from aiolm.engine.loaded import LoadedModel


@functools.cache
def _weights():
    from aiolm.engine.loader import load_model

    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2,
              "tie_word_embeddings": True}
    return load_model(config, load_format="dummy", dtype="float32", device="cpu", seed=0)


def tiny_chat_model(template: str | None = None) -> LoadedModel:
    """A fresh :class:`LoadedModel` (one engine at a time may use it) whose tokenizer is
    SmolLM2's with ``template`` as its chat template (SmolLM2's own when None)."""
    import copy

    import torch

    module, config = _weights()
    tokenizer = copy.copy(smollm2.tokenizer())
    tokenizer.hf = copy.deepcopy(tokenizer.hf)
    if template is not None:
        tokenizer.hf.chat_template = template
    return LoadedModel(model=copy.deepcopy(module), model_config=config, tokenizer=tokenizer,
                       device=torch.device("cpu"), source="tiny-chat", load_format="dummy")
