"""Messages a new user meets in the first hour say what to do (issue 19's list)."""

from __future__ import annotations

import pytest

from aiolm.backends.engine import Engine, LoadedModel

pytestmark = pytest.mark.anyio


async def test_start_after_aclose_says_the_engine_was_closed():
    loaded = LoadedModel.load("tiny-llama", load_format="dummy", device="cpu", seed=0)
    engine = Engine(loaded, max_total_tokens=256)
    await engine.start()
    await engine.aclose()
    with pytest.raises(RuntimeError, match="this engine was closed; create a new Engine"):
        await engine.start()


async def test_a_hub_id_says_aiolm_never_downloads_weights():
    with pytest.raises(FileNotFoundError, match="looks like a Hugging Face hub id: aiolm never "
                                                "downloads weights"):
        await Engine("HuggingFaceTB/SmolLM2-135M-Instruct").start()


def test_cuda_without_a_gpu_fails_when_the_engine_is_made():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="device: 'cuda' asked for, but CUDA is not available"):
        Engine("tiny-llama", load_format="dummy", device="cuda")
