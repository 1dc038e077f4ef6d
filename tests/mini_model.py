"""A tiny random Llama with a small real tokenizer, for fast constrained-decoding tests (and
tests/schema_corpus/report.py, which may run against another version of aiolm)."""

from __future__ import annotations

from aiolm.backends.engine import LoadedModel
from aiolm.engine.tokenizer import Tokenizer

#: Token-id prompts that share prefixes in several ways (one long common run, a branch, a
#: one-token prompt): the engine tests' standard mix.
PROMPTS = [
    [5, 6, 7, 8, 9, 10, 11, 12],
    [5, 6, 7, 8, 9, 10, 40, 41, 42],
    [100, 101, 102],
    [5, 6, 7, 8, 200, 201, 202, 203, 204, 205, 206],
    [300],
    [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17],
]


def build_mini_tokenizer():
    """A small byte-level BPE tokenizer trained in memory (fast; real merges; EOS id 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = ['{"name": "Ada", "age": 36, "job": "engineer"}', "about the house",
              "hello world 12345", "the quick brown fox jumps over the lazy dog"] * 20
    trainer = trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>")


def load_tiny() -> LoadedModel:
    """The tiny random Llama (vocabulary 512) with a 332-token BPE tokenizer: tokens past
    the tokenizer's vocabulary are never allowed by a constraint."""
    loaded = LoadedModel.load("tiny-llama", load_format="dummy", device="cpu", seed=0)
    loaded.tokenizer = Tokenizer(build_mini_tokenizer())
    return loaded
