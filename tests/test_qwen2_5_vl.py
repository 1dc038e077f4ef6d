"""Our Qwen2.5-VL against transformers, float32 on the CPU, on a tiny random model.

The transformers model gets random weights (norms and biases included, vision tower too),
is saved with ``save_pretrained`` and loaded by our loader. Images and videos go through
our processor; the same pixel values go to both models. Logits must agree within 1e-4 of
their scale for prefill with one and two images and with a video, decode steps (M-RoPE
positions past the prompt), and an extend over a cached image; greedy generation must give
``generate``'s tokens.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")

from model_driver import ModelDriver, randomize_weights  # noqa: E402

from aiolm.engine.loader import load_model  # noqa: E402
from aiolm.engine.model_config import NAMED_CONFIGS, ModelConfig  # noqa: E402
from aiolm.engine.multimodal import MultimodalItem, pad_id  # noqa: E402

CONFIG = NAMED_CONFIGS["tiny-qwen2.5-vl"]
IMAGE, VIDEO = CONFIG["image_token_id"], CONFIG["video_token_id"]


def _hf_model(seed: int):
    cfg = {k: v for k, v in CONFIG.items() if k not in ("architectures", "model_type")}
    config = transformers.Qwen2_5_VLConfig(**cfg)
    torch.manual_seed(seed)
    model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(
        config, attn_implementation="eager", dtype=torch.float32).eval()
    return randomize_weights(model)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers model, our model, our config, our processor) with the same weights."""
    hf = _hf_model(seed=1234)
    directory = tmp_path_factory.mktemp("qwen2_5_vl")
    hf.save_pretrained(directory, safe_serialization=True)
    # Small pixel bounds (images and, with no video config of their own, video frames).
    transformers.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=64 * 28 * 28
                                          ).save_pretrained(directory)
    ours, config = load_model(directory, dtype="float32")
    return hf, ours, config, ours.build_processor(str(directory))


def _image(w: int, h: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8)
    return PIL.fromarray(pixels.numpy())


def _tokens(n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (n,), generator=gen).tolist()


class _Prompt:
    """A prompt of text and items, as the engine lays it out and as transformers takes it."""

    def __init__(self, model, processor) -> None:
        self.model, self.processor = model, processor
        self.ours: list[int] = []     # pad ids over the item runs
        self.hf: list[int] = []       # the image / video token over them
        self.types: list[int] = []    # transformers' mm_token_type_ids
        self.items: list[MultimodalItem] = []
        self.hf_inputs: dict[str, list[torch.Tensor]] = {}

    def text(self, ids: list[int]) -> _Prompt:
        self.ours += ids
        self.hf += ids
        self.types += [0] * len(ids)
        return self

    def add(self, kind: str, content, digest: str) -> _Prompt:
        if kind == "image":
            data, n = self.processor.process_image(content)
        else:
            data, n = self.processor.process_video(content, fps=2.0)
        run = self.model.placeholder_ids(kind, n)
        token = IMAGE if kind == "image" else VIDEO
        pid = pad_id(digest, self.model.config.vocab_size)
        offset = len(self.ours) + 1
        self.items.append(MultimodalItem(kind=kind, digest=digest, offset=offset, length=n,
                                         pad_id=pid, data=data))
        self.ours += [pid if t == token else t for t in run]
        self.hf += run
        self.types += [0] + [1 if kind == "image" else 2] * n + [0]
        for key, value in data.items():
            self.hf_inputs.setdefault(key, []).append(value)
        return self

    def hf_kwargs(self, extra: list[int] = ()) -> dict:
        out = {k: torch.cat(v) for k, v in self.hf_inputs.items()}
        out["input_ids"] = torch.tensor([self.hf + list(extra)])
        out["mm_token_type_ids"] = torch.tensor([self.types + [0] * len(extra)])
        return out

    def mm_fields(self, start: int = 0, stop: int | None = None) -> dict:
        """ForwardBatch fields of a pass over prompt tokens ``start:stop``."""
        stop = len(self.ours) if stop is None else stop
        positions, _ = self.model.mrope_positions(self.ours, self.items)
        rows, embeds = [], []
        for item in self.items:
            a, b = max(item.offset, start), min(item.offset + item.length, stop)
            if a < b:
                emb = self.model.embed_multimodal(item)
                embeds.append(emb[a - item.offset:b - item.offset])
                rows.append(torch.arange(a - start, b - start))
        fields = {"mrope_positions": positions[:, start:stop]}
        if rows:
            fields.update(mm_embeds=torch.cat(embeds), mm_rows=torch.cat(rows))
        return fields

    @property
    def rope_delta(self) -> int:
        return self.model.mrope_positions(self.ours, self.items)[1]


