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


def test_a_replay_places_its_inputs_and_pads_the_captured_rest():
    """What replay_extend copies into a bucket's static buffers (on the CPU: the graph and
    the attention backend stand-ins): the batch's values first, then padding tokens (token
    0, position 0, slot 0) and padding requests (no new tokens, a sequence of one)."""
    import torch

    from aiolm.engine.cuda_graph import CudaGraphRunner

    replayed = []
    static = types.SimpleNamespace(batch_size=6)
    runner = types.SimpleNamespace(
        extend_buckets=[8, 16], extend_batches={8: static},
        extend_graphs={8: types.SimpleNamespace(replay=lambda: replayed.append(8))},
        extend_outputs={8: torch.arange(6 * 3).view(6, 3)}, extend_replays=0,
        attn=types.SimpleNamespace(init_forward_for_replay=lambda b: replayed.append(b)),
        **{name: torch.full((size,), 7, dtype=torch.int64) for name, size in (
            ("ext_input_ids", 16), ("ext_positions", 16), ("ext_out_cache_loc", 16),
            ("ext_req_pool_indices", 8), ("ext_seq_lens", 8), ("ext_prefix_lens", 8),
            ("ext_lens", 8))})
    batch = _extend_batch([3, 2])
    batch.input_ids.copy_(torch.tensor([11, 12, 13, 14, 15]))
    batch.req_pool_indices.copy_(torch.tensor([4, 5]))
    batch.seq_lens.copy_(torch.tensor([9, 20], dtype=torch.int32))
    batch.extend_prefix_lens.copy_(torch.tensor([6, 18], dtype=torch.int32))
    logits = CudaGraphRunner.replay_extend(runner, batch)
    assert replayed == [static, 8] and runner.extend_replays == 1
    assert logits.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert runner.ext_input_ids.tolist() == [11, 12, 13, 14, 15, 0, 0, 0] + [7] * 8
    assert runner.ext_positions.tolist()[:8] == [0] * 8
    assert runner.ext_req_pool_indices.tolist() == [4, 5, 0, 0, 0, 0, 7, 7]
    assert runner.ext_seq_lens.tolist() == [9, 20, 1, 1, 1, 1, 7, 7]
    assert runner.ext_prefix_lens.tolist() == [6, 18, 0, 0, 0, 0, 7, 7]
    assert runner.ext_lens.tolist() == [3, 2, 0, 0, 0, 0, 7, 7]


def test_a_grouped_decode_replay_places_its_groups_and_empties_the_rest():
    """replay (decode with shared-prefix groups) on the CPU: rows past the batch decode a
    one-token sequence at slot 0; groups past the batch's have no members and no length."""
    import torch

    from aiolm.engine.cuda_graph import CudaGraphRunner
    from aiolm.engine.forward_batch import ForwardBatch, ForwardMode

    def buffer(size, *rest):
        return torch.full((size, *rest), 7, dtype=torch.int64)

    static = types.SimpleNamespace(seq_lens_cpu=None)
    runner = types.SimpleNamespace(
        bucket=lambda bs: 8, batches={(8, True): static},
        graphs={(8, True): types.SimpleNamespace(replay=lambda: None)},
        outputs={(8, True): torch.zeros(8, 2)},
        attn=types.SimpleNamespace(init_forward_for_replay=lambda b: None),
        input_ids=buffer(8), positions=buffer(8), out_cache_loc=buffer(8),
        req_pool_indices=buffer(8), seq_lens=buffer(8), prefix_lens=buffer(8),
        group_rows=buffer(4, 2), group_lens=buffer(4))
    groups = types.SimpleNamespace(count=1, prefix_lens=torch.tensor([30, 30, 0]),
                                   rows=torch.tensor([[0, 1]]), lens=torch.tensor([30]))
    batch = ForwardBatch(
        mode=ForwardMode.DECODE, batch_size=3, input_ids=torch.tensor([5, 6, 7]),
        positions=torch.tensor([31, 32, 9]), out_cache_loc=torch.tensor([40, 41, 42]),
        req_pool_indices=torch.tensor([1, 2, 3]), seq_lens=torch.tensor([32, 33, 10]),
        seq_lens_cpu=[32, 33, 10], prefix_groups=groups)
    assert CudaGraphRunner.replay(runner, batch).shape == (3, 2)
    assert runner.input_ids.tolist() == [5, 6, 7, 0, 0, 0, 0, 0]
    assert runner.seq_lens.tolist() == [32, 33, 10, 1, 1, 1, 1, 1]
    assert runner.prefix_lens.tolist() == [30, 30, 0, 0, 0, 0, 0, 0]
    assert runner.group_rows.tolist() == [[0, 1], [-1, -1], [-1, -1], [-1, -1]]
    assert runner.group_lens.tolist() == [30, 0, 0, 0]
    assert static.seq_lens_cpu == [32, 33, 10, 1, 1, 1, 1, 1]


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
