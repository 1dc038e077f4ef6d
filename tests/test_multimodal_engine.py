"""Images through ``aiolm.Engine`` on the tiny random LLaVA: the radix cache keyed by image
content, a fork over one image, chunked prefill across an image, the placement rule, and
bad inputs refused before any token with nothing leaked."""

from __future__ import annotations

import io

import pytest

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")

from PIL import Image  # noqa: E402

from aiolm import UnsupportedFeature, assistant, gen, image, program, user  # noqa: E402
from aiolm.backends.base import GenerateRequest  # noqa: E402
from aiolm.backends.engine import Engine, LoadedModel  # noqa: E402
from aiolm.engine.loader import load_model  # noqa: E402
from aiolm.engine.model_config import NAMED_CONFIGS  # noqa: E402
from aiolm.engine.tokenizer import Tokenizer  # noqa: E402
from aiolm.errors import ContextLengthExceeded  # noqa: E402
from aiolm.sampling import SamplingParams  # noqa: E402
from aiolm.values import ImageData  # noqa: E402

pytestmark = pytest.mark.anyio

IMAGE = 3   # "<image>" in the test tokenizer; the model config is told so
TOKENS_PER_IMAGE = 16


def png(seed: int, size: tuple[int, int] = (60, 45)) -> ImageData:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return ImageData(data=buf.getvalue(), mime="image/png")


