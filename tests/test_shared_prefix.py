"""Shared-prefix (cascade) decode: the groups found from the radix tree, and the engine's
outputs with it on equal to those with it off (the Triton backend, interpreted on the CPU;
tests/test_gpu_attention.py runs the kernel on a GPU)."""

from __future__ import annotations

import os

import pytest
import torch
from mini_model import load_tiny
from test_engine_overlap import assert_same_logprobs, clean, concurrently, summary

from aiolm.backends.engine import Engine
from aiolm.cache.pool import TokenSlotAllocator
from aiolm.cache.radix import RadixCache
from aiolm.engine.shared_prefix import find_groups, max_members, prefix_groups

pytestmark = pytest.mark.anyio


class _Req:
    """What find_groups reads of a running request."""

    def __init__(self, match) -> None:
        self.last_node = match.node
        self.locked_len = match.length


def _cached(cache: RadixCache, allocator: TokenSlotAllocator, key: list[int]) -> _Req:
    slots = allocator.alloc(len(key))
    cache.insert(key, slots)
    return _Req(cache.match_prefix(key))


def test_requests_group_by_the_deepest_prefix_they_all_share():
    allocator = TokenSlotAllocator(4096)
    cache = RadixCache(allocator)
    system = list(range(1, 9))                                  # 8 tokens: too short
    image_a, image_b = list(range(100, 140)), list(range(200, 230))
    reqs = [
        _cached(cache, allocator, system + image_a + [7, 8, 9]),
        _cached(cache, allocator, system + [5, 5]),             # shares only the system
        _cached(cache, allocator, system + image_b + [1]),
        _cached(cache, allocator, system + image_a + [7, 8, 3, 3]),
        _cached(cache, allocator, system + image_b + [2, 2]),
        _cached(cache, allocator, system + image_a + [4]),
    ]
    groups = find_groups(reqs, min_tokens=16)
    assert sorted(groups) == [(8 + 30, [2, 4]), (8 + 40, [0, 3, 5])]
    # A group's members share the same slots up to its length (the tree's).
    for shared, members in groups:
        firsts = [cache.match_prefix(system + image_a).slots if shared == 48 else
                  cache.match_prefix(system + image_b).slots for _ in members]
        assert all(len(f) == shared for f in firsts)
    assert find_groups(reqs, min_tokens=0) == []
    assert find_groups(reqs, min_tokens=100) == []
    assert find_groups(reqs[:1], min_tokens=16) == []
    # At most max_members a group; a lone leftover forms none.
    assert sorted(find_groups(reqs, min_tokens=16, max_members=2)) == [(38, [2, 4]),
                                                                        (50, [0, 3])]


@pytest.mark.parametrize(("heads", "members"), [((32, 32), 16), ((32, 8), 16), ((28, 4), 8),
                                               ((64, 4), 4), ((128, 1), 2)])
def test_groups_are_as_large_as_the_kernels_registers_allow(heads, members):
    assert max_members(*heads) == members


def test_a_group_never_reaches_past_a_members_locked_prefix():
    allocator = TokenSlotAllocator(4096)
    cache = RadixCache(allocator)
    key = list(range(10, 60))
    a, b = _cached(cache, allocator, key), _cached(cache, allocator, key)
    b.locked_len = 30   # b holds only part of the node
    assert find_groups([a, b], min_tokens=16) == [(30, [0, 1])]


def test_groups_reach_the_device_as_the_kernel_reads_them():
    groups = prefix_groups([(40, [0, 2, 3]), (20, [1, 4])], [45, 22, 41, 50, 30],
                           torch.device("cpu"))
    assert groups.prefix_lens.tolist() == [40, 20, 40, 40, 20]
    assert groups.rows.tolist() == [[0, 2, 3], [1, 4, -1]]
    assert groups.lens.tolist() == [40, 20]
    assert (groups.count, groups.max_len, groups.max_suffix) == (2, 40, 10)
    assert prefix_groups([], [3, 4], torch.device("cpu")) is None


@pytest.fixture(scope="module")
def tiny():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton backend runs on the CPU under TRITON_INTERPRET=1 (conftest)")
    return load_tiny()


async def test_engine_outputs_are_the_same_with_shared_prefix_decode(tiny):
    trunk_a = [5 + (i * 7) % 300 for i in range(40)]
    trunk_b = [9 + (i * 11) % 300 for i in range(30)]
    prompts = [trunk_a + [1, 2], trunk_a + [3], trunk_b + [4, 4, 4], trunk_a + [5, 6, 7],
               trunk_b + [8], [40, 41, 42]]
    requests = [dict(input_ids=p, max_tokens=6, ignore_eos=True, temperature=0.0,
                     logprobs=True, top_logprobs=2) for p in prompts]
    results = {}
    for min_tokens in (16, 0):
        async with Engine(tiny, device="cpu", attention_backend="triton",
                          max_total_tokens=2048,
                          shared_prefix_min_tokens=min_tokens) as eng:
            core = eng._core
            grouped = []
            forward = core.runner.forward

            def spy(fb, forward=forward, grouped=grouped):
                if fb.prefix_groups is not None:
                    grouped.append(fb.prefix_groups.count)
                return forward(fb)

            core.runner.forward = spy
            for trunk in (trunk_a, trunk_b):   # the trunks cached first
                await eng.generate(input_ids=trunk, max_tokens=1, temperature=0.0)
            results[min_tokens] = await concurrently(eng, requests)
            await clean(eng)
        if min_tokens:
            assert grouped and max(grouped) == 2   # both trunks' groups in one step
        else:
            assert grouped == []
    for on, off in zip(results[16], results[0], strict=True):
        assert summary(on) == summary(off)
        assert_same_logprobs(on, off)


def test_the_default_turns_it_on_for_multi_head_models_on_cuda_only():
    from aiolm.engine.shared_prefix import AUTO_MIN_TOKENS, auto_min_tokens

    assert auto_min_tokens(32, 32, "cuda") == AUTO_MIN_TOKENS
    assert auto_min_tokens(32, 8, "cuda") == 0      # grouped-query heads: off
    assert auto_min_tokens(32, 32, "cpu") == 0      # the interpreter: off


async def test_the_default_leaves_it_off_on_the_cpu(tiny):
    async with Engine(tiny, device="cpu", attention_backend="triton",
                      max_total_tokens=2048) as eng:
        assert eng._core.runner.shared_prefix_min_tokens == 0
