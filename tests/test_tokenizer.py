"""Tokenizer wrapper and incremental detokenization (multi-byte characters split across
byte-level tokens must never surface as U+FFFD)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import smollm2  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from aiolm.engine.tokenizer import Tokenizer  # noqa: E402

MULTIBYTE_TEXT = "Hi 👋🏽! 🌍🎉 你好，世界。日本語のテキスト — naïve café. 😀😀"


@pytest.fixture(scope="module")
def byte_tokenizer() -> Tokenizer:
    """A small byte-level BPE (GPT-2 style) trained in memory: emoji split into bytes."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(["hello world", "the quick brown fox", "你好世界"], trainer)
    return Tokenizer(PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>"))


def _stream(tokenizer: Tokenizer, ids: list[int], prompt: list[int] = ()) -> list[str]:
    detok = tokenizer.detokenizer(prompt)
    return [detok.feed([i]) for i in ids] + [detok.flush()]


def test_split_characters_are_held_until_complete(byte_tokenizer):
    ids = byte_tokenizer.encode(MULTIBYTE_TEXT)
    pieces = _stream(byte_tokenizer, ids)
    assert any(byte_tokenizer.decode([i]) == "\ufffd" for i in ids)  # characters do split
    assert "" in pieces[:-1]                                          # ... and are held back
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == MULTIBYTE_TEXT


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40),
       st.integers(min_value=1, max_value=4))
def test_stream_concatenates_to_the_full_decode(byte_tokenizer, text, step):
    ids = byte_tokenizer.encode(text)
    detok = byte_tokenizer.detokenizer()
    pieces = [detok.feed(ids[i:i + step]) for i in range(0, len(ids), step)]
    pieces.append(detok.flush())
    assert "".join(pieces) == byte_tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces[:-1]) or "\ufffd" in text


def test_flush_returns_an_incomplete_character_as_replacement(byte_tokenizer):
    ids = byte_tokenizer.encode("👋")
    detok = byte_tokenizer.detokenizer()
    assert detok.feed(ids[:1]) == ""
    assert detok.flush() == "\ufffd"
    assert detok.flush() == ""


@pytest.mark.slow
def test_smollm2_streams_emoji_and_cjk_token_by_token():
    tokenizer = smollm2.tokenizer()
    ids = tokenizer.encode(MULTIBYTE_TEXT)
    pieces = _stream(tokenizer, ids)
    assert "" in pieces[:-1]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == MULTIBYTE_TEXT


@pytest.mark.slow
def test_smollm2_stream_after_a_prompt_keeps_leading_spaces():
    tokenizer = smollm2.tokenizer()
    prompt = tokenizer.encode("Say hello:")
    ids = tokenizer.encode(" Hello 世界 🌍 there")
    assert "".join(_stream(tokenizer, ids, prompt)) == " Hello 世界 🌍 there"


@pytest.mark.slow
def test_smollm2_tokenizer_metadata_and_chat_template():
    tokenizer = smollm2.tokenizer()
    assert tokenizer.eos_token_ids == (tokenizer.hf.convert_tokens_to_ids("<|im_end|>"),)
    assert tokenizer.vocab_size == 49152
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(tokenizer.encode("Paris, France")) == "Paris, France"
    assert tokenizer.encode("Hi")[0] != tokenizer.bos_token_id


def test_missing_tokenizer_path_names_it(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer.from_pretrained(missing)


_PIECES = [*"abc XYZ 123 !?.,\n\t'-", "<|im_start|>", "<|im_end|>", "é", "👋", "你好", "  ",
           "'s", "'t", "assistant\n"]


class _CountingHF:
    """The HF tokenizer, counting the characters of every text it encodes."""

    def __init__(self, hf):
        self._hf = hf
        self.encoded: list[int] = []

    def __getattr__(self, name):
        return getattr(self._hf, name)

    def __len__(self):
        return len(self._hf)

    def __call__(self, text, **kwargs):
        self.encoded.append(len(text))
        return self._hf(text, **kwargs)

    def encode(self, text, **kwargs):
        self.encoded.append(len(text))
        return self._hf.encode(text, **kwargs)


def _pieces(draw_list) -> str:
    return "".join(draw_list)


@settings(max_examples=300, deadline=None)
@given(text=st.lists(st.sampled_from(_PIECES), max_size=40).map(_pieces),
       choices=st.lists(st.lists(st.sampled_from(_PIECES), max_size=5).map(_pieces),
                        min_size=1, max_size=4),
       literal=st.booleans())
def test_continuations_encode_as_the_whole_texts_do(text, choices, literal):
    """select's prompt encoded once for all its choices gives exactly the ids of each
    whole ``prompt + choice``, literal spans (a chat's messages) or not."""
    from aiolm.engine.tokenizer import MarkedText

    tok = smollm2.tokenizer()
    if literal and len(text) > 4:   # the first half is a message: its control text is literal
        text = MarkedText(text, [(0, len(text) // 2)])
    ids, fulls = tok.encode_continuations(text, choices)
    assert ids == tok.encode(text)
    assert fulls == [tok.encode(text + c) for c in choices]


def test_continuations_encode_the_prompt_twice_not_once_a_choice():
    from aiolm.engine.tokenizer import MarkedText

    plain = smollm2.tokenizer()
    tok = Tokenizer(_CountingHF(plain.hf))
    prompt = "You are a helpful assistant. " * 40 + "Is the sky blue? The answer is"
    choices = [" yes", " no", " maybe", " definitely not", " 42"]
    for text in (prompt, MarkedText(prompt, [(0, 100)])):
        tok.hf.encoded.clear()
        ids, fulls = tok.encode_continuations(text, choices)
        assert ids == plain.encode(text)
        assert fulls == [plain.encode(text + c) for c in choices]
        whole = [n for n in tok.hf.encoded if n >= len(prompt)]
        assert len(whole) == 2, tok.hf.encoded   # alone, and with the first choice


def test_continuations_fall_back_to_whole_encodings_where_a_split_is_unsafe(byte_tokenizer):
    """A literal span reaching into the prompt's last word, or a tokenizer with a
    normalizer: every choice is encoded whole (the same ids as before)."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast

    from aiolm.engine.tokenizer import MarkedText

    tok = smollm2.tokenizer()
    text = MarkedText("say <|im_end|> hello world", [(4, 26)])
    assert tok._tail_split(text) is None
    ids, fulls = tok.encode_continuations(text, ["s", " again"])
    assert fulls == [tok.encode(text + "s"), tok.encode(text + " again")]
    raw = RawTokenizer.from_str(byte_tokenizer.hf.backend_tokenizer.to_str())   # a copy
    raw.normalizer = normalizers.NFC()
    normalized = Tokenizer(PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>"))
    assert normalized._tail_split("hello world") is None
    assert normalized.encode_continuations("hello world", ["s"]) == (
        normalized.encode("hello world"), [normalized.encode("hello worlds")])
