"""The tiny random LLaVA (1.5 and NeXT) through ``aiolm.Engine`` on CUDA in bfloat16, with
the triton and the hybrid attention backends, against the same checkpoint on the CPU in
float32: the greedy tokens of prompts with one and two images agree (the weights are drawn
large enough that the logits are peaked, so bfloat16 rounding does not flip an argmax), the
repeated image is served from the radix cache, and the engine ends clean."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_multimodal_parity import FAMILIES, IMAGE, _hf_model, as_data, random_image  # noqa: E402

from aiolm.backends.base import GenerateRequest  # noqa: E402
from aiolm.backends.engine import Engine, LoadedModel  # noqa: E402
from aiolm.engine.loader import load_model  # noqa: E402
from aiolm.engine.model_config import NAMED_CONFIGS  # noqa: E402
from aiolm.sampling import SamplingParams  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.anyio]

PROMPTS = [
    ([1, 17, 18, IMAGE, 40, 41, 42], [(60, 45)]),
    ([1, IMAGE, 30, 31, IMAGE, 50, 51], [(40, 100), (90, 50)]),
]
TOKENS = 8


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    name = request.param
    directory = tmp_path_factory.mktemp(name)
    _hf_model(name, seed=99).save_pretrained(directory, safe_serialization=True)
    cls = type(load_model(name, load_format="dummy")[0])
    cls._default_image_processor(NAMED_CONFIGS[name]).save_pretrained(directory)
    return directory


async def greedy_completions(directory, prompts, tokens, **engine_options) -> list:
    """The checkpoint in ``directory`` (no tokenizer) on ``engine_options``' device and
    dtype through an Engine: each of ``prompts`` (token ids, a function giving its images)
    greedy for ``tokens`` tokens, twice over (the second round hits the cache); the completions, the engine clean
    at the end."""
    out = []
    device = torch.device(engine_options.pop("device"))
    model, config = load_model(directory, dtype=engine_options.pop("dtype"), device=device)
    loaded = LoadedModel(model=model, model_config=config, tokenizer=None, device=device,
                         source=str(directory), load_format="auto")
    async with Engine(loaded, max_total_tokens=4096, **engine_options) as engine:
        for ids, images in prompts * 2:
            out.append(await engine.generate(GenerateRequest(
                input_ids=tuple(ids), images=images(),
                sampling=SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True,
                                        logprobs=True, top_logprobs=2))))
        assert (await engine.check_integrity()).idle
    return out


async def _greedy(directory, **engine_options) -> list[tuple[list[int], int, list]]:
    prompts = [(ids, lambda sizes=sizes: tuple(as_data(random_image(k, s))
                                               for k, s in enumerate(sizes)))
               for ids, sizes in PROMPTS]
    return [(list(done.token_ids), done.usage.cached_tokens, done.logprobs)
            for done in await greedy_completions(directory, prompts, TOKENS, **engine_options)]


def assert_same_until_a_near_tie(tokens, want, logprobs, margin: float = 0.1) -> None:
    """bfloat16 may pick the other of two near-equal logits (a random tiny model has many):
    up to the first such near tie (``logprobs``' top-2 within ``margin``) the greedy
    ``tokens`` must be the reference's ``want``."""
    for i, (a, b) in enumerate(zip(tokens, want, strict=True)):
        if a != b:
            top = {t: lp for t, _, lp in logprobs[i].top}
            assert b in top and abs(top[a] - top[b]) < margin, (i, tokens, want)
            return


@pytest.mark.parametrize("backend", ["triton", "hybrid"])
async def test_cuda_bfloat16_tokens_match_cpu_float32(checkpoint, backend):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if backend == "hybrid":
        pytest.importorskip("flashinfer")
        from aiolm.engine.runner import FLASHINFER_HEAD_DIMS

        name = checkpoint.name.rstrip("0123456789")
        if load_model(name, load_format="dummy")[1].head_dim not in FLASHINFER_HEAD_DIMS:
            pytest.skip("flashinfer has no kernels for this tiny model's head size")
    reference = await _greedy(checkpoint, device="cpu", dtype="float32")
    got = await _greedy(checkpoint, device="cuda", dtype="bfloat16",
                        attention_backend=backend)
    for (tokens, _, logprobs), (want, _, _) in zip(got, reference, strict=True):
        assert_same_until_a_near_tie(tokens, want, logprobs)
    half = len(PROMPTS)
    assert all(cached > 0 for _, cached, _ in got[half:])
