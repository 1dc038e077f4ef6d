"""LLaVA-NeXT-Video against transformers, float32, on a tiny random model.

transformers' ``LlavaNextVideoForConditionalGeneration`` gets random weights (norms and
biases included), is saved with ``save_pretrained`` (with an image processor's and a video
processor's configuration) and loaded through our loader. Videos and images go through our
processor; the same pixel values go to both models. Logits agree within 1e-4 of their
scale for a prefill with a video, with an image and a video, decode steps after a video and
an extend over a cached video prefix; the pooling modes' video features match
``get_video_features``; greedy generation through ``aiolm.Engine`` gives ``generate``'s
tokens, and the radix cache keys a video by its frames.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
np = pytest.importorskip("numpy")

from model_driver import ModelDriver, randomize_weights  # noqa: E402
from test_models_parity import assert_logits_close  # noqa: E402
from test_multimodal_parity import _WithImages, as_data, random_image  # noqa: E402

from aiolm.backends.base import GenerateRequest  # noqa: E402
from aiolm.backends.engine import Engine, LoadedModel  # noqa: E402
from aiolm.engine.loader import load_model  # noqa: E402
from aiolm.engine.model_config import NAMED_CONFIGS, ModelConfig  # noqa: E402
from aiolm.engine.multimodal import MultimodalItem, pass_embeddings, prepare_multimodal  # noqa: E402
from aiolm.engine.request import Req  # noqa: E402
from aiolm.sampling import SamplingParams  # noqa: E402
from aiolm.values import VideoData  # noqa: E402

NAME = "tiny-llava-next-video"
IMAGE, VIDEO = 500, 501   # the tiny config's image and video tokens
SIDE = 56                 # its vision tower's resolution
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _hf_model(seed: int, **overrides):
    cfg = {k: v for k, v in NAMED_CONFIGS[NAME].items()
           if k not in ("architectures", "model_type")}
    config = transformers.LlavaNextVideoConfig(**{**cfg, **overrides})
    for sub in (config, config.text_config, config.vision_config):
        sub._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.LlavaNextVideoForConditionalGeneration(config).eval()
    return randomize_weights(model)


def _save(hf, directory) -> None:
    """The checkpoint, LLaVA-NeXT's image processor configuration, and a video processor
    configuration as transformers' ``LlavaNextVideoVideoProcessor`` writes it."""
    from aiolm.engine.models.llava_video import LlavaNextVideoForConditionalGeneration

    hf.save_pretrained(directory, safe_serialization=True)
    LlavaNextVideoForConditionalGeneration._default_image_processor(
        NAMED_CONFIGS[NAME]).save_pretrained(directory)
    (directory / "video_preprocessor_config.json").write_text(json.dumps({
        "video_processor_type": "LlavaNextVideoVideoProcessor",
        "processor_class": "LlavaNextVideoProcessor", "do_sample_frames": False,
        "do_resize": True, "size": {"shortest_edge": SIDE}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": SIDE, "width": SIDE},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "do_convert_rgb": True,
        "default_to_square": False}))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers model, our model, our config, our processor, directory)."""
    hf = _hf_model(seed=2468)
    directory = tmp_path_factory.mktemp("llava_next_video")
    _save(hf, directory)
    ours, config = load_model(directory, dtype="float32")
    return hf, ours, config, type(ours).build_processor(str(directory)), directory


def clip(seed: int, frames: int = 4, size: tuple[int, int] = (64, 48)) -> VideoData:
    """``frames`` random RGB frames of ``size`` (width, height)."""
    pictures = [random_image(100 * seed + i, size) for i in range(frames)]
    return VideoData(frames=tuple(p.tobytes() for p in pictures), width=size[0],
                     height=size[1])


def _prepare(pair, prompt: list[int], items):
    _, ours, config, processor, _ = pair
    return prepare_multimodal(ours, processor, prompt,
                              [it if isinstance(it, VideoData) else as_data(it) for it in items],
                              vocab_size=config.vocab_size, bos_token_id=1)


def _hf_inputs(ids: list[int], mm) -> dict:
    """transformers' inputs for our prompt: each pad run as image or video tokens, and
    the items' pixels (images' tiles padded to the most tiles, as its processor does)."""
    token = {it.pad_id: IMAGE if it.kind == "image" else VIDEO for it in mm.items}
    inputs = {"input_ids": torch.tensor([[token.get(t, t) for t in ids]])}
    images = [it for it in mm.items if it.kind == "image"]
    videos = [it for it in mm.items if it.kind == "video"]
    if images:
        tiles = max(it.data["pixel_values"].shape[1] for it in images)
        pixels = torch.zeros(len(images), tiles, *images[0].data["pixel_values"].shape[2:])
        for k, it in enumerate(images):
            pixels[k, :it.data["pixel_values"].shape[1]] = it.data["pixel_values"][0]
        inputs["pixel_values"] = pixels
        inputs["image_sizes"] = torch.cat([it.data["image_sizes"] for it in images])
    if videos:
        inputs["pixel_values_videos"] = torch.cat([it.data["pixel_values_videos"]
                                                   for it in videos])
    return inputs


def _reference(hf, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return hf(**inputs).logits[0].float()


def _extend(driver, wrapped, ours, row, req, start, end):
    wrapped.rows = pass_embeddings(ours, [req], [start], [end - start])
    return driver.extend([(row, req.all_ids[start:end])])


ONE = [1, 17, 18, 19, IMAGE, 40, 41, 42, 43, 44, 45]
TWO = [1, 17, IMAGE, 30, 31, 32, IMAGE, 50, 51, 52]


@pytest.mark.parametrize("prompt,items", [
    (ONE, ["video"]),
    (TWO, ["image", "video"]),
    (TWO, ["video", "image"]),
], ids=["video", "image-video", "video-image"])
def test_prefill_with_a_video_matches_transformers(pair, prompt, items):
    hf, ours, config, _, _ = pair
    content = [clip(1, frames=5) if kind == "video" else random_image(2, (90, 50))
               for kind in items]
    ids, mm = _prepare(pair, prompt, content)
    assert [it.kind for it in mm.items] == items
    video = next(it for it in mm.items if it.kind == "video")
    assert video.length == 5 * 4     # 5 frames, each 4 x 4 patches pooled 2 x 2
    wrapped = _WithImages(ours)
    driver = ModelDriver(wrapped, config)
    req = Req(rid="a", input_ids=ids, mm=mm)
    got = _extend(driver, wrapped, ours, driver.new_request(), req, 0, len(ids))
    assert_logits_close(got, _reference(hf, _hf_inputs(ids, mm)))


def test_decode_steps_after_a_video_match_transformers(pair):
    hf, ours, config, _, _ = pair
    ids, mm = _prepare(pair, ONE, [clip(3)])
    wrapped = _WithImages(ours)
    driver = ModelDriver(wrapped, config)
    row = driver.new_request()
    _extend(driver, wrapped, ours, row, Req(rid="a", input_ids=ids, mm=mm), 0, len(ids))
    generated = [70, 71, 72, 73]
    ref = _reference(hf, _hf_inputs(ids + generated, mm))
    steps = [driver.decode([(row, tok)])[0] for tok in generated]
    assert_logits_close(torch.stack(steps), ref[len(ids):])


@pytest.mark.parametrize("cut", [None, 7])   # before the video; inside its run
def test_an_extend_over_a_cached_video_prefix_matches_transformers(pair, cut):
    hf, ours, config, _, _ = pair
    ids, mm = _prepare(pair, ONE, [clip(5)])
    item = mm.items[0]
    shared = item.offset - 1 if cut is None else item.offset + cut
    wrapped = _WithImages(ours)
    driver = ModelDriver(wrapped, config)
    first = driver.new_request()
    _extend(driver, wrapped, ours, first, Req(rid="a", input_ids=ids, mm=mm), 0, len(ids))
    # A second request with the same clip and a different tail reuses the first's K/V.
    other, other_mm = _prepare(pair, ONE[:5] + [90, 91, 92], [clip(5)])
    assert other == ids[:item.end] + [90, 91, 92]
    row = driver.new_request(share_prefix_of=first, prefix_len=shared)
    got = _extend(driver, wrapped, ours, row, Req(rid="b", input_ids=other, mm=other_mm),
                  shared, len(other))
    assert_logits_close(got, _reference(hf, _hf_inputs(other, other_mm))[shared:])


@pytest.mark.parametrize("mode,stride", [("max", 2), ("conv", 2), ("average", 3)])
def test_each_pooling_mode_gives_transformers_video_features(tmp_path, pair, mode, stride):
    """Our loader reads the pooling convolution's weights; a stride that does not divide
    the patch grid drops the last row and column as transformers' pooling does."""
    hf = _hf_model(seed=11, spatial_pool_mode=mode, spatial_pool_stride=stride)
    _save(hf, tmp_path)
    ours, _ = load_model(tmp_path, dtype="float32")
    processor = type(ours).build_processor(str(tmp_path))
    frames = [random_image(30 + i, (50, 70)) for i in range(3)]
    data, n = processor.process_video(frames)
    assert n == 3 * (4 // stride) ** 2
    item = MultimodalItem(kind="video", digest="0" * 64, offset=0, length=n, pad_id=512,
                          data=data)
    with torch.no_grad():
        ref = hf.model.get_video_features(pixel_values_videos=data["pixel_values_videos"])
    ref = ref.pooler_output[0]
    scale = ref.abs().max().item()
    torch.testing.assert_close(ours.embed_multimodal(item), ref, rtol=1e-4, atol=1e-4 * scale)


def test_frames_are_resized_and_cropped_to_the_vision_towers_square(pair):
    *_, processor, _ = pair
    frames = [random_image(40 + i, (112, 70)) for i in range(2)]
    data, n = processor.process_video(frames)
    assert data["pixel_values_videos"].shape == (1, 2, 3, SIDE, SIDE) and n == 8
    # Each frame as CLIP's image processor alone makes it (resize, centre crop, normalize).
    for k, frame in enumerate(frames):
        alone = processor.frame_processor(images=frame, return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(data["pixel_values_videos"][0, k], alone[0])


def test_bad_videos_and_configurations_fail_clearly(pair, tmp_path):
    from aiolm.engine.models.llava_video import LlavaNextVideoForConditionalGeneration as Cls

    _, ours, _, processor, directory = pair
    with pytest.raises(ValueError, match="no frames"):
        processor.process_video([])
    with pytest.raises(ValueError, match="kind"):
        ours.placeholder_ids("audio", 3)
    # A video processor that crops to another size than the tower takes.
    for name in ("config.json", "preprocessor_config.json"):
        (tmp_path / name).write_text((directory / name).read_text())
    options = json.loads((directory / "video_preprocessor_config.json").read_text())
    options["crop_size"] = {"height": 42, "width": 42}
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(options))
    with pytest.raises(ValueError, match="vision tower takes 56 x 56"):
        Cls.build_processor(str(tmp_path)).process_video([random_image(1, (60, 60))])
    base = NAMED_CONFIGS[NAME]
    for bad, match in [({"spatial_pool_mode": "median"}, "spatial_pool_mode"),
                       ({"spatial_pool_stride": 0}, "spatial_pool_stride"),
                       ({"video_token_index": None}, "video_token_index"),
                       ({"spatial_pool_mode": "conv", "spatial_pool_out_channels": 16},
                        "spatial_pool_mode")]:
        with pytest.raises(ValueError, match=match), torch.device("meta"):
            Cls(ModelConfig.from_hf({**base, **bad}))


def test_the_named_configs_load_with_dummy_weights():
    model, config = load_model(NAME, load_format="dummy")
    assert config.architecture == "LlavaNextVideoForConditionalGeneration"
    assert (model.image_token_id, model.video_token_id) == (IMAGE, VIDEO)
    assert model.placeholder_ids("video", 2) == [VIDEO, VIDEO]
    assert model.placeholder_ids("image", 2) == [IMAGE, IMAGE]
    big_config = ModelConfig.named("llava-next-video-7b")
    with torch.device("meta"):   # the 7B geometry builds (no memory)
        big = type(model)(big_config)
    assert big.tokens_per_frame == 144 and big.video_token_id == 32000
    assert sum(p.numel() for p in big.parameters()) > 7e9


async def _engine_run(directory, requests, **options):
    model, config = load_model(directory, dtype="float32")
    loaded = LoadedModel(model=model, model_config=config, tokenizer=None,
                         device=torch.device("cpu"), source=str(directory), load_format="auto")
    async with Engine(loaded, max_total_tokens=4096, **options) as engine:
        assert engine.capabilities.video and engine.capabilities.images
        done = [await engine.generate(r) for r in requests]
        assert (await engine.check_integrity()).idle
    return done


def _request(ids, items, tokens: int = 16) -> GenerateRequest:
    return GenerateRequest(
        input_ids=tuple(ids),
        images=tuple(it if isinstance(it, VideoData) else as_data(it) for it in items),
        sampling=SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))


