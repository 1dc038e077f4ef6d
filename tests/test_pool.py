"""The KV slot allocator, the K/V buffers and the request → slots table."""

from __future__ import annotations

import pytest
import torch

from aiolm.cache.pool import KVPool, ReqToTokenPool, TokenSlotAllocator


def test_allocator_hands_out_distinct_slots_and_never_slot_zero():
    alloc = TokenSlotAllocator(10)
    a = alloc.alloc(4)
    b = alloc.alloc(6)
    got = torch.cat([a, b])
    assert sorted(got.tolist()) == list(range(1, 11))
    assert a.dtype == torch.int64
    assert alloc.available_size() == 0


def test_allocator_refuses_partial_allocations():
    alloc = TokenSlotAllocator(5)
    assert alloc.alloc(6) is None
    assert alloc.available_size() == 5
    alloc.alloc(3)
    assert alloc.alloc(3) is None
    assert alloc.available_size() == 2


def test_allocator_reuses_freed_slots():
    alloc = TokenSlotAllocator(8)
    a = alloc.alloc(8)
    alloc.free(a[2:5])
    assert alloc.available_size() == 3
    again = alloc.alloc(3)
    assert sorted(again.tolist()) == sorted(a[2:5].tolist())
    alloc.free(torch.cat([a[:2], a[5:], again]))
    assert sorted(alloc.free_slots().tolist()) == list(range(1, 9))


def test_allocated_slots_do_not_alias_the_free_list():
    alloc = TokenSlotAllocator(4)
    a = alloc.alloc(2)
    a.fill_(0)
    assert sorted(alloc.free_slots().tolist()) == [3, 4]


def test_allocator_rejects_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        TokenSlotAllocator(0)
    alloc = TokenSlotAllocator(3)
    with pytest.raises(ValueError, match="n"):
        alloc.alloc(-1)
    with pytest.raises(TypeError, match="n"):
        alloc.alloc(1.5)
    assert alloc.alloc(0).numel() == 0


def test_allocator_reset_frees_everything():
    alloc = TokenSlotAllocator(6)
    alloc.alloc(5)
    alloc.reset()
    assert alloc.available_size() == 6
    assert sorted(alloc.free_slots().tolist()) == list(range(1, 7))


def test_kv_pool_writes_and_reads_rows_per_layer():
    pool = KVPool(num_layers=2, num_kv_heads=2, head_dim=4, size=10, dtype=torch.float32,
                  device="cpu")
    k, v = pool.get_kv(1)
    assert k.shape == (11, 2, 4) and v.shape == (11, 2, 4)
    slots = torch.tensor([3, 7])
    newk = torch.randn(2, 2, 4)
    newv = torch.randn(2, 2, 4)
    pool.set_kv(1, slots, newk, newv)
    assert torch.equal(pool.k_buffers[1][slots], newk)
    assert torch.equal(pool.v_buffers[1][slots], newv)
    for buf in pool.k_buffers + pool.v_buffers:   # the padding slot reads as zeros
        assert buf[0].abs().sum() == 0
    assert pool.kv_bytes_per_token() == 2 * 2 * 2 * 4 * 4


def test_kv_pool_casts_to_its_dtype():
    pool = KVPool(1, 1, 2, 4, torch.bfloat16, "cpu")
    pool.set_kv(0, torch.tensor([1]), torch.ones(1, 1, 2), torch.ones(1, 1, 2))
    assert pool.k_buffers[0].dtype == torch.bfloat16
    assert pool.kv_bytes_per_token() == 2 * 1 * 1 * 2 * 2


def test_req_to_token_rows_are_allocated_and_freed():
    pool = ReqToTokenPool(max_requests=2, max_context_len=8)
    assert pool.req_to_token.dtype == torch.int32
    r0 = pool.alloc()
    r1 = pool.alloc()
    assert {r0, r1} == {0, 1}
    assert pool.alloc() is None
    pool.write(r1, 2, torch.tensor([5, 6, 7]))
    assert pool.read(r1, 2, 5).tolist() == [5, 6, 7]
    pool.free(r0)
    assert pool.available_size() == 1
    with pytest.raises(RuntimeError, match="twice"):
        pool.free(r0)
    assert pool.alloc() == r0
