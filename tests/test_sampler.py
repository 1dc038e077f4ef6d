"""The sampler on hand-made logits: each knob, seeds, the greedy path, masks, logprobs."""

from __future__ import annotations

import math

import attrs
import pytest
import torch

from aiolm.engine.sampler import Sampler, apply_token_bitmask, token_logprobs
from aiolm.sampling import SamplingParams

VOCAB = 8
EOS = 7


@attrs.define(eq=False)
class FakeReq:
    rid: str
    sampling: SamplingParams
    output_ids: list[int] = attrs.field(factory=list)


def make_sampler(seed: int = 0) -> Sampler:
    return Sampler(vocab_size=VOCAB, device="cpu", seed=seed, eos_token_ids=[EOS])


def sample_ids(sampler, reqs, logits, bitmask=None):
    info = sampler.prepare(reqs)
    return sampler.sample(logits, info, bitmask).next_ids.tolist()


def test_greedy_batch_takes_argmax_without_drawing():
    s = make_sampler()
    reqs = [FakeReq("a", SamplingParams()), FakeReq("b", SamplingParams(top_k=1, temperature=2.0))]
    logits = torch.tensor([[0.0, 3.0, 1.0, 0, 0, 0, 0, 0], [5.0, 1.0, 0, 0, 0, 0, 0, 2.0]])
    info = s.prepare(reqs)
    assert info.all_greedy
    state = s._generator.get_state().clone()
    assert s.sample(logits, info).next_ids.tolist() == [1, 0]
    assert torch.equal(s._generator.get_state(), state)


def test_mixed_batch_keeps_greedy_rows_exact():
    s = make_sampler()
    reqs = [FakeReq("g", SamplingParams()), FakeReq("t", SamplingParams(temperature=1.0))]
    logits = torch.zeros(2, VOCAB)
    logits[0, 4] = 0.5
    for _ in range(20):
        assert sample_ids(s, reqs, logits)[0] == 4


def test_temperature_sampling_follows_the_distribution():
    s = make_sampler()
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25, 1e-9, 1e-9, 1e-9, 1e-9, 1e-9]]))
    reqs = [FakeReq(f"r{i}", SamplingParams(temperature=1.0)) for i in range(4000)]
    ids = sample_ids(s, reqs, logits.expand(4000, VOCAB).contiguous())
    freq = torch.bincount(torch.tensor(ids), minlength=VOCAB).float() / 4000
    assert abs(freq[0].item() - 0.5) < 0.05
    assert abs(freq[1].item() - 0.25) < 0.05
    assert freq[3:].sum().item() == 0


def test_low_temperature_sharpens_and_high_temperature_flattens():
    logits = torch.tensor([[2.0, 1.0, 0, 0, 0, 0, 0, 0]]).expand(3000, VOCAB).contiguous()

    def share_of_top(temp):
        s = make_sampler()
        reqs = [FakeReq(f"r{i}", SamplingParams(temperature=temp)) for i in range(3000)]
        return sum(i == 0 for i in sample_ids(s, reqs, logits)) / 3000

    assert share_of_top(0.2) > share_of_top(1.0) > share_of_top(5.0)


def test_top_k_keeps_only_the_k_best():
    s = make_sampler()
    logits = torch.tensor([[4.0, 3.0, 2.5, 2.4, 2.3, 2.2, 2.1, 2.0]]).expand(500, VOCAB).contiguous()
    reqs = [FakeReq(f"r{i}", SamplingParams(temperature=1.0, top_k=2)) for i in range(500)]
    assert set(sample_ids(s, reqs, logits)) == {0, 1}


def test_top_p_keeps_the_smallest_head_reaching_p():
    s = make_sampler()
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.05, 0.05, 0, 0, 0]]) + 1e-12
    logits = probs.log().expand(800, VOCAB).contiguous()
    reqs = [FakeReq(f"r{i}", SamplingParams(temperature=1.0, top_p=0.65)) for i in range(800)]
    assert set(sample_ids(s, reqs, logits)) == {0, 1}


def test_min_p_drops_tokens_below_a_share_of_the_best():
    s = make_sampler()
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.04, 0.03, 0.03, 0, 0]]) + 1e-12
    logits = probs.log().expand(800, VOCAB).contiguous()
    reqs = [FakeReq(f"r{i}", SamplingParams(temperature=1.0, min_p=0.3)) for i in range(800)]
    assert set(sample_ids(s, reqs, logits)) == {0, 1}