@pytest.mark.anyio
@pytest.mark.parametrize("prompt,items", [
    (ONE, [clip(7)]),
    (TWO, [random_image(8, (48, 96)), clip(9, frames=3, size=(40, 80))]),
], ids=["video", "image-video"])
async def test_greedy_generation_through_the_engine_matches_generate(pair, prompt, items):
    hf, ours, _, processor, directory = pair
    ids, mm = _prepare(pair, prompt, items)
    inputs = _hf_inputs(ids, mm)
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=16, do_sample=False)
    expected = out[0, len(ids):].tolist()
    # Whole, and in chunks of 8 tokens that cut through the items' runs.
    for options in ({}, {"chunked_prefill_size": 8}):
        (done,) = await _engine_run(directory, [_request(prompt, items)], **options)
        assert list(done.token_ids) == expected, options


@pytest.mark.anyio
async def test_a_repeated_video_hits_the_radix_cache_and_another_misses(pair):
    *_, directory = pair
    head = [1, 17, 18]
    first, again, other = await _engine_run(directory, [
        _request([*head, IMAGE, 40, 41], [clip(10)], tokens=4),
        _request([*head, IMAGE, 60, 61, 62], [clip(10)], tokens=4),
        _request([*head, IMAGE, 40, 41], [clip(11)], tokens=4),
    ])
    video_tokens = 4 * 4
    assert first.usage.prompt_tokens == len(head) + video_tokens + 2
    assert again.usage.cached_tokens >= len(head) + video_tokens
    assert other.usage.cached_tokens <= len(head)


