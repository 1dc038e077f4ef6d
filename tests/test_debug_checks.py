"""AIOLM_DEBUG_CHECKS: a hand-made bad batch is refused before any kernel, naming the index;
and ``Engine.check_integrity`` catches broken KV accounting (a planted double free)."""

from __future__ import annotations

import pytest
import torch

from aiolm.backends.engine import Engine, LoadedModel
from aiolm.cache.pool import ReqToTokenPool, TokenSlotAllocator
from aiolm.engine.debug_checks import DebugCheckError, check_forward_batch, debug_checks_enabled
from aiolm.engine.forward_batch import ForwardBatch, ForwardMode

VOCAB = 100


@pytest.fixture
def pools():
    allocator = TokenSlotAllocator(64)
    table = ReqToTokenPool(4, 32)
    return allocator, table


def extend_batch(allocator, table, lens=(3, 5)):
    """A valid EXTEND batch of fresh requests (no prefix): rows, slots and table filled."""
    rows, locs, ids, positions = [], [], [], []
    for n in lens:
        row = table.alloc()
        slots = allocator.alloc(n)
        table.write(row, 0, slots)
        rows.append(row)
        locs += slots.tolist()
        ids += list(range(1, n + 1))
        positions += list(range(n))
    t = lambda v, dt=torch.int64: torch.tensor(v, dtype=dt)  # noqa: E731
    return ForwardBatch(
        mode=ForwardMode.EXTEND, batch_size=len(lens), input_ids=t(ids), positions=t(positions),
        out_cache_loc=t(locs), req_pool_indices=t(rows), seq_lens=t(list(lens), torch.int32),
        extend_prefix_lens=t([0] * len(lens), torch.int32),
        extend_seq_lens=t(list(lens), torch.int32), seq_lens_cpu=list(lens),
        extend_prefix_lens_cpu=[0] * len(lens), extend_seq_lens_cpu=list(lens),
    )


def check(fb, allocator, table):
    check_forward_batch(fb, allocator=allocator, req_to_token_pool=table, vocab_size=VOCAB)


def test_the_suite_runs_with_debug_checks_on():
    assert debug_checks_enabled()


def test_a_valid_batch_passes(pools):
    allocator, table = pools
    check(extend_batch(allocator, table), allocator, table)


def test_a_slot_past_the_pool_is_named(pools):
    allocator, table = pools
    fb = extend_batch(allocator, table)
    fb.out_cache_loc[4] = 65
    with pytest.raises(DebugCheckError, match=r"out_cache_loc\[4\] = 65 \(request 1\) is not a KV slot"):
        check(fb, allocator, table)


def test_a_freed_slot_still_in_a_sequence_is_a_use_after_free(pools):
    allocator, table = pools
    fb = extend_batch(allocator, table)
    stale = int(table.req_to_token[fb.req_pool_indices[0], 1])
    allocator.free(torch.tensor([stale]))
    with pytest.raises(DebugCheckError, match=rf"req_to_token\[0, 1\] = {stale} .*\(use after free\)"):
        check(fb, allocator, table)


def test_a_free_table_row_is_named(pools):
    allocator, table = pools
    fb = extend_batch(allocator, table)
    fb.req_pool_indices[1] = 3
    with pytest.raises(DebugCheckError, match=r"req_pool_indices\[1\] = 3 is a free req_to_token row"):
        check(fb, allocator, table)


def test_a_row_past_the_table_is_named(pools):
    allocator, table = pools
    fb = extend_batch(allocator, table)
    fb.req_pool_indices[0] = 9
    with pytest.raises(DebugCheckError, match=r"req_pool_indices\[0\] = 9 is not a req_to_token row"):
        check(fb, allocator, table)


def test_lengths_that_do_not_add_up_are_named(pools):
    allocator, table = pools
    fb = extend_batch(allocator, table)
    fb.extend_prefix_lens[1] = 2
    with pytest.raises(DebugCheckError, match=r"request 1: prefix 2 \+ extend 5 does not make seq_len 5"):
        check(fb, allocator, table)


def test_a_length_past_the_table_width_is_named(pools):
    allocator, table = pools
    fb = extend_batch(allocator, table)
    fb.seq_lens[0] = 40
    fb.seq_lens_cpu[0] = 40
    with pytest.raises(DebugCheckError, match=r"seq_lens\[0\] = 40 is outside 1..32"):
        check(fb, allocator, table)


def test_host_and_device_lengths_must_agree(pools):
    allocator, table = pools
    fb = extend_batch(allocator, table)
    fb.seq_lens_cpu[1] = 4
    with pytest.raises(DebugCheckError, match=r"seq_lens\[1\] = 5 on the device but 4 on the host"):
        check(fb, allocator, table)


def test_a_slot_written_twice_is_named(pools):
    allocator, table = pools
    fb = extend_batch(allocator, table)
    fb.out_cache_loc[1] = fb.out_cache_loc[0]
    with pytest.raises(DebugCheckError, match=r"out_cache_loc\[1\] = \d+ \(request 0\) is also written"):
        check(fb, allocator, table)


def test_a_token_outside_the_vocabulary_is_named(pools):
    allocator, table = pools
    fb = extend_batch(allocator, table)
    fb.input_ids[2] = VOCAB
    with pytest.raises(DebugCheckError, match=rf"input_ids\[2\] = {VOCAB} is not a token id"):
        check(fb, allocator, table)


# ------------------------------------------------------------- the engine's own check


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return LoadedModel.load("tiny-llama", load_format="dummy", device="cpu", seed=0)


@pytest.mark.anyio
async def test_check_integrity_reports_an_idle_engine(tiny):
    async with Engine(tiny, max_total_tokens=512) as eng:
        await eng.generate(input_ids=[5, 6, 7, 8], max_tokens=4, ignore_eos=True)
        report = await eng.check_integrity()
    assert report.idle
    assert report.request_slots == report.locked_tokens == report.rows_in_use == 0
    assert report.cached_tokens > 0
    assert report.free_slots + report.cached_tokens == 512


@pytest.mark.anyio
async def test_check_integrity_finds_a_planted_double_free(tiny):
    async with Engine(tiny, max_total_tokens=512) as eng:
        await eng.generate(input_ids=[5, 6, 7, 8], max_tokens=4, ignore_eos=True)
        allocator = eng._core.runner.allocator
        allocator.free(torch.tensor([512]))  # never handed out, so already free
        with pytest.raises(RuntimeError, match="on the free list twice"):
            await eng.check_integrity()


@pytest.mark.anyio
async def test_check_integrity_finds_a_cached_slot_freed_under_the_cache(tiny):
    async with Engine(tiny, max_total_tokens=512) as eng:
        await eng.generate(input_ids=[5, 6, 7, 8], max_tokens=4, ignore_eos=True)
        eng._core.runner.allocator.free(torch.tensor([1]))  # slot 1 holds the cached prompt
        with pytest.raises(RuntimeError, match="also free in the allocator"):
            await eng.check_integrity()