def test_frequency_and_presence_penalties_count_output_tokens():
    s = make_sampler()
    logits = torch.tensor([[3.0, 2.5, 0, 0, 0, 0, 0, 0]])
    freq = FakeReq("f", SamplingParams(frequency_penalty=0.3), output_ids=[0, 0])
    assert sample_ids(s, [freq], logits) == [1]       # 3.0 - 2*0.3 = 2.4 < 2.5
    once = FakeReq("o", SamplingParams(frequency_penalty=0.3), output_ids=[0])
    assert sample_ids(s, [once], logits) == [0]       # 3.0 - 0.3 = 2.7 > 2.5
    pres = FakeReq("p", SamplingParams(presence_penalty=0.6), output_ids=[0])
    assert sample_ids(s, [pres], logits) == [1]       # 3.0 - 0.6 = 2.4 < 2.5
    neg = FakeReq("n", SamplingParams(presence_penalty=-1.0), output_ids=[1])
    assert sample_ids(s, [neg], logits) == [1]        # a negative penalty encourages repeats


def test_penalty_counts_follow_new_tokens_of_the_same_batch():
    s = make_sampler()
    logits = torch.tensor([[3.0, 2.5, 0, 0, 0, 0, 0, 0]])
    req = FakeReq("f", SamplingParams(frequency_penalty=0.3))
    assert sample_ids(s, [req], logits) == [0]
    req.output_ids.append(0)
    assert sample_ids(s, [req], logits) == [0]
    req.output_ids.append(0)
    assert sample_ids(s, [req], logits) == [1]


def test_min_tokens_bans_eos_and_stop_ids_until_reached():
    s = make_sampler()
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS] = 10.0
    logits[0, 5] = 9.0
    logits[0, 2] = 1.0
    req = FakeReq("m", SamplingParams(min_tokens=2, stop_token_ids=[5]))
    assert sample_ids(s, [req], logits) == [2]
    req.output_ids.append(2)
    assert sample_ids(s, [req], logits) == [2]
    req.output_ids.append(2)
    assert sample_ids(s, [req], logits) == [EOS]


def test_ignore_eos_lets_eos_through_min_tokens_ban():
    s = make_sampler()
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS] = 10.0
    req = FakeReq("m", SamplingParams(min_tokens=3, ignore_eos=True))
    assert sample_ids(s, [req], logits) == [EOS]


def test_seeded_requests_reproduce_regardless_of_batch():
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.0, seed=1234)

    def run(batch_extra: int, sampler_seed: int) -> list[int]:
        s = make_sampler(sampler_seed)
        target = FakeReq("target", params)
        others = [FakeReq(f"o{i}", SamplingParams(temperature=1.0)) for i in range(batch_extra)]
        out = []
        for _ in range(30):
            reqs = others + [target]
            ids = sample_ids(s, reqs, logits.expand(len(reqs), VOCAB).contiguous())
            out.append(ids[-1])
            target.output_ids.append(ids[-1])
        return out

    alone = run(0, 0)
    assert run(5, 99) == alone
    assert len(set(alone)) > 1            # it did sample, not argmax
    other_seed = make_sampler(0)
    req = FakeReq("x", SamplingParams(temperature=1.0, seed=4321))
    seq = []
    for _ in range(30):
        seq.append(sample_ids(other_seed, [req], logits)[0])
    assert seq != alone


def test_constraint_bitmask_allows_only_set_bits():
    s = make_sampler()
    logits = torch.arange(VOCAB, dtype=torch.float32).view(1, -1)
    mask = torch.tensor([[(1 << 2) | (1 << 3)]], dtype=torch.int32)
    assert sample_ids(s, [FakeReq("g", SamplingParams())], logits, mask) == [3]
    reqs = [FakeReq(f"t{i}", SamplingParams(temperature=1.0)) for i in range(200)]
    ids = sample_ids(s, reqs, logits.expand(200, VOCAB).contiguous(), mask.expand(200, 1))
    assert set(ids) == {2, 3}


