"""A tokenizer for models with dummy weights, so the workloads' text prompts run on them.

Dummy weights (``load_format="dummy"``) come without a tokenizer, but every workload is a
text program. This builds a byte-level BPE tokenizer in process (no download), trained in
well under a second on the synthetic text the workloads are made of, with at most the
model's vocabulary size, so that one word of :mod:`aiolm.bench.synth` is about one token
on a realistic vocabulary (and a few on a tiny one). The same seed gives the same tokenizer.
Byte-level means every string encodes, which the constraint engine (llguidance) needs.
"""

from __future__ import annotations

import json
import random
from typing import Any

from .synth import sentence, title, words

__all__ = ["SPECIAL_TOKENS", "bench_tokenizer"]

#: Ids 0, 1, 2, as the tiny named configs expect (``bos_token_id=1``, ``eos_token_id=2``).
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


def _corpus(rng: random.Random, lines: int) -> list[str]:
    out = []
    for i in range(lines):
        kind = i % 4
        if kind == 0:
            out.append(sentence(rng, rng.randint(5, 30)))
        elif kind == 1:
            out.append(f"Question: {sentence(rng, 8)}\nA. {words(rng, 3)}\nAnswer: B\n")
        elif kind == 2:
            out.append(f"Thought {i % 7}: {words(rng, 6)} Action: Search[{title(rng)}]\nObservation: ")
        else:
            record = {"_".join(words(rng, 3).split()): words(rng, 2), "ok": bool(i % 3), "n": i}
            out.append(f"USER: {words(rng, 5)}\nASSISTANT: " + json.dumps(record))
    return out


def bench_tokenizer(vocab_size: int, *, seed: int = 0, max_vocab: int = 16384) -> Any:
    """A ``transformers`` fast tokenizer of at most ``min(vocab_size, max_vocab)`` tokens.

    Raises ``ValueError`` if ``vocab_size`` cannot hold the 256 byte tokens and the specials.
    """
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size: a byte-level tokenizer needs at least {minimum}, got {vocab_size}")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, max_vocab),
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(random.Random(seed), 4000), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=SPECIAL_TOKENS[0], bos_token=SPECIAL_TOKENS[1],
        eos_token=SPECIAL_TOKENS[2],
    )
