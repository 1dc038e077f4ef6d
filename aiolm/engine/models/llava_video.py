"""LLaVA-NeXT-Video: LLaVA-NeXT (any-resolution images) that also takes video, each frame
through the CLIP tower and its patch features pooled.

A video becomes language-model embeddings as in transformers'
``LlavaNextVideoForConditionalGeneration.get_video_features``: every frame, resized and
centre-cropped to the vision tower's square, runs through the CLIP tower (all frames in one
batch); the hidden states at ``vision_feature_layer`` lose the CLS row; each frame's
``side x side`` patch grid is pooled by ``spatial_pool_stride`` (``spatial_pool_mode``:
average, max, or a strided convolution whose weights the checkpoint carries); the projector
maps the pooled features; the frames' rows follow one another, without newline rows or
markers. A frame of LLaVA-NeXT-Video-7B (336 pixels, 14-pixel patches, stride 2) takes
``(24 / 2)² = 144`` tokens. Video tokens take plain positions: no temporal embedding, so a
clip's frame rate does not matter. Images go the LLaVA-NeXT way
(:class:`~.llava.LlavaNextForConditionalGeneration`), and images and videos mix in one
prompt, each item its own run of image or video tokens.

Frames are preprocessed by transformers' CLIP image processor (its PIL backend) configured
as the checkpoint's video processor (``video_preprocessor_config.json``: size, crop, mean
and std; the image configuration when there is none): transformers' own
``LlavaNextVideoVideoProcessor`` needs torchvision, which the engine does not depend on.
Both resize with bicubic filtering, but PIL and torchvision round differently, so pixel
values may differ from transformers' video processor by a few levels.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .llava import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration, LlavaProcessor

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from ..layers.quant import Int4Codes
    from ..model_config import ModelConfig
    from ..multimodal import MultimodalItem

__all__ = ["LlavaNextVideoForConditionalGeneration", "LlavaVideoProcessor", "VideoPooler"]

# The image-processor options a video processor's configuration shares with CLIP's.
_FRAME_OPTIONS = ("do_resize", "size", "resample", "do_center_crop", "crop_size",
                  "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std",
                  "do_convert_rgb")
_RESAMPLER = re.compile(r"^(?:model\.)?vision_resampler\.")


class VideoPooler(nn.Module):
    """Each frame's square patch grid pooled by ``stride`` (transformers'
    ``LlavaNextVideoPooler``): ``[frames, side², dim]`` -> ``[frames, (side // stride)², dim']``."""

    def __init__(self, mode: str, stride: int, channels: int, out_channels: int) -> None:
        super().__init__()
        if mode == "average":
            self.pool: nn.Module = nn.AvgPool2d(kernel_size=stride, stride=stride)
        elif mode == "max":
            self.pool = nn.MaxPool2d(kernel_size=stride, stride=stride)
        elif mode == "conv":
            self.pool = nn.Conv2d(channels, out_channels, kernel_size=stride, stride=stride)
        else:
            raise ValueError(f"spatial_pool_mode: expected 'average', 'max' or 'conv', "
                             f"got {mode!r}")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        frames, rows, dim = features.shape
        side = math.isqrt(rows)
        grid = features.view(frames, side, side, dim).permute(0, 3, 1, 2)
        return self.pool(grid).flatten(2).transpose(1, 2)


class LlavaVideoProcessor:
    """Images as LLaVA-NeXT's processor takes them; a video's frames through a CLIP image
    processor (resize, centre crop to the tower's square, normalize), stacked."""

    def __init__(self, images: LlavaProcessor, frame_processor: Any, *, image_size: int,
                 tokens_per_frame: int) -> None:
        self.images = images
        self.frame_processor = frame_processor
        self.image_size = image_size
        self.tokens_per_frame = tokens_per_frame

    def process_image(self, image: PILImage.Image) -> tuple[dict[str, torch.Tensor], int]:
        """LLaVA-NeXT's inputs for ``image`` and its number of placeholder tokens."""
        return self.images.process_image(image)

    def process_video(self, frames: Sequence[PILImage.Image], *, fps: float | None = None,
                      ) -> tuple[dict[str, torch.Tensor], int]:
        """``({"pixel_values_videos": [1, frames, 3, S, S]}, number of video tokens)``.
        ``fps`` is accepted for the contract and unused (no temporal positions). Raises
        ValueError for no frames, and for a processor configuration whose frames do not
        come out as the vision tower's ``S x S`` square."""
        if not frames:
            raise ValueError("video: no frames")
        out = self.frame_processor(images=[f.convert("RGB") for f in frames],
                                   return_tensors="pt")
        pixels = out["pixel_values"]
        side = self.image_size
        if tuple(pixels.shape[-2:]) != (side, side):
            raise ValueError(f"video: the frame processor makes {tuple(pixels.shape[-2:])} "
                             f"pixel frames; the vision tower takes {side} x {side} (set the "
                             "video processor's crop_size to it)")
        return {"pixel_values_videos": pixels[None]}, len(frames) * self.tokens_per_frame


class LlavaNextVideoForConditionalGeneration(LlavaNextForConditionalGeneration):
    """LLaVA-NeXT-Video over the engine's paged KV cache: LLaVA-NeXT's images, and videos
    whose frames' pooled CLIP features each take ``tokens_per_frame`` video tokens (the
    multimodal contract of :mod:`aiolm.engine.multimodal`, ``video_token_id`` included)."""

    vision_prefixes = (*LlavaNextForConditionalGeneration.vision_prefixes, "vision_resampler.")

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        hf = self.hf_config
        self.video_token_id = _video_token_id(hf)
        vision = self.vision_config
        mode, stride = _pooling(hf)
        if mode == "conv":
            out = int(hf.get("spatial_pool_out_channels") or vision.hidden_size)
            if len(self.feature_layers) != 1 or out != vision.hidden_size:
                raise ValueError("spatial_pool_mode: 'conv' pools one feature layer into the "
                                 f"vision tower's {vision.hidden_size} channels (got "
                                 f"{len(self.feature_layers)} layer(s), {out} channels)")
        self.vision_resampler = VideoPooler(mode, stride, vision.hidden_size,
                                            vision.hidden_size)
        self.tokens_per_frame = self.video_tokens_per_frame(hf)

    # ------------------------------------------------------------ the contract
    @classmethod
    def video_tokens_per_frame(cls, hf: Mapping[str, Any]) -> int:
        """Video tokens of one frame: its ``side x side`` patch grid pooled by the stride."""
        vision = hf["vision_config"]
        side = int(vision["image_size"]) // int(vision["patch_size"])
        return (side // _pooling(hf)[1]) ** 2

    @classmethod
    def build_processor(cls, model_dir: str | None, *,
                        hf_config: Mapping[str, Any] | None = None) -> LlavaVideoProcessor:
        """LLaVA-NeXT's image processing (see :meth:`LlavaForConditionalGeneration
        .build_processor`), and the frames' CLIP processor configured by ``model_dir``'s
        ``video_preprocessor_config.json`` (else its ``preprocessor_config.json``), or, without
        a directory, CLIP's defaults at the vision tower's resolution of ``hf_config``.
        Raises ``FileNotFoundError`` for a directory without the configuration files."""
        images = super().build_processor(model_dir, hf_config=hf_config)
        hf = images.hf_config
        if model_dir is None:
            frames = LlavaForConditionalGeneration._default_image_processor(hf)
        else:
            path = Path(model_dir)
            video = path / "video_preprocessor_config.json"
            source = video if video.is_file() else path / "preprocessor_config.json"
            options = json.loads(source.read_text())
            frames = _frame_processor({k: options[k] for k in _FRAME_OPTIONS if k in options})
        return LlavaVideoProcessor(images, frames,
                                   image_size=int(hf["vision_config"]["image_size"]),
                                   tokens_per_frame=cls.video_tokens_per_frame(hf))

    def placeholder_ids(self, kind: str, n: int) -> list[int]:
        """``n`` image tokens or ``n`` video tokens (no markers around either)."""
        token = {"image": self.image_token_id, "video": self.video_token_id}.get(kind)
        if token is None:
            raise ValueError(f"kind: expected 'image' or 'video', got {kind!r}")
        return [token] * n

    def embed_multimodal_many(self, items: Sequence[MultimodalItem]) -> list[torch.Tensor]:
        """The images' embeddings batched as LLaVA-NeXT's; each video's in a call of its own
        (its frames are a batch already)."""
        images = iter(super().embed_multimodal_many([it for it in items if it.kind != "video"]))
        return [self.embed_multimodal(it) if it.kind == "video" else next(images) for it in items]

    @torch.inference_mode()
    def embed_multimodal(self, item: MultimodalItem) -> torch.Tensor:
        """``[item.length, hidden]`` embeddings of an image (LLaVA-NeXT's) or of a video
        (its frames' pooled, projected features, frame after frame); the vision tower runs
        once, over all the frames."""
        if item.kind != "video":
            return super().embed_multimodal(item)
        pixels = item.data["pixel_values_videos"]
        frames = pixels.reshape(-1, *pixels.shape[-3:])
        weight = self.multi_modal_projector.linear_1.weight
        selected = self.vision_tower(frames.to(weight.device, weight.dtype), self.feature_layers)
        pooled = self.vision_resampler(selected[:, 1:])    # "default": without the CLS row
        return self.multi_modal_projector(pooled).flatten(0, 1)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | Int4Codes]],
                     ) -> dict[tuple[str, str | None], Int4Codes]:
        """:meth:`LlavaForConditionalGeneration.load_weights`, the pooling convolution's
        ``vision_resampler.*`` (with or without a leading ``model.``) included."""
        return super().load_weights((_our_name(name), tensor) for name, tensor in weights)


def _our_name(name: str) -> str:
    """A checkpoint name (transformers 4 or 5 layout) as the LLaVA loader takes it: the
    pooling convolution's ``model.vision_resampler.*`` without the ``model.``."""
    return _RESAMPLER.sub("vision_resampler.", name)


def _video_token_id(hf: Mapping[str, Any]) -> int:
    token = hf.get("video_token_index", hf.get("video_token_id"))
    if token is None:
        raise ValueError("video_token_index: a LLaVA-NeXT-Video config must name its video "
                         "token")
    return int(token)


def _pooling(hf: Mapping[str, Any]) -> tuple[str, int]:
    """``(spatial_pool_mode, spatial_pool_stride)`` (transformers' defaults: average, 2)."""
    mode = hf.get("spatial_pool_mode", "average")
    stride = hf.get("spatial_pool_stride", 2)
    if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
        raise ValueError(f"spatial_pool_stride: expected an int >= 1, got {stride!r}")
    return str(mode), stride


def _frame_processor(options: Mapping[str, Any]) -> Any:
    """transformers' CLIP image processor (its PIL backend: no torchvision) of ``options``."""
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(**options)
