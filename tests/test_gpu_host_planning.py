"""Host-side parts of the GPU path that run anywhere: which captured CUDA graph a decode
batch replays (the runner's own choice, without a GPU), backend availability."""

from __future__ import annotations

import importlib.util
import types

import pytest

pytest.importorskip("torch")


@pytest.mark.parametrize("most", [1, 2, 20, 64, 100, 256])
def test_every_batch_size_replays_a_captured_graph_with_little_padding(most):
    from aiolm.engine.cuda_graph import CudaGraphRunner, graph_batch_sizes

    sizes = graph_batch_sizes(most)
    assert sizes == sorted(set(sizes)) and sizes[0] == 1 and sizes[-1] == most
    # The runner's own choice of graph for a batch (it reads only the captured sizes, so it
    # runs here without capturing anything on a GPU).
    runner = types.SimpleNamespace(batch_sizes=sizes)
    for batch_size in range(1, most + 1):
        padded = CudaGraphRunner.bucket(runner, batch_size)
        assert padded in sizes and padded >= batch_size
        # Padding rows are wasted work: under 2x for small batches, under 16 rows above 32.
        assert padded - batch_size < (16 if batch_size > 32 else batch_size)


def test_graph_buckets_reject_an_empty_maximum():
    from aiolm.engine.cuda_graph import graph_batch_sizes

    with pytest.raises(ValueError, match="max_batch_size"):
        graph_batch_sizes(0)


def test_extend_buckets_double_up_to_the_limit():
    from aiolm.engine.cuda_graph import extend_token_buckets

    assert extend_token_buckets(512) == [32, 64, 128, 256, 512]
    assert extend_token_buckets(300) == [32, 64, 128, 256, 300]
    assert extend_token_buckets(32) == [32]
    assert extend_token_buckets(31) == extend_token_buckets(0) == []


def _extend_batch(lens, *, mode="extend", logits="last", images=False):
    import torch

    from aiolm.engine.forward_batch import ForwardBatch, ForwardMode

    n = sum(lens)
    return ForwardBatch(
        mode=ForwardMode(mode), batch_size=len(lens), input_ids=torch.zeros(n, dtype=torch.int64),
        positions=torch.zeros(n, dtype=torch.int64), out_cache_loc=torch.zeros(n, dtype=torch.int64),
        req_pool_indices=torch.zeros(len(lens), dtype=torch.int64),
        seq_lens=torch.ones(len(lens), dtype=torch.int32),
        extend_prefix_lens=torch.zeros(len(lens), dtype=torch.int32),
        extend_seq_lens=torch.tensor(lens, dtype=torch.int32), extend_seq_lens_cpu=list(lens),
        return_logits=logits, mm_embeds=torch.zeros(1, 4) if images else None,
        mm_rows=torch.zeros(1, dtype=torch.int64) if images else None,
    )


def test_which_extend_passes_replay_a_captured_graph():
    """Text only, the last logits, at most 64 new tokens a request, within the largest
    bucket: replayed; anything else runs eagerly (the runner's own check, no GPU)."""
    from aiolm.engine.cuda_graph import EXTEND_GRAPH_MAX_NEW, CudaGraphRunner, extend_token_buckets

    runner = types.SimpleNamespace(extend_buckets=extend_token_buckets(512), max_batch_size=256)
    takes = lambda batch: CudaGraphRunner.can_run_extend(runner, batch)  # noqa: E731
    assert takes(_extend_batch([1] * 200 + [12, 30]))            # riders and forced tokens
    assert takes(_extend_batch([EXTEND_GRAPH_MAX_NEW] * 8))       # exactly 512 tokens
    assert not takes(_extend_batch([EXTEND_GRAPH_MAX_NEW + 1]))   # a request over the bound
    assert not takes(_extend_batch([60] * 9))                     # over the largest bucket
    assert not takes(_extend_batch([1] * 300))                    # more requests than captured
    assert not takes(_extend_batch([5, 5], logits="all"))         # scoring: every row's logits
    assert not takes(_extend_batch([5, 5], images=True))          # an image's embeddings
    off = types.SimpleNamespace(extend_buckets=[], max_batch_size=256)
    assert not CudaGraphRunner.can_run_extend(off, _extend_batch([5]))


@pytest.mark.skipif(importlib.util.find_spec("flashinfer") is not None,
                    reason="flashinfer is installed here")
def test_flashinfer_backend_without_flashinfer_says_how_to_get_it():
    pytest.importorskip("triton")  # the backend's index and store kernels are triton's
    from aiolm.engine.attention import create
    from aiolm.engine.attention.flashinfer import flashinfer_available

    assert not flashinfer_available()
    with pytest.raises(ImportError, match="flashinfer-python==0.5.3"):
        create("flashinfer", num_q_heads=8, num_kv_heads=2, head_dim=128, scale=0.1,
               device="cuda")
