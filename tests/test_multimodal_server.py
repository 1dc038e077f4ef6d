"""``image_url`` parts on ``/v1/chat/completions`` over the tiny random LLaVA, with the real
``openai`` client: data URLs are taken, http(s) URLs refused (400) unless the server fetches
them (``--allow-image-urls``), within its size limit."""

from __future__ import annotations

import base64
import contextlib

import openai
import pytest
from openai_server import running
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
from test_multimodal_engine import png, tiny_llava

from aiolm.backends.engine import Engine
from aiolm.server import create_app
from aiolm.server.images import ImageFetch

pytestmark = pytest.mark.anyio

PICTURE = png(11)
GREEDY = dict(model="tiny-llava", temperature=0, max_tokens=6,
              extra_body={"ignore_eos": True, "return_token_ids": True})


def _served(image_fetch):
    loaded = tiny_llava()
    engine = Engine(loaded, max_total_tokens=2048)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        async with engine:
            yield

    return create_app(engine, model_name="tiny-llava", lifespan=lifespan,
                      image_fetch=image_fetch)


@pytest.fixture(scope="module")
def picture_server():
    """A plain HTTP server with the picture at /cat.png and 64 KiB of zeros at /big.png."""
    async def cat(request):
        return Response(PICTURE.data, media_type="image/png")

    async def big(request):
        return Response(b"\0" * 65536, media_type="image/png")

    app = Starlette(routes=[Route("/cat.png", cat), Route("/big.png", big)])
    with running(app) as url:
        yield url.removesuffix("/v1")


@pytest.fixture(scope="module")
def strict():
    with running(_served(None)) as url:
        yield url


@pytest.fixture(scope="module")
def fetching():
    with running(_served(ImageFetch(max_bytes=32768, timeout=10.0))) as url:
        yield url


def _messages(url: str) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "what is in the picture?"}]}]


DATA_URL = "data:image/png;base64," + base64.b64encode(PICTURE.data).decode()


async def _ask(base: str, url: str):
    async with openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0) as client:
        return await client.chat.completions.create(messages=_messages(url), **GREEDY)


async def test_a_data_url_image_is_answered_and_its_tokens_counted(strict):
    first = await _ask(strict, DATA_URL)
    again = await _ask(strict, DATA_URL)
    assert len(first.choices[0].model_extra["token_ids"]) == 6
    assert first.usage.prompt_tokens > 16   # the image's 16 tokens are in the prompt
    assert again.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens - 1
    assert again.choices[0].model_extra["token_ids"] == first.choices[0].model_extra["token_ids"]


async def test_an_http_image_url_is_refused_without_allow_image_urls(strict, picture_server):
    with pytest.raises(openai.BadRequestError, match="--allow-image-urls"):
        await _ask(strict, picture_server + "/cat.png")


async def test_an_allowed_image_url_is_fetched_and_answers_as_its_data_url(
        fetching, picture_server):
    by_url = await _ask(fetching, picture_server + "/cat.png")
    by_data = await _ask(fetching, DATA_URL)
    assert (by_url.choices[0].model_extra["token_ids"]
            == by_data.choices[0].model_extra["token_ids"])


async def test_an_image_url_over_the_size_limit_is_refused(fetching, picture_server):
    with pytest.raises(openai.BadRequestError, match="over this server's limit"):
        await _ask(fetching, picture_server + "/big.png")


async def test_an_unreadable_image_is_a_bad_request(strict):
    bogus = "data:image/png;base64," + base64.b64encode(b"not a picture").decode()
    with pytest.raises(openai.BadRequestError, match="not a readable image"):
        await _ask(strict, bogus)
