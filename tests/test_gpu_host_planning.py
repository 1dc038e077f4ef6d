"""Host-side parts of the GPU path that run anywhere: graph buckets, backend availability."""

from __future__ import annotations

import importlib.util

import pytest

pytest.importorskip("torch")


def test_graph_buckets_cover_every_batch_size_up_to_the_maximum():
    from aiolm.engine.cuda_graph import graph_batch_sizes

    sizes = graph_batch_sizes(256)
    assert sizes[:8] == [1, 2, 4, 8, 16, 24, 32, 48]
    assert sizes[-1] == 256 and sizes == sorted(set(sizes))
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert graph_batch_sizes(1) == [1]


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