def test_several_items_in_one_vision_call_give_each_ones_embeddings(pair, monkeypatch):
    """LLaVA-NeXT's pictures of different tilings go through the vision tower together
    (``embed_multimodal_many``; a clip in a call of its own), several calls past the tile
    limit; each item's rows are what it gets alone."""
    from aiolm.engine.models import llava

    _, ours, _, _, _ = pair
    _, mm = _prepare(pair, [1, IMAGE, IMAGE, IMAGE, IMAGE, 5],
                     [random_image(50, (90, 50)), clip(2, frames=3), random_image(51, (40, 120)),
                      random_image(52, (64, 64))])
    assert [it.kind for it in mm.items] == ["image", "video", "image", "image"]
    alone = [ours.embed_multimodal(item) for item in mm.items]
    calls = []
    tower = ours.vision_tower.forward

    def counted(pixels, *args, **kwargs):
        calls.append(pixels.shape[0])
        return tower(pixels, *args, **kwargs)

    monkeypatch.setattr(ours.vision_tower, "forward", counted)
    tiles = [ours._tiles(it).shape[0] for it in mm.items if it.kind == "image"]
    assert len(set(tiles)) > 1       # tilings differ: the features are split back by count
    for limit, expected in ((64, [sum(tiles), 3]), (max(tiles), [*tiles, 3])):
        calls.clear()
        monkeypatch.setattr(llava, "VISION_TILES_PER_CALL", limit)
        together = ours.embed_multimodal_many(mm.items)
        assert calls == expected      # tiles (frames for the clip) per vision-tower call
        for a, b in zip(alone, together, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
