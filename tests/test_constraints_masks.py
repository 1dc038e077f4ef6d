"""GrammarBackend: batched bitmasks and jump-forward decisions (mini tokenizer, fast)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from mini_model import build_mini_tokenizer
from test_constraints import allowed_tokens

from aiolm.constraints import JSONSchema, Matcher, Regex, pack_allowed_tokens
from aiolm.engine.grammar_backend import GrammarBackend


@pytest.fixture(scope="module")
def tok():
    return build_mini_tokenizer()


def single_fill(matcher: Matcher, words: int) -> torch.Tensor:
    row = torch.empty(words, dtype=torch.int32)
    matcher.fill_next_token_mask(row)
    return row


class EvenTokens(Matcher):
    """A user's matcher: even token ids only, never finished."""

    def fill_next_token_mask(self, bitmask_row: Any) -> None:
        bitmask_row.fill_(0x55555555)

    def advance(self, token_id: int) -> bool:
        return token_id % 2 == 0

    def forced_tokens(self) -> list[int]:
        return []

    def is_finished(self) -> bool:
        return False

    def fork(self) -> Matcher:
        return self

    def rollback(self, n: int) -> None:
        return None


@pytest.mark.parametrize("threads", [1, 2], ids=["in-turn", "thread-pool"])
def test_batched_fill_equals_one_by_one(tok, threads):
    vocab = len(tok)
    gb = GrammarBackend(vocab, num_threads=threads)
    matchers = [
        Regex(r"[0-9]{2,5}").compile(tok),
        JSONSchema({"type": "object", "properties": {"age": {"type": "integer"}}}).compile(tok),
        Regex("hello world [a-z]").compile(tok),  # opens with forced tokens
        EvenTokens(),
    ]
    for t in tok.encode("1"):
        assert matchers[0].advance(t)
    rows = [0, 2, 3, 5]
    mask = gb.fill_bitmask(list(zip(rows, matchers, strict=True)), batch_size=6)
    assert mask.shape == (6, gb.words) and mask.dtype == torch.int32
    for row, matcher in zip(rows, matchers, strict=True):
        assert torch.equal(mask[row], single_fill(matcher.fork(), gb.words))
    assert mask[1].eq(-1).all() and mask[4].eq(-1).all()  # unconstrained rows allow all
    assert allowed_tokens(mask[3], vocab).tolist() == matchers[2].forced_tokens()[:1]


def test_model_vocabulary_wider_than_the_tokenizer(tok):
    gb = GrammarBackend(512)  # the model's logits are wider than the tokenizer's 332 tokens
    matcher = Regex("[a-c]+").compile(tok)
    mask = gb.fill_bitmask([(0, matcher)], batch_size=1)
    allowed = allowed_tokens(mask[0], 512)
    assert len(allowed) > 0 and allowed.max() < len(tok)


@pytest.mark.parametrize("threads", [1, 2], ids=["in-turn", "thread-pool"])
def test_rows_narrower_than_the_logits_are_computed_together(tok, threads):
    # A model whose logits outnumber its tokenizer's tokens (Qwen's, the bench's dummy
    # tokenizer): llguidance writes only the tokenizer's words, batched all the same.
    gb = GrammarBackend(len(tok) + 200, num_threads=threads)
    matchers = [
        Regex(r"[0-9]{2,5}").compile(tok),
        JSONSchema({"type": "object", "properties": {"age": {"type": "integer"}}}).compile(tok),
        Regex("[a-c]+").compile(tok),
        EvenTokens(),
    ]
    for t in tok.encode("1"):
        assert matchers[0].advance(t)
    _ll, width = matchers[1].llguidance_mask(gb.words)  # (a regex copies masks kept by state)
    assert width == (len(tok) + 31) // 32 < gb.words
    rows = [4, 0, 2, 3]
    mask = gb.fill_bitmask(list(zip(rows, matchers, strict=True)), batch_size=5)
    for row, matcher in zip(rows, matchers, strict=True):
        assert torch.equal(mask[row], single_fill(matcher.fork(), gb.words))
    for row in rows[:3]:
        assert mask[row, width:].eq(0).all() and mask[row, :width].ne(0).any()
    assert mask[1].eq(-1).all()  # an unconstrained row allows every logit


def test_bitmask_for_requests_without_matchers_is_none(tok):
    class R:
        matcher = None

    gb = GrammarBackend(len(tok))
    assert gb.bitmask_for([R(), R()]) is None


