"""Qwen2.5-VL on a GPU: the tiny random model in bfloat16 on CUDA gives the float32 CPU
engine's greedy tokens, for a prompt with an image and one with a video.

The weights are transformers' random ones saved to a directory (large logits, so the
greedy choice is rarely a near tie). Tolerance as in ``test_gpu_engine.py``: a divergence
is accepted only where the float32 reference's logprob margin between its token and the
GPU's is under 0.1 nats (bfloat16 activations); comparison of that prompt stops there.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
anyio = pytest.importorskip("anyio")
pytest.importorskip("transformers")

from test_qwen2_5_vl import IMAGE, _hf_model, _image, _png, _tokens  # noqa: E402

pytestmark = pytest.mark.gpu

MARGIN = 0.1
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    import transformers

    path = tmp_path_factory.mktemp("qwen2_5_vl_gpu")
    _hf_model(seed=7).save_pretrained(path, safe_serialization=True)
    transformers.Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=64 * 28 * 28
                                       ).save_pretrained(path)
    return str(path)


def _items():
    from aiolm.values import ImageData, VideoData

    frames = [_image(84, 56, 70 + i) for i in range(4)]
    return {
        "image": ImageData(data=_png(_image(112, 84, 5)), mime="image/png"),
        "video": VideoData(frames=tuple(f.tobytes() for f in frames), width=84, height=56,
                           fps=2.0),
    }


def _generate(directory: str, device: str, dtype: str):
    from aiolm.backends.base import GenerateRequest
    from aiolm.backends.engine import Engine
    from aiolm.sampling import SamplingParams

    sampling = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True,
                              logprobs=True, top_logprobs=5)

    async def main():
        out = {}
        async with Engine(directory, device=device, dtype=dtype, max_total_tokens=8192) as engine:
            for kind, item in _items().items():
                ids = (*_tokens(3, 1), IMAGE, *_tokens(5, 2))
                out[kind] = await engine.generate(GenerateRequest(
                    input_ids=ids, images=(item,), sampling=sampling))
        return out

    return anyio.run(main)


def test_cuda_bfloat16_gives_the_cpu_float32_greedy_tokens(directory):
    reference = _generate(directory, "cpu", "float32")
    gpu = _generate(directory, "cuda", "bfloat16")
    for kind, ref in reference.items():
        got = gpu[kind]
        assert len(got.token_ids) == NEW_TOKENS
        for i, (a, b) in enumerate(zip(ref.token_ids, got.token_ids, strict=True)):
            if a == b:
                continue
            top = {tid: lp for tid, _text, lp in ref.logprobs[i].top}
            assert i > 0, f"{kind}: the first token differs ({a} vs {b})"
            assert b in top and top[a] - top[b] <= MARGIN, (
                f"{kind}: token {i} diverged ({a} vs {b}), reference margin "
                f"{top[a] - top.get(b, float('-inf')):.3g} nats")
            break
