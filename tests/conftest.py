"""Test set-up: every async test runs on asyncio and trio; GPU tests skip without CUDA."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    if request.param == "trio":
        pytest.importorskip("trio")  # the GPU machine's image has no trio
    return request.param


def pytest_configure(config):
    # Every engine the tests open checks each index before it reaches a kernel.
    os.environ.setdefault("AIOLM_DEBUG_CHECKS", "1")
    # Without a GPU, Triton kernels run only through Triton's interpreter, which must be
    # chosen before triton is first imported (tests/test_triton_attention.py uses it).
    try:
        import torch
    except ImportError:
        return
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
