"""LLaVA-1.5 and LLaVA-NeXT against transformers, float32, on tiny random models.

Each transformers model gets random weights, is saved with ``save_pretrained`` (with its
image processor's config) and loaded through our loader. Our logits must agree within 1e-4
relative to the logits' scale for a prefill with one image and with two, decode steps after
it, and an extend whose prefix (up into the image) comes from another request's KV; greedy
generation through ``aiolm.Engine`` must give ``generate``'s 16 tokens.
"""

from __future__ import annotations

import io

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
np = pytest.importorskip("numpy")

from model_driver import ModelDriver, randomize_weights  # noqa: E402
from PIL import Image  # noqa: E402
from test_models_parity import assert_logits_close  # noqa: E402

from aiolm.backends.base import GenerateRequest  # noqa: E402
from aiolm.backends.engine import Engine, LoadedModel  # noqa: E402
from aiolm.engine.loader import load_model  # noqa: E402
from aiolm.engine.model_config import NAMED_CONFIGS  # noqa: E402
from aiolm.engine.multimodal import pass_embeddings, prepare_multimodal  # noqa: E402
from aiolm.engine.request import Req  # noqa: E402
from aiolm.sampling import SamplingParams  # noqa: E402
from aiolm.values import ImageData  # noqa: E402

FAMILIES = ["tiny-llava", "tiny-llava-next"]
IMAGE = 500   # the tiny configs' image token


def random_image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def as_data(image: Image.Image) -> ImageData:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return ImageData(data=buf.getvalue(), mime="image/png")


def _hf_model(name: str, seed: int):
    cfg = dict(NAMED_CONFIGS[name])
    arch = cfg.pop("architectures")[0]
    cls = getattr(transformers, arch)
    config_cls = transformers.LlavaNextConfig if "Next" in arch else transformers.LlavaConfig
    cfg.pop("model_type")
    config = config_cls(**cfg)
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).eval()
    return randomize_weights(model)


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    """(name, transformers model, our model, our config, our processor, directory)."""
    name = request.param
    hf = _hf_model(name, seed=4321)
    directory = tmp_path_factory.mktemp(name)
    hf.save_pretrained(directory, safe_serialization=True)
    ours_cls = load_model(name, load_format="dummy")[0].__class__
    ours_cls._default_image_processor(NAMED_CONFIGS[name]).save_pretrained(directory)
    ours, config = load_model(directory, dtype="float32")
    processor = type(ours).build_processor(str(directory))
    return name, hf, ours, config, processor, directory


class _WithImages(torch.nn.Module):
    """The model with the next pass's image rows handed in (ModelDriver builds the batch)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.rows = None

    def set_attention(self, backend):
        self.inner.set_attention(backend)

    def forward(self, batch):
        if self.rows is not None:
            batch.mm_embeds, batch.mm_rows = self.rows
            self.rows = None
        return self.inner(batch)


def _prepare(pair, prompt: list[int], images):
    _, _, ours, config, processor, _ = pair
    return prepare_multimodal(ours, processor, prompt, [as_data(i) for i in images],
                              vocab_size=config.vocab_size, bos_token_id=1)


def _hf_inputs(pair, ids: list[int], mm) -> dict:
    """transformers' inputs for our prompt: the pad runs as image tokens, the pixels."""
    name = pair[0]
    pads = {it.pad_id for it in mm.items}
    hf_ids = [IMAGE if t in pads else t for t in ids]
    inputs = {"input_ids": torch.tensor([hf_ids])}
    if "next" in name:
        tiles = max(it.data["pixel_values"].shape[1] for it in mm.items)
        pixels = torch.zeros(len(mm.items), tiles, *mm.items[0].data["pixel_values"].shape[2:])
        for k, it in enumerate(mm.items):
            pixels[k, :it.data["pixel_values"].shape[1]] = it.data["pixel_values"][0]
        inputs["pixel_values"] = pixels
        inputs["image_sizes"] = torch.cat([it.data["image_sizes"] for it in mm.items])
    else:
        inputs["pixel_values"] = torch.cat([it.data["pixel_values"] for it in mm.items])
    return inputs


