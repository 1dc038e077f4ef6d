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
