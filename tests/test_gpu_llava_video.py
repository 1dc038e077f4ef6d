"""The tiny random LLaVA-NeXT-Video through ``aiolm.Engine`` on CUDA in bfloat16, with the
triton and the hybrid attention backends, against the same checkpoint on the CPU in
float32: the greedy tokens of prompts with a video, and with an image and a video, agree
(up to the first near tie: the weights are drawn large enough that the logits are peaked,
but bfloat16 may still pick the other of two near-equal logits), the repeated prompts are
served from the radix cache, and the engine ends clean."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_gpu_multimodal import assert_same_until_a_near_tie, greedy_completions  # noqa: E402
from test_llava_video import IMAGE, NAME, _hf_model, _save, as_data, clip, random_image  # noqa: E402

from aiolm.engine.model_config import ModelConfig  # noqa: E402
from aiolm.values import VideoData  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.anyio]

PROMPTS = [
    ([1, 17, 18, IMAGE, 40, 41, 42], lambda: [clip(1, frames=6)]),
    ([1, IMAGE, 30, 31, IMAGE, 50, 51], lambda: [random_image(2, (90, 50)), clip(3)]),
]
TOKENS = 8
MARGIN = 0.1


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llava_next_video_gpu")
    _save(_hf_model(seed=99), directory)
    return directory


async def _greedy(directory, **engine_options) -> list[tuple[list[int], int, int, list]]:
    prompts = [(ids, lambda items=items: tuple(it if isinstance(it, VideoData) else as_data(it)
                                               for it in items()))
               for ids, items in PROMPTS]
    return [(list(done.token_ids), done.usage.prompt_tokens, done.usage.cached_tokens,
             done.logprobs)
            for done in await greedy_completions(directory, prompts, TOKENS, **engine_options)]


@pytest.mark.parametrize("backend", ["triton", "hybrid"])
async def test_cuda_bfloat16_tokens_match_cpu_float32(checkpoint, backend):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if backend == "hybrid":
        pytest.importorskip("flashinfer")
        from aiolm.engine.runner import FLASHINFER_HEAD_DIMS

        if ModelConfig.named(NAME).head_dim not in FLASHINFER_HEAD_DIMS:
            pytest.skip("flashinfer has no kernels for this tiny model's head size")
    reference = await _greedy(checkpoint, device="cpu", dtype="float32")
    got = await _greedy(checkpoint, device="cuda", dtype="bfloat16", attention_backend=backend)
    for (tokens, _, _, logprobs), (want, *_) in zip(got, reference, strict=True):
        assert_same_until_a_near_tie(tokens, want, logprobs, MARGIN)
    # The second round's prompts are the first's: all but their last token cached.
    half = len(PROMPTS)
    assert all(cached == prompt - 1 for _, prompt, cached, _ in got[half:])
