"""http(s) image URLs in chat requests: refused, or fetched (``aiolm serve --allow-image-urls``).

A chat message's ``image_url`` part is a base64 ``data:`` URL (always taken: the image is in
the request) or an http(s) URL. The server fetches nothing unless it was started with
``--allow-image-urls`` (``create_app(image_fetch=ImageFetch(...))``): a request with a URL
is a 400 saying so. With it, each URL is fetched with httpx (no redirects to other schemes,
at most ``max_bytes`` read, the whole fetch within ``timeout`` seconds) before the request
reaches the backend, which then sees the image's bytes; a failed fetch is a 400 naming the
URL and why.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import attrs

from ..values import ImageData
from .errors import ApiError, bad

if TYPE_CHECKING:
    from ..backends.base import GenerateRequest

__all__ = ["ImageFetch", "resolve_image_urls"]


@attrs.frozen(kw_only=True)
class ImageFetch:
    """How the server fetches image URLs: at most ``max_bytes`` per image, ``timeout``
    seconds per image."""

    max_bytes: int = 20 * 1024 * 1024
    timeout: float = 10.0

    def __attrs_post_init__(self) -> None:
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int) \
                or self.max_bytes < 1:
            raise ValueError(f"max_bytes: expected a positive int, got {self.max_bytes!r}")
        if not isinstance(self.timeout, int | float) or self.timeout <= 0:
            raise ValueError(f"timeout: expected a positive number of seconds, got "
                             f"{self.timeout!r}")


def _has_url(request: GenerateRequest) -> bool:
    return any(img.data is None for img in request.images) or any(
        img.data is None for m in request.messages or () for img in m.images)


async def resolve_image_urls(job: Any, fetch: ImageFetch | None, param: str) -> Any:
    """``job`` (a parsed request: ``requests``, or a score job's ``prefix``) with every
    http(s) image fetched into bytes; ``job`` itself when it has none. Raises the 400
    :class:`ApiError` for a URL when ``fetch`` is None, and for a fetch that fails."""
    requests = getattr(job, "requests", None)
    single = requests is None
    reqs = (job.prefix,) if single else requests
    if not any(_has_url(r) for r in reqs):
        return job
    if fetch is None:
        raise bad(param, "image_url: this server does not fetch http(s) image URLs; send the "
                         "image as a base64 data: URL, or start the server with "
                         "`aiolm serve --allow-image-urls`")
    import httpx

    cache: dict[str, ImageData] = {}
    async with httpx.AsyncClient(follow_redirects=True, max_redirects=3) as client:
        fetched = [await _fetched(r, client, fetch, cache, param) for r in reqs]
    if single:
        return attrs.evolve(job, prefix=fetched[0])
    return attrs.evolve(job, requests=tuple(fetched))


async def _fetched(request: GenerateRequest, client: Any, fetch: ImageFetch,
                   cache: dict[str, ImageData], param: str) -> GenerateRequest:
    async def load(img: ImageData) -> ImageData:
        if img.data is not None or img.url is None:
            return img
        if img.url not in cache:
            cache[img.url] = await _get(client, img.url, fetch, param)
        return cache[img.url]

    images = tuple([await load(img) for img in request.images])
    messages = request.messages
    if messages is not None:
        from ..chat import ImagePart

        new = []
        for m in messages:
            parts = tuple([ImagePart(image=await load(p.image)) if isinstance(p, ImagePart)
                           else p for p in m.parts])
            new.append(attrs.evolve(m, parts=parts))
        messages = tuple(new)
    return attrs.evolve(request, images=images, messages=messages)


async def _get(client: Any, url: str, fetch: ImageFetch, param: str) -> ImageData:
    import httpx

    from .._program.images import sniff_mime

    chunks: list[bytes] = []
    size = 0
    try:
        with anyio.fail_after(fetch.timeout):
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise bad(param, f"image_url: fetching {url!r} gave HTTP "
                                     f"{response.status_code}")
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > fetch.max_bytes:
                        raise bad(param, f"image_url: {url!r} is over this server's limit of "
                                         f"{fetch.max_bytes} bytes per image")
                    chunks.append(chunk)
                mime = response.headers.get("content-type", "").split(";")[0].strip()
    except TimeoutError:
        raise bad(param, f"image_url: fetching {url!r} took over {fetch.timeout:g} s") from None
    except ApiError:
        raise
    except httpx.HTTPError as exc:
        raise bad(param, f"image_url: could not fetch {url!r}: {exc}") from None
    data = b"".join(chunks)
    if not mime.startswith("image/"):
        mime = sniff_mime(data)
    return ImageData(data=data, mime=mime)
