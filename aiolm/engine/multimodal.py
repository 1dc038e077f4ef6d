"""Images in the engine: the multimodal contract's types, image decoding, the preparation
of a multimodal prompt, and the rows a pass overwrites with an item's embeddings.

A multimodal request's prompt holds, for each item (an image; a video for models that take
one), a run of ``length`` *pad ids* where the model's embeddings of the item go. A pad id is
``vocab_size + (int(digest[:15], 16) % 2**30)``: never a real token, the same for the same
content and (but for a 2**-30 collision) different for a different one, so the radix cache
keys an image's KV by its content: a repeated image hits, a different image behind the same
text misses. The model never embeds a pad id: the runner overwrites those rows
(:func:`pass_embeddings`).

Where the images go in a prompt (the rule): each occurrence of the model's image token id
(``model.image_token_id``: ``<image>`` in LLaVA's vocabulary) in the encoded prompt stands
for the next image, in order. A text prompt writes the image token's text (a chat template
renders each image part as it; in a :class:`~aiolm.engine.tokenizer.MarkedText`, the same
text inside message content is plain text, not an image). A prompt without any image token
gets all its images first (after a leading BOS token). Any other count of image tokens is a
``ValueError``.

Each item's embeddings are computed once per request, while its prefill runs, by the
model's ``embed_multimodal_many`` (the vision tower and projector over the pass's new items
together), shared by the requests of a pass that carry the same digest, and dropped once
the request's KV covers the item.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from ..values import VideoData

if TYPE_CHECKING:
    import torch
    from PIL import Image as PILImage

    from ..values import ImageData
    from .loaded import LoadedModel
    from .request import Req

__all__ = [
    "MultimodalInputs",
    "MultimodalItem",
    "ProcessedCache",
    "build_processor",
    "decode_image",
    "embed_items",
    "is_multimodal",
    "pad_id",
    "pass_embeddings",
    "prepare_multimodal",
    "vision_batches",
]

#: Pad ids are ``vocab_size + (hash % PAD_ID_RANGE)``.
PAD_ID_RANGE = 2**30


@attrs.frozen(eq=False)
class MultimodalItem:
    """One image (or video) of a request: where its placeholder run is in the prompt and
    the model inputs the processor made of it."""

    kind: str                # "image" | "video"
    digest: str              # sha256 hex of the content
    offset: int              # index in the prompt ids where the placeholder run starts
    length: int              # placeholder tokens == rows of the item's embeddings
    pad_id: int              # the id written over the run (the radix cache key)
    data: Mapping[str, Any]  # the processor's model inputs for this item (CPU tensors)

    @property
    def end(self) -> int:
        """The index just past the item's placeholder run."""
        return self.offset + self.length


@attrs.define(eq=False)
class MultimodalInputs:
    """A request's items (on ``Req.mm``; None for text requests), with M-RoPE positions
    for the models that use them. ``rope_delta``: tokens past the prompt get rotary
    position ``index + rope_delta``."""

    items: list[MultimodalItem]
    mrope_positions: torch.Tensor | None = None
    rope_delta: int = 0
    #: Embeddings computed for this request, by digest, until its KV covers the items.
    _embeddings: dict[str, torch.Tensor] = attrs.field(factory=dict, init=False, repr=False)

    @property
    def end(self) -> int:
        """The index just past the last item's run (0 without items)."""
        return max((it.end for it in self.items), default=0)


def pad_id(digest: str, vocab_size: int) -> int:
    """The pad id of an item whose content hashes to ``digest`` (sha256 hex)."""
    return vocab_size + int(digest[:15], 16) % PAD_ID_RANGE


def is_multimodal(model: Any) -> bool:
    """Whether ``model``'s class takes images (its ``multimodal`` class attribute)."""
    return bool(getattr(type(model), "multimodal", False))


def build_processor(loaded: LoadedModel) -> Any:
    """The image processor of ``loaded``'s model: its class's ``build_processor`` over the
    checkpoint directory, or, for dummy weights, over none (a family whose defaults depend
    on the config, LLaVA's resolution, also gets ``hf_config``). Blocking (reads files)."""
    import inspect
    import os

    build = type(loaded.model).build_processor
    directory = loaded.source if (loaded.load_format != "dummy"
                                  and os.path.isdir(loaded.source)) else None
    if directory is None and "hf_config" in inspect.signature(build).parameters:
        return build(None, hf_config=loaded.model_config.hf_config)
    return build(directory)