class MMDriver(ModelDriver):
    """:class:`ModelDriver` whose next pass carries multimodal fields, and whose decode
    positions are shifted by each request's rope delta."""

    def __init__(self, model, config) -> None:
        super().__init__(model, config)
        self._inner = model
        self.model = self._forward
        self.fields: dict = {}
        self.deltas: dict[int, int] = {}

    def _forward(self, batch):
        for key, value in self.fields.items():
            setattr(batch, key, value)
        self.fields = {}
        if batch.is_decode:
            rows = batch.req_pool_indices.tolist()
            batch.positions = batch.positions + torch.tensor([self.deltas.get(r, 0) for r in rows])
        return self._inner(batch)

    def prefill(self, row: int, prompt: _Prompt, start: int = 0) -> torch.Tensor:
        self.fields = prompt.mm_fields(start)
        self.deltas[row] = prompt.rope_delta
        return self.extend([(row, prompt.ours[start:])])


def _reference(hf, prompt: _Prompt, extra: list[int] = ()) -> torch.Tensor:
    with torch.no_grad():
        return hf(**prompt.hf_kwargs(extra)).logits[0].float()


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    assert scale > 1.0  # the random weights give logits of a meaningful size
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * scale)


def _one_image(pair) -> _Prompt:
    _, ours, _, proc = pair
    return (_Prompt(ours, proc).text(_tokens(5, 1)).add("image", _image(84, 112, 1), "a" * 64)
            .text(_tokens(7, 2)))


def test_prefill_with_one_image_matches_transformers(pair):
    hf, ours, config, _ = pair
    prompt = _one_image(pair)
    assert prompt.items[0].length == 12  # 112x84 -> 8x6 patches -> 4x3 tokens
    driver = MMDriver(ours, config)
    logits = driver.prefill(driver.new_request(), prompt)
    assert_logits_close(logits, _reference(hf, prompt))


def test_prefill_with_two_images_matches_transformers(pair):
    hf, ours, config, proc = pair
    prompt = (_Prompt(ours, proc).text(_tokens(4, 3)).add("image", _image(56, 56, 2), "b" * 64)
              .text(_tokens(3, 4)).add("image", _image(168, 112, 3), "c" * 64)
              .text(_tokens(6, 5)))
    driver = MMDriver(ours, config)
    logits = driver.prefill(driver.new_request(), prompt)
    assert_logits_close(logits, _reference(hf, prompt))


def test_prefill_with_a_video_matches_transformers(pair):
    hf, ours, config, proc = pair
    frames = [_image(84, 56, 10 + i) for i in range(5)]  # 5 frames: the last one repeated
    prompt = (_Prompt(ours, proc).text(_tokens(4, 6)).add("video", frames, "d" * 64)
              .text(_tokens(5, 7)))
    assert prompt.items[0].data["video_grid_thw"].tolist() == [[3, 4, 6]]
    driver = MMDriver(ours, config)
    logits = driver.prefill(driver.new_request(), prompt)
    assert_logits_close(logits, _reference(hf, prompt))