def test_bitmask_uses_bit_31_and_multiple_words():
    logits = torch.zeros(2, 64)
    mask = torch.tensor([[-(2**31), 0], [0, 1]], dtype=torch.int32)  # token 31; token 32
    apply_token_bitmask(logits, mask)
    assert torch.isfinite(logits[0]).nonzero().view(-1).tolist() == [31]
    assert torch.isfinite(logits[1]).nonzero().view(-1).tolist() == [32]


def test_logprobs_are_log_softmax_of_processed_logits():
    s = make_sampler()
    logits = torch.tensor([[2.0, 1.0, 0.5, 0, 0, 0, 0, 0]])
    req = FakeReq("l", SamplingParams(logprobs=True, top_logprobs=3))
    info = s.prepare([req])
    out = s.sample(logits, info)
    expected = torch.log_softmax(logits, -1)
    assert out.next_ids.tolist() == [0]
    assert math.isclose(out.logprobs.item(), expected[0, 0].item(), rel_tol=1e-6)
    assert out.top_ids.tolist() == [[0, 1, 2]]
    assert torch.allclose(out.top_logprobs, expected[:, :3])
    masked = s.sample(logits, info, torch.tensor([[0b110]], dtype=torch.int32))
    assert masked.next_ids.tolist() == [1]
    renorm = torch.log_softmax(logits[:, 1:3], -1)
    assert math.isclose(masked.logprobs.item(), renorm[0, 0].item(), rel_tol=1e-6)


def test_token_logprobs_scores_targets_and_greedy_agreement():
    logits = torch.tensor([[2.0, 1.0, 0, 0, 0, 0, 0, 0], [0, 0, 3.0, 0, 0, 0, 0, 0]])
    lp, greedy = token_logprobs(logits, torch.tensor([1, 2]))
    expected = torch.log_softmax(logits, -1)
    assert torch.allclose(lp, torch.stack([expected[0, 1], expected[1, 2]]))
    assert greedy.tolist() == [False, True]


def test_prepare_reuses_tensors_for_the_same_composition():
    s = make_sampler()
    reqs = [FakeReq("a", SamplingParams(temperature=0.7)), FakeReq("b", SamplingParams())]
    first = s.prepare(reqs)
    assert s.prepare(reqs) is first
    assert s.prepare(reqs[:1]) is not first


@pytest.mark.parametrize("seed", [0, 7])
def test_release_forgets_request_generator(seed):
    s = make_sampler()
    req = FakeReq("r", SamplingParams(temperature=1.0, seed=seed))
    logits = torch.zeros(1, VOCAB)
    first = sample_ids(s, [req], logits)
    s.release("r")
    s._info = None
    assert sample_ids(s, [req], logits) == first


def test_cpu_draw_never_returns_a_token_of_probability_zero(monkeypatch):
    """The CPU draws by the inverse CDF: a uniform rounded onto the top of the distribution
    must not fall past the last token with mass (here the masked tail)."""
    s = make_sampler()
    logits = torch.tensor([[1.0, 2.0, 0.5, 0, 0, 0, 0, 0]])
    mask = torch.tensor([[0b111]], dtype=torch.int32)   # tokens 0-2 only
    top = 1.0 - 2.0 ** -24                               # the largest float32 below 1

    def at_the_top(self, *args, **kwargs):
        return self.fill_(top)

    monkeypatch.setattr(torch.Tensor, "uniform_", at_the_top)
    reqs = [FakeReq("t", SamplingParams(temperature=1.0))]
    assert sample_ids(s, reqs, logits, mask)[0] in {0, 1, 2}


def test_cpu_draw_follows_a_wide_distribution():
    vocab = 64
    probs = torch.zeros(vocab)
    probs[[3, 17, 40, 63]] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = probs.clamp_min(1e-30).log().expand(8000, vocab).contiguous()
    sampler = Sampler(vocab_size=vocab, device="cpu", seed=3, eos_token_ids=[0])
    reqs = [FakeReq(f"r{i}", SamplingParams(temperature=1.0)) for i in range(8000)]
    ids = sampler.sample(logits, sampler.prepare(reqs)).next_ids
    freq = torch.bincount(ids, minlength=vocab).float() / 8000
    assert set(ids.tolist()) == {3, 17, 40, 63}
    for token, p in zip([3, 17, 40, 63], [0.1, 0.2, 0.3, 0.4], strict=True):
        assert abs(freq[token].item() - p) < 0.025