def test_after_sample_jumps_over_forced_tokens(tok):
    schema = {"type": "object", "properties": {"a_long_property_name": {"type": "integer"},
                                               "another_long_name": {"type": "boolean"}},
              "required": ["a_long_property_name", "another_long_name"],
              "additionalProperties": False}
    on, off = GrammarBackend(len(tok)), GrammarBackend(len(tok), jump_forward=False)
    m_on, m_off = JSONSchema(schema).compile(tok), JSONSchema(schema).compile(tok)
    first = m_on.forced_tokens()
    assert len(first) >= 3
    jump = on.after_sample(m_on, first[0], limit=100)
    assert jump.ok and jump.rollback == 0 and list(jump.append) == first[1:]
    step = off.after_sample(m_off, first[0], limit=100)
    assert step.ok and step.append == ()
    assert m_off.forced_tokens() == first[1:]  # decoded one pass each instead


def test_after_sample_respects_the_token_limit(tok):
    gb = GrammarBackend(len(tok))
    matcher = Regex("x hello world the quick brown fox").compile(tok)
    forced = matcher.forced_tokens()
    jump = gb.after_sample(matcher, forced[0], limit=2)
    assert jump.ok and len(jump.append) == 2 and not jump.finished


def test_after_sample_replaces_a_non_canonical_boundary_in_both_modes(tok):
    (a,) = tok.encode("a")
    for enabled in (True, False):
        gb = GrammarBackend(len(tok), jump_forward=enabled)
        matcher = Regex("(a|b)bout the").compile(tok)
        jump = gb.after_sample(matcher, a, limit=50)
        assert jump.ok and jump.rollback == 1 and len(jump.append) >= 1
        assert tok.decode(list(jump.append)).startswith("about")


def test_after_sample_reports_a_broken_constraint_and_the_finish(tok):
    gb = GrammarBackend(len(tok))
    matcher = Regex("[0-9]").compile(tok)
    (letter,) = tok.encode("q")
    assert not gb.after_sample(matcher, letter, limit=5).ok
    (digit,) = tok.encode("4")
    done = gb.after_sample(matcher, digit, limit=5)
    assert done.ok and done.finished


def test_vocab_size_is_validated():
    with pytest.raises(ValueError, match="vocab_size"):
        GrammarBackend(0)


def test_pack_allowed_tokens_sets_exactly_the_allowed_bits():
    allowed = torch.zeros(70, dtype=torch.bool)
    allowed[[0, 31, 32, 63, 69]] = True
    row = torch.full((3,), -1, dtype=torch.int32)
    pack_allowed_tokens(allowed, row)
    assert allowed_tokens(row, 96).tolist() == [0, 31, 32, 63, 69]
    as_numpy = np.zeros(3, dtype=np.int32)
    pack_allowed_tokens(allowed.numpy(), as_numpy)
    assert np.array_equal(as_numpy, row.numpy())
    with pytest.raises(ValueError, match="do not fit"):
        pack_allowed_tokens(torch.ones(97, dtype=torch.bool), row)


class OwnLLMatcher(Matcher):
    """A user's matcher built on llguidance directly: the engine computes its masks in the
    same batched pool as the built-in ones (fill_next_token_mask is never called)."""

    def __init__(self, ll: Any, forced: int | None = None) -> None:
        self.ll = ll
        self.forced = forced

    def fill_next_token_mask(self, bitmask_row: Any) -> None:
        raise AssertionError("the batched path fills this row")

    def only_token(self) -> int | None:
        return self.forced

    def llguidance_mask(self, words: int) -> Any | None:
        return self.ll

    def advance(self, token_id: int) -> bool:
        return self.ll.consume_token(token_id)

    def forced_tokens(self) -> list[int]:
        return []

    def is_finished(self) -> bool:
        return self.ll.is_stopped()


@pytest.mark.parametrize("threads", [1, 2], ids=["in-turn", "thread-pool"])
def test_a_users_matcher_gets_the_batched_mask_path(tok, threads):
    import llguidance
    import llguidance.hf

    gb = GrammarBackend(len(tok), num_threads=threads)
    llt = llguidance.hf.from_tokenizer(tok)
    grammar = llguidance.LLMatcher.grammar_from_regex("[0-9]{2,5}")
    own = [OwnLLMatcher(llguidance.LLMatcher(llt, grammar)) for _ in range(2)]
    forced = OwnLLMatcher(None, forced=7)
    mask = gb.fill_bitmask([(0, own[0]), (1, forced), (2, own[1])], batch_size=3)
    reference = single_fill(Regex("[0-9]{2,5}").compile(tok), gb.words)
    assert torch.equal(mask[0], reference) and torch.equal(mask[2], reference)
    assert allowed_tokens(mask[1], len(tok)).tolist() == [7]