def _reference(hf, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return hf(**inputs).logits[0].float()


def _extend(driver, wrapped, ours, row, req, start, end):
    rows = pass_embeddings(ours, [req], [start], [end - start])
    wrapped.rows = rows
    return driver.extend([(row, req.all_ids[start:end])])


PROMPT = [1, 17, 18, 19, IMAGE, 40, 41, 42, 43, 44, 45]
TWO = [1, 17, IMAGE, 30, 31, 32, IMAGE, 50, 51, 52]


@pytest.mark.parametrize("prompt,sizes", [(PROMPT, [(60, 45)]), (TWO, [(40, 100), (90, 50)])])
def test_prefill_with_images_matches_transformers(pair, prompt, sizes):
    _, hf, ours, config, _, _ = pair
    images = [random_image(k, s) for k, s in enumerate(sizes)]
    ids, mm = _prepare(pair, prompt, images)
    assert len(mm.items) == len(images)
    wrapped = _WithImages(ours)
    driver = ModelDriver(wrapped, config)
    req = Req(rid="a", input_ids=ids, mm=mm)
    got = _extend(driver, wrapped, ours, driver.new_request(), req, 0, len(ids))
    assert_logits_close(got, _reference(hf, _hf_inputs(pair, ids, mm)))


def test_decode_steps_after_an_image_match_transformers(pair):
    _, hf, ours, config, _, _ = pair
    ids, mm = _prepare(pair, PROMPT, [random_image(3, (70, 40))])
    wrapped = _WithImages(ours)
    driver = ModelDriver(wrapped, config)
    row = driver.new_request()
    req = Req(rid="a", input_ids=ids, mm=mm)
    _extend(driver, wrapped, ours, row, req, 0, len(ids))
    generated = [70, 71, 72, 73]
    for k, tok in enumerate(generated):
        got = driver.decode([(row, tok)])[0]
        inputs = _hf_inputs(pair, ids + generated[:k + 1], mm)
        assert_logits_close(got, _reference(hf, inputs)[-1])


@pytest.mark.parametrize("cut", [2, 9])   # before the image; inside its run
def test_an_extend_over_a_cached_image_prefix_matches_transformers(pair, cut):
    _, hf, ours, config, _, _ = pair
    ids, mm = _prepare(pair, PROMPT, [random_image(5, (50, 80))])
    item = mm.items[0]
    shared = item.offset + cut if cut < item.length else item.offset - 1
    wrapped = _WithImages(ours)
    driver = ModelDriver(wrapped, config)
    first = driver.new_request()
    _extend(driver, wrapped, ours, first, Req(rid="a", input_ids=ids, mm=mm), 0, len(ids))
    # A second request with the same image and a different tail reuses the first's K/V.
    other_ids = ids[:item.end] + [90, 91, 92]
    other, other_mm = _prepare(pair, PROMPT[:5] + [90, 91, 92], [random_image(5, (50, 80))])
    assert other == other_ids
    row = driver.new_request(share_prefix_of=first, prefix_len=shared)
    req = Req(rid="b", input_ids=other, mm=other_mm)
    got = _extend(driver, wrapped, ours, row, req, shared, len(other))
    ref = _reference(hf, _hf_inputs(pair, other, other_mm))[shared:]
    assert_logits_close(got, ref)


@pytest.mark.anyio
async def test_greedy_generation_through_the_engine_matches_generate(pair):
    _, hf, _, _, _, directory = pair
    images = [random_image(7, (64, 48)), random_image(8, (48, 96))]
    model, config = load_model(directory, dtype="float32")
    loaded = LoadedModel(model=model, model_config=config, tokenizer=None,
                         device=torch.device("cpu"), source=str(directory), load_format="auto")
    async with Engine(loaded, max_total_tokens=4096) as engine:
        request = GenerateRequest(
            input_ids=tuple(TWO), images=tuple(as_data(i) for i in images),
            sampling=SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
        done = await engine.generate(request)
        ids, mm = prepare_multimodal(loaded.model, engine._processor, TWO,
                                     [as_data(i) for i in images],
                                     vocab_size=loaded.model_config.vocab_size)
        await engine.check_integrity()
    inputs = _hf_inputs(pair, ids, mm)
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=16, do_sample=False)
    assert list(done.token_ids) == out[0, len(ids):].tolist()
