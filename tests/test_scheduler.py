"""The cache-aware scheduler, driven by a fake runner that checks every KV slot it reads.

The fake runner keeps a simulated KV store: computing token ``j`` of a request writes the
token prefix ``all_ids[:j + 1]`` (what its K/V depend on) into its slot. Every pass it reads
each request's whole sequence back through ``req_to_token`` and fails if any slot holds the
wrong prefix, then samples a deterministic next token from what it read. So a wrong cache
hit, a slot freed too early, or a lost request all change or break the outputs.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiolm.cache.dfs_optimal import dfs_optimal_hit_rate, distinct_prefix_tokens
from aiolm.cache.pool import ReqToTokenPool, TokenSlotAllocator
from aiolm.cache.radix import RadixCache
from aiolm.engine.forward_batch import ForwardMode
from aiolm.engine.request import Req
from aiolm.engine.schedule_policy import dfs_weight_order
from aiolm.engine.scheduler import Scheduler
from aiolm.errors import ContextLengthExceeded, OutOfMemory
from aiolm.sampling import SamplingParams

VOCAB = 50


def make(pool_size=4096, rows=32, context=512, *, disabled=False, **kw):
    alloc = TokenSlotAllocator(pool_size)
    cache = RadixCache(alloc, disabled=disabled)
    sched = Scheduler(cache=cache, allocator=alloc,
                      req_to_token_pool=ReqToTokenPool(rows, context), **kw)
    return sched


def req(rid, ids, max_tokens=4, **kw):
    return Req(rid=rid, input_ids=list(ids), sampling=SamplingParams(max_tokens=max_tokens), **kw)


class FakeRunner:
    def __init__(self, sched: Scheduler):
        self.sched = sched
        self.kv: dict[int, tuple[int, ...]] = {}
        self.batches: list = []

    def step(self):
        sched = self.sched
        batch = sched.schedule()
        if batch is None:
            return None
        self.batches.append(batch)
        table = sched.req_to_token_pool.req_to_token
        loc = batch.out_cache_loc.tolist()
        assert len(loc) == len(set(loc)) == sum(batch.extend_lens)
        assert not set(loc) & set(sched.allocator.free_slots().tolist())
        pos = 0
        for r, p, e, sample in zip(batch.reqs, batch.prefix_lens, batch.extend_lens,
                                   batch.sample_mask, strict=True):
            ids = r.all_ids
            assert p + e <= len(ids) and sample == (p + e == len(ids))
            if batch.mode is ForwardMode.DECODE:
                assert e == 1 and p == len(ids) - 1
            row = table[r.req_pool_idx, :p + e].tolist()
            assert row[p:] == loc[pos:pos + e]
            for j in range(p, p + e):
                self.kv[row[j]] = tuple(ids[:j + 1])
            seen = [self.kv.get(s) for s in row]
            assert seen == [tuple(ids[:j + 1]) for j in range(p + e)], f"bad KV for {r.rid}"
            if sample:
                r.output_ids.append(hash(tuple(seen[-1])) % VOCAB)
                if len(r.output_ids) >= r.sampling.max_tokens:
                    r.finish_reason = "length"
            pos += e
        sched.process_result(batch)
        check_accounting(sched)
        return batch

    def run(self, max_passes=10_000):
        for _ in range(max_passes):
            if not self.sched.has_work():
                return
            assert self.step() is not None
        raise AssertionError("scheduler did not finish")


def check_accounting(sched: Scheduler):
    sched.cache.check_integrity()
    owned = sum(r.alloc_len - r.locked_len for r in sched.running)
    assert (sched.allocator.available_size() + sched.cache.total_size() + owned
            == sched.allocator.size)
    rows = sum(1 for r in sched.running)
    assert sched.req_to_token_pool.available_size() + rows == sched.req_to_token_pool.max_requests
    assert all(r.req_pool_idx is None and r.kv_len == 0 for r in sched.waiting)


def run_all(requests, **kw):
    sched = make(**kw)
    for r in requests:
        sched.add(r)
    runner = FakeRunner(sched)
    runner.run()
    return {r.rid: r.output_ids for r in requests}, sched, runner


def workload(seed=0, n=12, shared=24):
    rng = random.Random(seed)
    base = [rng.randrange(VOCAB) for _ in range(shared)]
    out = []
    for i in range(n):
        head = base[:rng.randrange(shared)] if i % 3 else []
        tail = [rng.randrange(VOCAB) for _ in range(rng.randrange(3, 20))]
        out.append(req(f"r{i}", head + tail, max_tokens=rng.randrange(1, 12)))
    return out


def test_every_request_completes_with_max_tokens_outputs():
    reqs = workload()
    outs, sched, _ = run_all(reqs)
    assert all(len(outs[r.rid]) == r.sampling.max_tokens for r in reqs)
    stats = sched.statistics()
    assert stats.running == stats.waiting == 0
    assert stats.protected_size == 0


def test_lpm_admits_longest_cached_prefix_first():
    sched = make(in_batch_prefix_threshold=10**6)
    runner = FakeRunner(sched)
    prefix = list(range(1, 30))
    sched.add(req("warm", prefix + [40, 41], max_tokens=1))
    runner.run()
    sched.add(req("none", [45] * 20))
    sched.add(req("short", prefix[:5] + [44] * 10))
    sched.add(req("long", prefix[:25] + [43] * 10))
    sched.add(req("mid", prefix[:15] + [42] * 10))
    batch = runner.step()
    assert [r.rid for r in batch.reqs] == ["long", "mid", "short", "none"]
    assert batch.prefix_lens == [25, 15, 5, 0]


def tree_requests():
    p1 = [1, 1, 1, 1]
    seqs = {
        "b": p1 + [2], "c": p1 + [3, 4], "a": p1, "e": [5, 6], "g": [2, 2], "d": p1 + [3, 5],
        "f": [5, 7],
    }
    return [req(rid, ids) for rid, ids in seqs.items()]


EXPECTED_DFS = ["a", "c", "d", "b", "e", "f", "g"]


def test_dfs_weight_order_visits_heavier_subtrees_first():
    reqs = tree_requests()
    for i, r in enumerate(reqs):
        r.arrival = i
    assert [r.rid for r in dfs_weight_order(reqs)] == EXPECTED_DFS


def test_dfs_weight_order_of_no_requests_is_empty():
    # The scheduler orders only the requests that are not aged, and all may be.
    assert dfs_weight_order([]) == []


def test_dfs_weight_order_handles_identical_and_deep_chains():
    chain = [req(f"c{i}", [7] * (i + 1)) for i in range(2000)]
    for i, r in enumerate(chain):
        r.arrival = 2000 - i
    assert [r.rid for r in dfs_weight_order(chain)] == [f"c{i}" for i in range(2000)]
    same = [req(f"s{i}", [3, 3]) for i in range(3)]
    for i, r in enumerate(same):
        r.arrival = i
    assert [r.rid for r in dfs_weight_order(same)] == ["s0", "s1", "s2"]


def test_dfs_weight_policy_schedules_in_dfs_order():
    sched = make(policy="dfs-weight", in_batch_prefix_threshold=10**6)
    for r in tree_requests():
        sched.add(r)
    batch = FakeRunner(sched).step()
    assert [r.rid for r in batch.reqs] == EXPECTED_DFS


def aging_run(aging_limit):
    """A no-match request against a stream of high-match ones; returns its overtakes."""
    sched = make(policy="lpm", aging_limit=aging_limit, max_running_requests=1,
                 in_batch_prefix_threshold=10**6)
    runner = FakeRunner(sched)
    prefix = list(range(1, 40))
    sched.add(req("warm", prefix + [1], max_tokens=1))
    runner.run()
    loner = req("loner", [45] * 8, max_tokens=2)
    sched.add(loner)
    overtaken = 0
    for i in range(200):
        sched.add(req(f"hot{i}", prefix + [i % VOCAB, 2], max_tokens=2))
        before = {r.rid for r in sched.running}
        batch = runner.step()
        newly = [r for r in batch.reqs if r.rid not in before]
        if loner in sched.waiting and any(r.arrival > loner.arrival for r in newly):
            overtaken += 1
        if loner.finished:
            break
    runner.run()
    assert loner.finished and len(loner.output_ids) == 2
    return overtaken


def test_aging_bounds_how_often_a_request_is_overtaken():
    assert aging_run(aging_limit=3) <= 3
    # Without a meaningful bound the same stream overtakes it far more often.
    assert aging_run(aging_limit=10_000) > 3


@pytest.mark.parametrize("policy", ["lpm", "dfs-weight", "fcfs"])
def test_tiny_pool_retracts_and_still_gives_identical_outputs(policy):
    big, _, _ = run_all(workload(seed=1), policy=policy)
    peak = max(len(r.input_ids) + r.sampling.max_tokens for r in workload(seed=1))
    # An optimistic decode estimate admits too much, so decode runs out of slots.
    small, sched, _ = run_all(workload(seed=1), policy=policy, pool_size=peak + 4,
                              new_token_ratio=0.0, min_new_token_ratio=0.0)
    assert small == big
    assert sched.statistics().retractions > 0


def test_retracted_request_keeps_its_output_and_recomputes():
    reqs = [req(f"r{i}", [i + 1] * 6, max_tokens=12) for i in range(4)]
    outs, sched, _ = run_all(reqs, pool_size=24, new_token_ratio=0.0, min_new_token_ratio=0.0)
    assert sched.statistics().retractions > 0
    assert any(r.retractions for r in reqs)
    assert all(len(o) == 12 for o in outs.values())
    big, _, _ = run_all([req(f"r{i}", [i + 1] * 6, max_tokens=12) for i in range(4)])
    assert outs == big


def test_chunked_prefill_gives_identical_outputs():
    whole, _, _ = run_all(workload(seed=2), chunked_prefill_size=None)
    chunked, _, runner = run_all(workload(seed=2), chunked_prefill_size=5)
    assert chunked == whole
    extends = [b for b in runner.batches if b.mode is ForwardMode.EXTEND]
    assert all(sum(b.extend_lens) <= 5 for b in extends)
    assert any(not all(b.sample_mask) for b in extends)


def test_disabled_cache_gives_identical_outputs_and_no_hits():
    on, _, _ = run_all(workload(seed=3))
    off, sched, _ = run_all(workload(seed=3), disabled=True)
    assert on == off
    assert sched.cache.statistics().hit_tokens == 0
    assert sched.allocator.available_size() == sched.allocator.size


def drain_and_check_empty(sched: Scheduler):
    sched.flush_cache()
    sched.cache.check_integrity()
    assert sched.cache.total_size() == 0
    assert sched.allocator.available_size() == sched.allocator.size
    assert sched.req_to_token_pool.available_size() == sched.req_to_token_pool.max_requests


@pytest.mark.parametrize("when", ["waiting", "mid-chunk", "decoding", "after-schedule"])
def test_abort_frees_everything(when):
    sched = make(chunked_prefill_size=4, max_running_requests=4)
    runner = FakeRunner(sched)
    victim = req("victim", list(range(1, 15)), max_tokens=50)
    others = [req(f"o{i}", [30 + i] * 5, max_tokens=3) for i in range(3)]
    if when == "waiting":
        for r in others:
            sched.add(r)
        sched.add(victim)
        assert sched.abort("victim") is victim
    else:
        sched.add(victim)
        for r in others:
            sched.add(r)
        runner.step()
        if when == "decoding":
            while not victim.output_ids:
                runner.step()
            runner.step()
        assert victim.req_pool_idx is not None
        if when == "mid-chunk":
            assert 0 < victim.kv_len < len(victim.input_ids)
        if when == "after-schedule":
            batch = sched.schedule()
            assert victim in batch.reqs
            sched.abort("victim")
            sched.process_result(batch)
        else:
            assert sched.abort("victim") is victim
    assert victim.finish_reason == "abort" and victim.req_pool_idx is None
    assert sched.abort("victim") is None
    check_accounting(sched)
    runner.run()
    assert all(r.finish_reason == "length" for r in others)
    drain_and_check_empty(sched)


def test_finished_requests_release_everything_to_the_cache():
    _, sched, _ = run_all(workload(seed=4))
    assert sched.cache.protected_size() == 0
    assert sched.allocator.available_size() + sched.cache.total_size() == sched.allocator.size
    drain_and_check_empty(sched)


def test_in_batch_prefix_sharing_defers_then_hits():
    shared = list(range(1, 41))
    reqs = [req(f"r{i}", shared + [41 + i] * 3, max_tokens=1) for i in range(4)]
    sched = make()
    for r in reqs:
        sched.add(r)
    runner = FakeRunner(sched)
    first = runner.step()
    assert [r.rid for r in first.reqs] == ["r0"]
    runner.run()
    assert [r.cached_len for r in reqs] == [0, 40, 40, 40]


def test_add_rejects_requests_that_can_never_fit():
    sched = make(pool_size=20, context=64)
    with pytest.raises(OutOfMemory):
        sched.add(req("big", [1] * 15, max_tokens=10))
    with pytest.raises(ContextLengthExceeded):
        sched.add(req("long", [1] * 60, max_tokens=10))
    with pytest.raises(ValueError, match="input_ids"):
        sched.add(req("empty", []))
    sched.add(req("ok", [1] * 10, max_tokens=11))
    with pytest.raises(ValueError, match="rid"):
        sched.add(req("ok", [1]))
    with pytest.raises(ValueError, match="policy"):
        make(policy="random")


def test_admission_counts_the_last_token_in_the_context_but_gives_it_no_kv_slot():
    sched = make(pool_size=20, context=30)
    fits = req("fits", [1] * 10, max_tokens=11)   # 21 tokens, the last one never fed back
    sched.add(fits)
    FakeRunner(sched).run()
    assert len(fits.output_ids) == 11
    with pytest.raises(OutOfMemory, match="needs 21 KV slots"):
        sched.add(req("more", [1] * 10, max_tokens=12))
    roomy = make(pool_size=100, context=30)
    roomy.add(req("edge", [2] * 20, max_tokens=10))
    with pytest.raises(ContextLengthExceeded, match="31 tokens exceed the context of 30"):
        roomy.add(req("past", [2] * 20, max_tokens=11))


def test_max_prefix_match_keeps_tokens_to_score():
    sched = make()
    runner = FakeRunner(sched)
    sched.add(req("warm", [1, 2, 3, 4, 5, 6], max_tokens=1))
    runner.run()
    scorer = req("score", [1, 2, 3, 4, 5, 6, 7], max_tokens=1, max_prefix_match=2,
                 return_all_logits=True)
    sched.add(scorer)
    batch = runner.step()
    assert batch.reqs == [scorer] and batch.prefix_lens == [2] and batch.extend_lens == [5]
    runner.run()


def test_jump_forward_tokens_are_extended_in_one_pass():
    sched = make()
    runner = FakeRunner(sched)
    r = req("jf", [1, 2, 3], max_tokens=10)
    sched.add(r)
    runner.step()
    r.output_ids += [9, 9, 9]  # forced tokens appended by the runtime
    batch = runner.step()
    assert batch.mode is ForwardMode.EXTEND and batch.extend_lens == [4]
    runner.run()
    assert len(r.output_ids) == 10


def tree_of_thought(depth=3, width=3, root_len=64, thought_len=40, seed=0):
    rng = random.Random(seed)
    root = [rng.randrange(VOCAB) for _ in range(root_len)]
    out = []

    def grow(prefix, level):
        out.append(prefix)
        if level == depth:
            return
        for _ in range(width):
            grow(prefix + [rng.randrange(VOCAB) for _ in range(thought_len)], level + 1)

    grow(root, 0)
    return out


@pytest.mark.parametrize("policy", ["lpm", "dfs-weight"])
def test_tree_of_thought_hit_rate_is_near_dfs_optimal(policy):
    prompts = tree_of_thought()
    reqs = [req(f"t{i}", p, max_tokens=2) for i, p in enumerate(prompts)]
    random.Random(1).shuffle(reqs)
    _, sched, _ = run_all(reqs, policy=policy, pool_size=20_000, rows=64, context=1024)
    stats = sched.cache.statistics()
    optimal = dfs_optimal_hit_rate(prompts)
    assert stats.hit_tokens + stats.miss_tokens == sum(map(len, prompts))
    assert stats.hit_tokens == sum(r.cached_len for r in reqs)   # what usage reports
    assert stats.hit_rate >= 0.96 * optimal


def test_dfs_optimal_hit_rate_of_hand_made_trees():
    assert dfs_optimal_hit_rate([]) == 0.0
    assert dfs_optimal_hit_rate([[1, 2, 3]]) == 0.0
    # Two requests sharing 2 of 3 tokens: 4 distinct of 6.
    assert distinct_prefix_tokens([[1, 2, 3], [1, 2, 4]]) == 4
    assert dfs_optimal_hit_rate([[1, 2, 3], [1, 2, 4]]) == pytest.approx(1 - 4 / 6)
    # A chain: each request extends the previous one.
    chain = [[1], [1, 2], [1, 2, 3]]
    assert distinct_prefix_tokens(chain) == 3
    assert dfs_optimal_hit_rate(chain) == pytest.approx(1 - 3 / 6)
    # Duplicates are free in the paper's count, cost their last token otherwise.
    dup = [[5, 6], [5, 6]]
    assert dfs_optimal_hit_rate(dup) == pytest.approx(0.5)
    assert dfs_optimal_hit_rate(dup, compute_last_token=True) == pytest.approx(0.25)
    tot = tree_of_thought(depth=2, width=2, root_len=10, thought_len=5)
    assert distinct_prefix_tokens(tot) == 10 + 6 * 5


def test_decode_batches_write_slots_into_req_to_token():
    sched = make()
    runner = FakeRunner(sched)
    for i in range(3):
        sched.add(req(f"r{i}", [i + 1] * 4, max_tokens=3))
    runner.step()
    batch = runner.step()
    assert batch.mode is ForwardMode.DECODE and len(batch.reqs) == 3
    table = sched.req_to_token_pool.req_to_token
    rows = torch.tensor([r.req_pool_idx for r in batch.reqs])
    assert table[rows, torch.tensor(batch.prefix_lens)].tolist() == batch.out_cache_loc.tolist()


prompts = st.lists(st.lists(st.integers(1, 3), min_size=1, max_size=12), min_size=1,
                   max_size=7)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompts=prompts, data=st.data())
def test_random_workloads_complete_correctly_under_pressure(prompts, data):
    """Random prompts, pool sizes, chunk sizes, policies, ratios and aborts: every pass
    reads correct KV, accounting stays exact, and every surviving request's output equals
    the one from a roomy run."""
    max_tokens = [data.draw(st.integers(1, 6)) for _ in prompts]

    def fresh():
        return [req(f"r{i}", p, max_tokens=m) for i, (p, m) in enumerate(zip(prompts, max_tokens, strict=True))]

    reference, _, _ = run_all(fresh())
    peak = max(len(p) + m - 1 for p, m in zip(prompts, max_tokens, strict=True))
    sched = make(
        pool_size=data.draw(st.integers(peak, peak + 20)),
        rows=data.draw(st.integers(1, 4)),
        policy=data.draw(st.sampled_from(["lpm", "dfs-weight", "fcfs"])),
        chunked_prefill_size=data.draw(st.sampled_from([None, 1, 3, 8])),
        max_prefill_tokens=data.draw(st.integers(1, 16)),
        aging_limit=data.draw(st.integers(1, 4)),
        in_batch_prefix_threshold=data.draw(st.integers(1, 4)),
        new_token_ratio=data.draw(st.sampled_from([0.0, 0.5, 1.0])),
        min_new_token_ratio=0.0,
    )
    reqs = fresh()
    pending = list(reqs)
    runner = FakeRunner(sched)
    aborted = set()
    for _ in range(500):
        if pending and (not sched.has_work() or data.draw(st.booleans())):
            sched.add(pending.pop(0))
        if data.draw(st.integers(0, 9)) == 0:
            live = [r for r in reqs if sched.get(r.rid) is not None]
            if live:
                victim = data.draw(st.sampled_from(live))
                sched.abort(victim.rid)
                aborted.add(victim.rid)
                check_accounting(sched)
        if not pending and not sched.has_work():
            break
        if sched.has_work():
            assert runner.step() is not None
    assert not pending and not sched.has_work()
    for r in reqs:
        if r.rid not in aborted:
            assert r.output_ids == reference[r.rid]
    drain_and_check_empty(sched)