def test_decode_steps_past_an_image_match_transformers(pair):
    hf, ours, config, _ = pair
    prompt = _one_image(pair)
    assert prompt.rope_delta < 0  # the image's 12 tokens take 4 positions
    extra = _tokens(6, 8)
    ref = _reference(hf, prompt, extra)
    driver = MMDriver(ours, config)
    row = driver.new_request()
    driver.prefill(row, prompt)
    steps = [driver.decode([(row, tok)])[0] for tok in extra]
    assert_logits_close(torch.stack(steps), ref[len(prompt.ours):])


def test_extend_over_a_cached_image_matches_transformers(pair):
    hf, ours, config, _ = pair
    prompt = _one_image(pair)
    cached = prompt.items[0].offset + prompt.items[0].length + 1   # text, image, its end mark
    driver = MMDriver(ours, config)
    first = driver.new_request()
    driver.prefill(first, prompt)
    second = driver.new_request(share_prefix_of=first, prefix_len=cached)
    logits = driver.prefill(second, prompt, start=cached)
    assert_logits_close(logits, _reference(hf, prompt)[cached:])


def test_chunked_prefill_through_an_image_matches_transformers(pair):
    hf, ours, config, _ = pair
    prompt = _one_image(pair)
    split = prompt.items[0].offset + 5   # inside the image's run
    driver = MMDriver(ours, config)
    row = driver.new_request()
    driver.fields = prompt.mm_fields(0, split)
    head = driver.extend([(row, prompt.ours[:split])])
    driver.fields = prompt.mm_fields(split)
    tail = driver.extend([(row, prompt.ours[split:])])
    assert_logits_close(torch.cat([head, tail]), _reference(hf, prompt))


@pytest.mark.parametrize("kind", ["image", "video"])
def test_greedy_generation_matches_transformers_generate(pair, kind):
    hf, ours, config, proc = pair
    prompt = _Prompt(ours, proc).text(_tokens(3, 9))
    if kind == "image":
        prompt.add("image", _image(112, 84, 20), "e" * 64)
    else:
        prompt.add("video", [_image(56, 56, 30 + i) for i in range(4)], "f" * 64)
    prompt.text(_tokens(4, 10))
    kwargs = prompt.hf_kwargs()
    with torch.no_grad():
        out = hf.generate(**kwargs, do_sample=False, max_new_tokens=16,
                          attention_mask=torch.ones_like(kwargs["input_ids"]))
    expected = out[0, len(prompt.ours):].tolist()
    driver = MMDriver(ours, config)
    row = driver.new_request()
    tokens = [int(driver.prefill(row, prompt)[-1].argmax())]
    while len(tokens) < 16:
        tokens.append(int(driver.decode([(row, tokens[-1])])[0].argmax()))
    assert tokens == expected


def test_a_still_clip_is_laid_out_as_its_image(pair):
    """The video layout (temporal_patch_size consecutive frames per patch) against the
    image processor's (one frame repeated over the patch's frames): a clip of one frame
    repeated gives the image's patches, once per frame pair."""
    *_, proc = pair
    still = _image(84, 56, 40)
    image, n = proc.process_image(still)
    video, m = proc.process_video([still] * 4)
    assert m == 2 * n
    assert video["video_grid_thw"].tolist() == [[2, *image["image_grid_thw"][0, 1:].tolist()]]
    torch.testing.assert_close(video["pixel_values_videos"],
                               torch.cat([image["pixel_values"]] * 2))


def test_the_named_configs_load_with_dummy_weights():
    model, config = load_model("tiny-qwen2.5-vl", load_format="dummy")
    assert config.architecture == "Qwen2_5_VLForConditionalGeneration"
    assert model.placeholder_ids("video", 2) == [502, 501, 501, 503]
    with torch.device("meta"):   # the 7B geometry builds (no memory)
        big = type(model)(ModelConfig.named("qwen2.5-vl-7b"))
    assert sum(p.numel() for p in big.parameters()) > 8e9