def decode_video(video: VideoData) -> list[PILImage.Image]:
    """``video``'s sampled frames as RGB PIL images (H-QVL's addition)."""
    from PIL import Image

    return [Image.frombytes("RGB", (video.width, video.height), frame) for frame in video.frames]


def decode_image(image: ImageData, index: int = 0) -> PILImage.Image:
    """``image``'s bytes as an RGB PIL image.

    Raises ``ValueError`` naming ``images[index]`` for bytes PIL cannot read, and for an
    image given only as an http(s) URL (the engine never fetches: load the image first, or
    serve with ``aiolm serve --allow-image-urls``, which fetches it).
    """
    from PIL import Image, UnidentifiedImageError

    if image.data is None:
        raise ValueError(
            f"images[{index}]: the engine does not fetch image URLs ({image.url!r}); pass the "
            "image's bytes, a path, a data URL or a PIL image")
    try:
        with Image.open(io.BytesIO(image.data)) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"images[{index}]: not a readable image ({len(image.data)} bytes, "
                         f"{image.mime}): {exc}") from None


class ProcessedCache:
    """The processor's outputs of recent images, by content: the same picture asked about
    again (five questions about one image, each choice of a ``select`` after it) is decoded
    and resized once. Thread-safe (requests prepare their images on worker threads); holds
    at most ``max_items`` items and ``max_bytes`` of tensors, dropping the least recently
    used first. The tensors are shared by every request that hits them: read, never written.
    """

    def __init__(self, *, max_items: int = 32, max_bytes: int = 256 << 20) -> None:
        import collections
        import threading

        self.max_items = max_items
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict[tuple[Any, ...], tuple[Any, int, int]] = (
            collections.OrderedDict())
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[Any, ...]) -> tuple[Any, int] | None:
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return entry[0], entry[1]

    def put(self, key: tuple[Any, ...], data: Mapping[str, Any], n: int) -> None:
        import torch

        size = sum(v.numel() * v.element_size() for v in data.values()
                   if isinstance(v, torch.Tensor))
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[2]
            self._items[key] = (data, n, size)
            self._bytes += size
            while len(self._items) > self.max_items or self._bytes > self.max_bytes:
                _, (_, _, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped

    def __len__(self) -> int:
        return len(self._items)


def prepare_multimodal(model: Any, processor: Any, ids: Sequence[int],
                       images: Sequence[ImageData], *, vocab_size: int,
                       bos_token_id: int | None = None,
                       cache: ProcessedCache | None = None,
                       ) -> tuple[list[int], MultimodalInputs]:
    """The prompt ids with each image's placeholder run (pad ids) in place, and the request's
    :class:`MultimodalInputs`.

    ``ids``: the encoded prompt, where each ``model.image_token_id`` stands for the next
    image (none at all: the images go first, after a leading ``bos_token_id``); each image
    is decoded and run through ``processor.process_image``; ``model.placeholder_ids`` gives
    its run; ``cache`` keeps the processor's outputs by content for the next request.
    Blocking CPU work (decode and resize): call it off the event loop. Raises
    ``ValueError`` for an unreadable image or a count of image tokens that is not the
    number of images.
    """
    token = int(model.image_token_id)
    marks = [k for k, t in enumerate(ids) if t == token]
    ids = list(ids)
    if not marks:
        at = 1 if ids and bos_token_id is not None and ids[0] == bos_token_id else 0
        ids[at:at] = [token] * len(images)
        marks = list(range(at, at + len(images)))
    elif len(marks) != len(images):
        raise ValueError(
            f"images: the prompt has {len(marks)} image token(s) (id {token}) for "
            f"{len(images)} image(s); write one image token per image where it goes, or "
            "none to put the images first")
    out: list[int] = []
    items: list[MultimodalItem] = []
    start = 0
    for index, (mark, image) in enumerate(zip(marks, images, strict=True)):
        out.extend(ids[start:mark])
        start = mark + 1
        kind, run_token = "image", token
        if isinstance(image, VideoData):  # a video's frames (aiolm.video; H-QVL's addition)
            kind, run_token = "video", int(model.video_token_id)
        key = (kind, image.digest, getattr(image, "fps", None))
        hit = cache.get(key) if cache is not None else None
        if hit is not None:
            data, n = hit
        else:
            if kind == "video":
                data, n = processor.process_video(decode_video(image), fps=image.fps)
            else:
                data, n = processor.process_image(decode_image(image, index))
            if cache is not None:
                cache.put(key, data, n)
        run = list(model.placeholder_ids(kind, n))
        where = [k for k, t in enumerate(run) if t == run_token]
        if len(where) != n or (n and where[-1] - where[0] != n - 1):
            raise RuntimeError(f"{type(model).__name__}.placeholder_ids: expected one run of "
                               f"{n} {kind} tokens, got {run!r}")
        digest = image.digest
        pid = pad_id(digest, vocab_size)
        offset = len(out) + (where[0] if where else 0)
        run[offset - len(out):offset - len(out) + n] = [pid] * n
        out.extend(run)
        items.append(MultimodalItem(kind=kind, digest=digest, offset=offset, length=n,
                                    pad_id=pid, data=data))
    out.extend(ids[start:])
    mm = MultimodalInputs(items=items)
    mrope = getattr(model, "mrope_positions", None)
    if mrope is not None:
        mm.mrope_positions, mm.rope_delta = mrope(out, items)
    return out, mm


def pass_embeddings(model: Any, reqs: Sequence[Req], prefix_lens: Sequence[int],
                    extend_lens: Sequence[int],
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The embeddings of the items a pass computes, and the pass rows they overwrite.

    Request ``i`` computes tokens ``prefix_lens[i] .. prefix_lens[i] + extend_lens[i]`` as
    consecutive rows of the pass; the rows inside an item's run take that item's embedding
    rows (a chunked or cached-prefix pass takes the slice it covers). An item's embeddings
    come from the request's own store, else from another request of the pass with the same
    digest (its store, or what the pass computes), else from the model: the items of the
    pass that no store holds go through :func:`embed_items` together (the vision tower runs
    once per batch of them, not once per picture); a request whose pass reaches the end of
    its items drops its store.
    Returns ``(embeds [K, hidden], rows [K] int64)`` on the model's device, or None when no
    row of the pass is an item's.
    """
    import torch

    spans = []      # (request's inputs, item, pass row of its token 0, first, end) covered
    known: dict[str, torch.Tensor] = {}
    covered = []    # the requests whose items this pass finishes: their stores go after it
    first = 0
    for req, p, e in zip(reqs, prefix_lens, extend_lens, strict=True):
        mm = req.mm
        if mm is not None:
            for item in mm.items:
                a, b = max(item.offset, p), min(item.end, p + e)
                if a < b:
                    spans.append((mm, item, first - p, a, b))
            known.update(mm._embeddings)
            if p + e >= mm.end:
                covered.append(mm)
        first += e
    missing = {item.digest: item for _, item, *_ in spans if item.digest not in known}
    known.update(zip(missing, embed_items(model, list(missing.values())), strict=True))
    rows: list[torch.Tensor] = []
    embeds: list[torch.Tensor] = []
    for mm, item, shift, a, b in spans:
        emb = mm._embeddings.setdefault(item.digest, known[item.digest])
        embeds.append(emb[a - item.offset:b - item.offset])
        rows.append(torch.arange(shift + a, shift + b, dtype=torch.int64))
    for mm in covered:
        mm._embeddings.clear()
    if not rows:
        return None
    out = torch.cat(embeds)
    return out, torch.cat(rows).to(out.device, non_blocking=True)


def embed_items(model: Any, items: Sequence[MultimodalItem]) -> list[torch.Tensor]:
    """Each item's ``[item.length, hidden]`` embeddings from ``model.embed_multimodal_many``
    (its vision tower over several items at once). Raises RuntimeError when the model
    returns a count of rows that is not an item's placeholder count."""
    if not items:
        return []
    out = list(model.embed_multimodal_many(items))
    for item, emb in zip(items, out, strict=True):
        if emb.shape[0] != item.length:
            raise RuntimeError(
                f"{type(model).__name__}: {emb.shape[0]} embedding rows for an item of "
                f"{item.length} placeholder tokens")
    return out


def vision_batches(sizes: Sequence[int], limit: int) -> list[slice]:
    """Consecutive runs of ``sizes`` (an item's tiles, patches, ...) whose sum stays within
    ``limit``, one vision-tower call each; an item past the limit alone."""
    out, start, total = [], 0, 0
    for i, n in enumerate(sizes):
        if i > start and total + n > limit:
            out.append(slice(start, i))
            start, total = i, 0
        total += n
    if sizes:
        out.append(slice(start, len(sizes)))
    return out