def image_tokenizer(image_token: str = "<image>") -> Tokenizer:
    """A small byte-level BPE tokenizer whose special token ``image_token`` is id 3."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = RawTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>", image_token],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["what is in the picture? describe it", "USER: ASSISTANT:"] * 20,
                           trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", bos_token="<s>",
                                 additional_special_tokens=[image_token])
    return Tokenizer(hf)


def tiny_llava(image_token: str = "<image>", **changes) -> LoadedModel:
    config = dict(NAMED_CONFIGS["tiny-llava"], image_token_index=IMAGE)
    config["text_config"] = dict(config["text_config"], **changes)
    model, model_config = load_model(config, load_format="dummy")
    return LoadedModel(model=model, model_config=model_config,
                       tokenizer=image_tokenizer(image_token),
                       device=torch.device("cpu"), source="tiny-llava", load_format="dummy")


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return tiny_llava()


@pytest.fixture
def vision_calls(loaded):
    """The digest of each image the vision tower embedded during the test
    (``embed_multimodal_many``'s items, whichever call they came in)."""
    model = loaded.model
    calls: list[str] = []

    def counting(items):
        calls.extend(item.digest for item in items)
        return type(model).embed_multimodal_many(model, items)

    model.embed_multimodal_many = counting
    yield calls
    del model.embed_multimodal_many


GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


async def clean(engine) -> None:
    report = await engine.check_integrity()
    assert report.idle and report.request_slots == report.locked_tokens == 0


def request(ids, *images, **kw) -> GenerateRequest:
    return GenerateRequest(input_ids=tuple(ids), images=images, sampling=GREEDY, **kw)


async def test_a_repeated_image_hits_the_cache_and_a_different_one_misses(loaded):
    text = [1, 40, 41, IMAGE, 50, 51, 52]
    async with Engine(loaded, max_total_tokens=2048) as engine:
        first = await engine.generate(request(text, png(0)))
        again = await engine.generate(request(text, png(0)))
        other = await engine.generate(request(text, png(1)))
        report = await engine.check_integrity()
    prompt_len = len(text) - 1 + TOKENS_PER_IMAGE
    assert first.usage.prompt_tokens == prompt_len
    assert again.usage.cached_tokens == prompt_len - 1
    assert again.token_ids == first.token_ids
    assert other.usage.cached_tokens == 3   # the text before the image, not past it
    assert report.idle


async def test_a_fork_over_one_image_runs_the_vision_tower_once(loaded, vision_calls):
    @program
    async def questions(s, picture):
        s += user(image(picture) + "what is in the picture?")
        async with s.fork(3) as forks:
            forks += lambda i: assistant(gen("answer", max_tokens=4, temperature=0))

    async with Engine(loaded, max_total_tokens=2048) as engine:
        await questions.run(png(2).data, backend=engine)
        assert (await engine.check_integrity()).idle
        cached = engine.statistics().cached_tokens
    assert len(vision_calls) == 1
    assert cached > TOKENS_PER_IMAGE


async def test_a_chunked_prefill_across_an_image_gives_the_same_tokens(loaded):
    ids = [1, 40, IMAGE, 41, 42, IMAGE, 43]
    async with Engine(loaded, max_total_tokens=2048) as engine:
        whole = await engine.generate(request(ids, png(4), png(5)))
    async with Engine(loaded, max_total_tokens=2048, chunked_prefill_size=7) as engine:
        chunked = await engine.generate(request(ids, png(4), png(5)))
        assert (await engine.check_integrity()).idle
    assert chunked.token_ids == whole.token_ids


async def test_images_without_image_tokens_go_first_after_bos(loaded):
    async with Engine(loaded, max_total_tokens=2048) as engine:
        implicit = await engine.generate(request([1, 40, 41], png(6)))
        explicit = await engine.generate(request([1, IMAGE, 40, 41], png(6)))
    assert implicit.token_ids == explicit.token_ids
    assert explicit.usage.cached_tokens == explicit.usage.prompt_tokens - 1


async def test_a_text_prompt_places_the_image_at_its_token(loaded):
    async with Engine(loaded, max_total_tokens=2048) as engine:
        by_text = await engine.generate(GenerateRequest(
            prompt="USER: <image>what is in the picture?", images=(png(7),), sampling=GREEDY))
        ids = engine.tokenizer.encode("USER: <image>what is in the picture?")
        assert ids.count(IMAGE) == 1
        by_ids = await engine.generate(request(ids, png(7)))
    assert by_text.token_ids == by_ids.token_ids


async def test_chats_write_images_as_the_models_own_image_token():
    # Qwen2.5-VL's tokenizer has <|image_pad|>, not <image>: a chat's image must encode to
    # the model's image token id where the user put it, not fall back to "images first".
    import aiolm
    from aiolm._chat_messages import ImagePart, Message, TextPart

    @aiolm.program
    async def ask(s, picture):
        s += aiolm.user("what is in" + aiolm.image(picture) + " the picture?")
        s += aiolm.assistant(aiolm.gen("answer", max_tokens=2, temperature=0))

    loaded = tiny_llava("<|image_pad|>")
    async with Engine(loaded, max_total_tokens=2048) as engine:
        assert engine.chat_template.image_token == "<|image_pad|>"
        picture = png(3)
        turn = Message(role="user", parts=(TextPart(text="what is in"), ImagePart(image=picture),
                                           TextPart(text=" the picture?")))
        ids = engine.tokenizer.encode(engine.chat_template.render([turn], open_role="assistant"))
        assert ids.count(IMAGE) == 1 and ids.index(IMAGE) > 2
        await ask.run(picture.data, backend=engine)
        # The program's prompt put the image where the text did: the same ids hit it whole.
        again = await engine.generate(request(ids, picture))
    assert again.usage.cached_tokens == again.usage.prompt_tokens - 1


async def test_a_whole_chat_template_puts_an_image_where_the_user_put_it():
    """A template used whole (rendered by its Jinja, here Mistral's, which folds a system
    prompt into the first user turn) writes message content as literal text: the image is
    still the model's image token where it stood, and a user's own "<image>" text is not."""
    import warnings

    from chat_templates import MISTRAL_TEMPLATE

    from aiolm._chat_messages import ImagePart, Message, TextPart
    from aiolm._chat_templates import JinjaChatTemplate

    loaded = tiny_llava()
    loaded.tokenizer.hf.chat_template = MISTRAL_TEMPLATE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "used whole" is warned once: not this test's topic
        async with Engine(loaded, max_total_tokens=2048) as engine:
            template = engine.chat_template
            assert isinstance(template, JinjaChatTemplate)
            picture = png(3)
            chat = [Message(role="system", parts=(TextPart(text="Be brief."),)),
                    Message(role="user", parts=(TextPart(text="what is <image> in"),
                                                ImagePart(image=picture),
                                                TextPart(text=" the picture?")))]
            text = template.render(chat, open_role="assistant")
            ids = engine.tokenizer.encode(text)
            assert ids.count(IMAGE) == 1                     # the image, not the user's text
            before = engine.tokenizer.hf.decode(ids[:ids.index(IMAGE)])
            assert before.endswith("Be brief.\n\nwhat is <image> in")   # where it stood
            done = await engine.generate(request(ids, picture))
            assert done.usage.prompt_tokens == len(ids) - 1 + TOKENS_PER_IMAGE
            await clean(engine)


@pytest.fixture
def processor_calls(loaded):
    """The images the engine's processor decoded and resized during the test."""
    calls: list[tuple[int, int]] = []

    def spy(engine):
        from aiolm.engine.multimodal import ProcessedCache, build_processor

        processor = build_processor(loaded)
        process = processor.process_image

        def counting(picture):
            calls.append(picture.size)
            return process(picture)

        processor.process_image = counting
        engine._processor = processor
        engine._processed = ProcessedCache()
        return calls

    return spy


async def test_a_picture_asked_about_again_is_processed_once(loaded, processor_calls):
    """The processor's outputs are kept by content: five questions about one picture and a
    select's three choices after it decode and resize it once; another picture once more."""
    text = [1, 40, IMAGE, 50, 51]
    async with Engine(loaded, max_total_tokens=2048) as engine:
        calls = processor_calls(engine)
        for q in range(5):
            await engine.generate(request([*text, 60 + q], png(0)))
        await engine.score(GenerateRequest(prompt="USER: <image>what is in", images=(png(0),),
                                           sampling=GREEDY), [" it", " a", " the picture"])
        assert len(calls) == 1
        await engine.generate(request(text, png(1)))
        assert len(calls) == 2
        assert engine._processed.hits == 8   # 4 questions, the select's prompt and 3 choices
        await clean(engine)


def test_the_processed_cache_drops_the_least_recently_used():
    from aiolm.engine.multimodal import ProcessedCache

    cache = ProcessedCache(max_items=2, max_bytes=1000)
    tensor = torch.zeros(50)   # 200 bytes
    cache.put(("image", "a", None), {"pixel_values": tensor}, 3)
    cache.put(("image", "b", None), {"pixel_values": tensor}, 3)
    assert cache.get(("image", "a", None))[1] == 3      # a is now the most recent
    cache.put(("image", "c", None), {"pixel_values": tensor}, 3)
    assert cache.get(("image", "b", None)) is None       # b went first
    assert len(cache) == 2
    cache.put(("image", "big", None), {"pixel_values": torch.zeros(300)}, 3)   # 1,200 bytes
    assert cache.get(("image", "big", None)) is None     # over the byte bound: not kept
    cache.put(("image", "d", None), {"pixel_values": torch.zeros(225)}, 3)     # 900 bytes
    assert len(cache) == 1 and cache.get(("image", "d", None)) is not None   # a, c dropped


async def test_select_after_an_image_scores_the_choices_with_that_image(loaded, vision_calls):
    choices = [" it", " the picture", " describe"]
    prefix = GenerateRequest(prompt="USER: <image>what is in", images=(png(7),),
                             sampling=GREEDY)
    async with Engine(loaded, max_total_tokens=2048) as engine:
        first = await engine.score(prefix, choices)
        assert vision_calls == [prefix.images[0].digest]   # once, for every choice
        again = await engine.score(prefix, choices)
        other = await engine.score(GenerateRequest(prompt=prefix.prompt, images=(png(8),),
                                                   sampling=GREEDY), choices)
        await clean(engine)
    assert len(first.token_logprobs) == 3 and all(first.token_logprobs)
    assert again.normalized_logprobs == pytest.approx(first.normalized_logprobs, abs=1e-5)
    assert again.index == first.index
    # The picture is in the context: another one changes what the choices score.
    assert other.normalized_logprobs != pytest.approx(first.normalized_logprobs, abs=1e-4)


async def test_select_after_an_image_on_qwen2_5_vl():
    # M-RoPE positions: the cut prefix and each choice's prompt take their part of the table.
    config = dict(NAMED_CONFIGS["tiny-qwen2.5-vl"], image_token_id=IMAGE)
    model, model_config = load_model(config, load_format="dummy")
    qwen = LoadedModel(model=model, model_config=model_config,
                       tokenizer=image_tokenizer("<|image_pad|>"), device=torch.device("cpu"),
                       source="tiny-qwen2.5-vl", load_format="dummy")
    prefix = GenerateRequest(prompt="USER: <|image_pad|>what is in", images=(png(1),),
                             sampling=GREEDY)
    async with Engine(qwen, max_total_tokens=4096) as engine:
        first = await engine.score(prefix, [" it", " the picture"])
        again = await engine.score(prefix, [" it", " the picture"])
        await clean(engine)
    assert again.normalized_logprobs == pytest.approx(first.normalized_logprobs, abs=1e-5)


async def test_a_program_selects_after_an_image_on_the_engine(loaded):
    import aiolm

    @aiolm.program
    async def ask(s, picture):
        s += aiolm.user(aiolm.image(picture) + "what is in the picture?")
        s += aiolm.assistant(aiolm.select("answer", choices=["it", "the picture"]))

    async with Engine(loaded, max_total_tokens=2048) as engine:
        state = await ask.run(png(3).data, backend=engine)
        await clean(engine)
    assert state["answer"] in ("it", "the picture")


@pytest.mark.parametrize("images,error,match", [
    ((ImageData(data=b"not an image at all"),), ValueError, "images\\[0\\]: not a readable"),
    ((ImageData(url="https://example.com/cat.png"),), ValueError, "does not fetch image URLs"),
    ((png(0), png(1)), ValueError, "1 image token\\(s\\) .* for 2 image"),
])
async def test_bad_images_are_refused_before_any_token(loaded, images, error, match):
    async with Engine(loaded, max_total_tokens=2048) as engine:
        with pytest.raises(error, match=match):
            async with engine.stream(request([1, IMAGE, 40], *images)) as chunks:
                async for _ in chunks:
                    pytest.fail("a token came before the error")
        report = await engine.check_integrity()
        stats = engine.statistics()
    assert report.idle and stats.forward_passes == 0


async def test_too_many_images_for_the_context_are_refused_before_any_token():
    small = tiny_llava(max_position_embeddings=64)
    async with Engine(small, max_total_tokens=1024) as engine:
        with pytest.raises(ContextLengthExceeded):
            await engine.generate(request([1, 40], *(png(k) for k in range(4))))
        assert (await engine.check_integrity()).idle
        assert engine.statistics().forward_passes == 0


async def test_a_text_only_model_refuses_images():
    text_only = LoadedModel.load("tiny-llama", load_format="dummy", device="cpu")
    async with Engine(text_only, max_total_tokens=1024) as engine:
        assert not engine.capabilities.images
        with pytest.raises(UnsupportedFeature, match="does not take images"):
            await engine.generate(request([1, 40], png(0)))
        with pytest.raises(UnsupportedFeature, match="does not take images"):
            await engine.score(request([1, 40], png(0)), ["a", "b"])
        assert (await engine.check_integrity()).idle
        assert engine.statistics().forward_passes == 0


async def test_prompt_logprobs_skip_an_images_placeholders(loaded):
    # The tokens after the picture are scored with it in context (as select scores them);
    # its placeholders are no tokens: None.
    async with Engine(loaded, max_total_tokens=1024) as engine:
        done = await engine.generate(request([1, IMAGE, 40, 41, 42], png(0),
                                             prompt_logprobs=True))
        entries = done.prompt_logprobs
        image_tokens = done.usage.prompt_tokens - 4
        assert len(entries) == done.usage.prompt_tokens
        assert entries[:1 + image_tokens] == (None,) * (1 + image_tokens)
        assert [e.token_id for e in entries[1 + image_tokens:]] == [40, 41, 42]
        scored = await engine.score(request([1, IMAGE, 40], png(0)),
                                    [engine.tokenizer.decode([41, 42])])
        await clean(engine)
    # "FG" encodes back to [41, 42]: the choice's tokens are the prompt's last two.
    assert engine.tokenizer.encode(engine.tokenizer.decode([41, 42])) == [41, 42]
    assert list(scored.token_logprobs[0]) == pytest.approx(
        [e.logprob for e in entries[-2:]], abs=1e-4)



def test_a_pass_embeds_its_pictures_in_one_vision_call(loaded):
    """Four requests about three pictures (one asked twice) in one extend pass: the vision
    tower runs once, over the three (``embed_multimodal_many``), and each request's rows
    are its picture's embeddings as computed alone; a second pass finds them stored."""
    from aiolm.engine.multimodal import build_processor, pass_embeddings, prepare_multimodal
    from aiolm.engine.request import Req

    model = loaded.model
    processor = build_processor(loaded)
    pictures = [png(10), png(11), png(10), png(12)]
    reqs = []
    for i, picture in enumerate(pictures):
        ids, mm = prepare_multimodal(model, processor, [1, IMAGE, 40, 41, 42], [picture],
                                     vocab_size=loaded.model_config.vocab_size)
        reqs.append(Req(rid=str(i), input_ids=ids, mm=mm))
    calls = []
    many = type(model).embed_multimodal_many

    def counted(items):
        calls.append([item.digest for item in items])
        return many(model, items)

    model.embed_multimodal_many = counted
    try:
        half = [r.mm.items[0].offset + 3 for r in reqs]          # into each picture's run
        embeds, rows = pass_embeddings(model, reqs, [0] * 4, half)
        assert calls == [[pictures[0].digest, pictures[1].digest, pictures[3].digest]]
        rest = [len(r.all_ids) - h for r, h in zip(reqs, half, strict=True)]
        embeds2, rows2 = pass_embeddings(model, reqs, half, rest)
        assert len(calls) == 1                  # the rest of each run: from the stores
    finally:
        del model.embed_multimodal_many
    first, expected_rows = 0, []
    for req, h in zip(reqs, half, strict=True):
        item = req.mm.items[0]
        expected_rows += range(first + item.offset, first + h)
        alone = model.embed_multimodal(item)
        torch.testing.assert_close(embeds[(rows >= first) & (rows < first + h)], alone[:3])
        first += h
    assert rows.tolist() == expected_rows
    assert all(not r.mm._embeddings for r in reqs)   # dropped once the runs were covered
    assert embeds2.shape[0] == rows2.shape[0] == sum(r.mm.items[0].length - 3 for r in reqs)