def _png(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["image", "video"])
def test_the_engine_generates_transformers_tokens_and_reuses_the_cached_item(pair, tmp_path_factory,
                                                                            kind):
    """Through ``aiolm.Engine``: greedy tokens == ``generate`` (M-RoPE positions and the
    rope delta applied by the engine), and a second request with the same item and new
    text after it hits the radix cache over the item."""
    import anyio

    from aiolm.backends.base import GenerateRequest
    from aiolm.backends.engine import Engine
    from aiolm.sampling import SamplingParams
    from aiolm.values import ImageData, VideoData

    hf, ours, _, proc = pair
    directory = tmp_path_factory.getbasetemp() / "qwen2_5_vl0"
    head, tail = _tokens(3, 11), _tokens(4, 12)
    if kind == "image":
        content = _image(112, 84, 50)
        item = ImageData(data=_png(content), mime="image/png")
        prompt = _Prompt(ours, proc).text(head).add("image", content, item.digest)
    else:
        frames = [_image(56, 84, 60 + i) for i in range(4)]
        item = VideoData(frames=tuple(f.tobytes() for f in frames), width=56, height=84, fps=2.0)
        prompt = _Prompt(ours, proc).text(head).add("video", frames, item.digest)
    prompt.text(tail)
    kwargs = prompt.hf_kwargs()
    with torch.no_grad():
        out = hf.generate(**kwargs, do_sample=False, max_new_tokens=12,
                          attention_mask=torch.ones_like(kwargs["input_ids"]))
    expected = out[0, len(prompt.ours):].tolist()
    mark = IMAGE  # the engine's marker for where a visual item goes

    async def main():
        async with Engine(str(directory), device="cpu", dtype="float32") as engine:
            sampling = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
            first = await engine.generate(GenerateRequest(
                input_ids=(*head, mark, *tail), images=(item,), sampling=sampling))
            second = await engine.generate(GenerateRequest(
                input_ids=(*head, mark, *_tokens(4, 13)), images=(item,), sampling=sampling))
            return first, second

    first, second = anyio.run(main)
    assert list(first.token_ids) == expected
    assert second.usage.cached_tokens >= len(head) + prompt.items[0].length + 2


def _item_grid(item) -> torch.Tensor:
    return item.data["image_grid_thw" if item.kind == "image" else "video_grid_thw"].reshape(3)


def test_several_items_in_one_vision_call_give_each_ones_embeddings(pair, monkeypatch):
    """The engine embeds a pass's items together (``embed_multimodal_many``): pictures of
    different sizes and a clip in one vision-tower call, and — past the patch limit — in
    several; each item's rows are what it gets alone."""
    from aiolm.engine.models import qwen2_5_vl

    _, ours, _, proc = pair
    frames = [_image(56, 56, 40 + i) for i in range(3)]
    prompt = (_Prompt(ours, proc).add("image", _image(56, 56, 2), "b" * 64)
              .add("image", _image(168, 112, 3), "c" * 64).add("video", frames, "d" * 64)
              .add("image", _image(112, 84, 4), "e" * 64))
    alone = [ours.embed_multimodal(item) for item in prompt.items]
    calls = []
    visual = ours.visual.forward

    def counted(pixels, grid):
        calls.append(grid.shape[0])
        return visual(pixels, grid)

    monkeypatch.setattr(ours.visual, "forward", counted)
    patches = [int(_item_grid(item).prod()) for item in prompt.items]
    assert patches == [16, 96, 32, 48]       # 56x56, 168x112, two 56x56 frames, 112x84
    for limit, expected in ((2**15, [4]), (100, [1, 1, 2])):
        calls.clear()
        monkeypatch.setattr(qwen2_5_vl, "VISION_PATCHES_PER_CALL", limit)
        together = ours.embed_multimodal_many(prompt.items)
        assert calls == expected      # items per vision-tower call
        for a, b in zip(alone, together, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
