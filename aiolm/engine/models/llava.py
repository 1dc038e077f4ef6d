"""The LLaVA family: LLaVA-1.5 (a CLIP vision tower at a fixed resolution) and LLaVA-NeXT
(any-resolution tiling), over our Llama-family language model.

An image becomes language-model embeddings in three steps, as in transformers'
``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration``: the CLIP vision
tower's hidden states at ``vision_feature_layer`` (one layer or several, concatenated),
without the CLS row under ``vision_feature_select_strategy="default"``; the projector (two
linear layers around ``projector_hidden_act``); for LLaVA-NeXT, the tiles of the image's
best ``image_grid_pinpoints`` resolution arranged into one feature map, the padding the
processor added cut off again (``unpad_image``), an ``image_newline`` row closing each row
of features, after the base (whole-image) tile's features.

The vision tower reuses transformers' CLIP modules (``CLIPVisionEmbeddings`` and
``CLIPEncoderLayer``, SDPA attention): it runs once per image, on the prefill path
(:func:`aiolm.engine.multimodal.pass_embeddings`), never in a decode step. Its layers past
the deepest feature layer are loaded but not run. All weights, the vision tower's included,
are loaded by our loader from the checkpoint's safetensors; the language model is
:class:`~aiolm.engine.models.llama.LlamaForCausalLM` (Llama, Mistral or Qwen2 text configs).

Checkpoint names: ``language_model.model.*`` / ``model.language_model.*`` (the language
model's body), ``language_model.lm_head.*`` / ``lm_head.*``, ``vision_tower.*`` (with or
without ``vision_model.``), ``multi_modal_projector.*`` and ``image_newline``, each with or
without a leading ``model.``, as transformers 4 and 5 save them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..forward_batch import ForwardBatch
from ..layers.quant import Int4Codes
from ..multimodal import vision_batches
from .llama import LlamaForCausalLM

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from ..model_config import ModelConfig
    from ..multimodal import MultimodalItem

__all__ = ["LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
           "LlavaProcessor"]

#: The most tiles one vision-tower call takes (a pass's pictures batched; LLaVA-NeXT's
#: pictures are up to five tiles of 577 patches).
VISION_TILES_PER_CALL = 64
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "image_newline")


class _CLIPEncoder(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        from transformers.models.clip.modeling_clip import CLIPEncoderLayer

        self.layers = nn.ModuleList(CLIPEncoderLayer(config)
                                    for _ in range(config.num_hidden_layers))


class CLIPVisionTower(nn.Module):
    """CLIP's vision transformer (transformers' modules, parameter names as saved)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings

        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = _CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def init_buffers(self) -> None:
        emb = self.embeddings
        emb.position_ids = torch.arange(emb.num_positions,
                                        device=emb.position_embedding.weight.device)[None]

    def forward(self, pixel_values: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """The hidden states after each of ``layers`` (0: the embeddings; as transformers'
        ``hidden_states`` indices, non-negative), concatenated on the feature axis."""
        hidden = self.pre_layrnorm(self.embeddings(pixel_values))
        states = [hidden]
        for layer in self.encoder.layers[:max(layers)]:
            hidden = layer(hidden, None)
            states.append(hidden)
        return torch.cat([states[i] for i in layers], dim=-1)


class LlavaProjector(nn.Module):
    def __init__(self, in_features: int, hidden: int, act: str, bias: bool) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        self.linear_1 = nn.Linear(in_features, hidden, bias=bias)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(hidden, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaProcessor:
    """Images to model inputs with transformers' image processor (CLIP's for LLaVA-1.5,
    LLaVA-NeXT's for NeXT) and the count of placeholder tokens each takes."""

    def __init__(self, image_processor: Any, model_cls: type[LlavaForConditionalGeneration],
                 hf_config: Mapping[str, Any]) -> None:
        self.image_processor = image_processor
        self._model_cls = model_cls
        self.hf_config = hf_config

    def process_image(self, image: PILImage.Image) -> tuple[dict[str, torch.Tensor], int]:
        """``(inputs, tokens)``: the processor's tensors for ``image`` (CPU) and the number
        of placeholder tokens (embedding rows) it takes."""
        out = self.image_processor(images=image, return_tensors="pt")
        data = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
        return data, self._model_cls.image_tokens(self.hf_config, data)


class LlavaForConditionalGeneration(nn.Module):
    """LLaVA-1.5: CLIP vision tower, MLP projector and a Llama-family language model, over
    the engine's paged KV cache. The multimodal contract of
    :mod:`aiolm.engine.multimodal`: ``multimodal``, ``image_token_id``,
    :meth:`build_processor`, :meth:`placeholder_ids`, :meth:`embed_multimodal_many`; the
    forward pass overwrites ``batch.mm_rows`` with ``batch.mm_embeds``."""

    multimodal = True
    #: The parameters outside the language model (loaded here, not by the language model).
    vision_prefixes: tuple[str, ...] = _VISION_PREFIXES

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        from transformers import CLIPVisionConfig

        hf = config.hf_config
        if hf is None:
            raise ValueError(f"{type(self).__name__}: the model config has no hf_config "
                             "(vision_config, image_token_index)")
        self.config = config
        self.hf_config = hf
        self.image_token_id = _image_token_id(hf)
        vision = CLIPVisionConfig(**_vision_config(hf))
        vision._attn_implementation = "sdpa"
        self.vision_config = vision
        self.feature_layers = _feature_layers(hf, vision.num_hidden_layers)
        self.select_strategy = _select_strategy(hf)
        self.vision_tower = CLIPVisionTower(vision)
        self.multi_modal_projector = LlavaProjector(
            vision.hidden_size * len(self.feature_layers), config.hidden_size,
            hf.get("projector_hidden_act", "gelu"), bool(hf.get("multimodal_projector_bias", True)))
        self.language_model = LlamaForCausalLM(config)

    # ------------------------------------------------------------ the contract
    @classmethod
    def build_processor(cls, model_dir: str | None, *,
                        hf_config: Mapping[str, Any] | None = None) -> LlavaProcessor:
        """The image preprocessing of ``model_dir`` (its ``preprocessor_config.json`` and
        ``config.json``, read with transformers' image processors, no hub), or, without a
        directory, CLIP's defaults at the vision tower's resolution for ``hf_config`` (a
        named dummy config). Raises ``FileNotFoundError`` for a directory without those
        files, ``ValueError`` when neither is given."""
        if model_dir is not None:
            path = Path(model_dir)
            for name in ("preprocessor_config.json", "config.json"):
                if not (path / name).is_file():
                    raise FileNotFoundError(f"model: {str(path)!r} has no {name} (a LLaVA "
                                            "checkpoint needs its image preprocessing)")
            from transformers import AutoImageProcessor

            processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
            return LlavaProcessor(processor, cls,
                                  json.loads((path / "config.json").read_text()))
        if hf_config is None:
            raise ValueError(f"{cls.__name__}.build_processor: give a model directory or "
                             "the model's hf_config")
        return LlavaProcessor(cls._default_image_processor(hf_config), cls, hf_config)

    @classmethod
    def _default_image_processor(cls, hf: Mapping[str, Any]) -> Any:
        from transformers import CLIPImageProcessor

        side = int(_vision_config(hf)["image_size"])
        return CLIPImageProcessor(size={"shortest_edge": side},
                                  crop_size={"height": side, "width": side},
                                  image_mean=_CLIP_MEAN, image_std=_CLIP_STD)

    @classmethod
    def image_tokens(cls, hf: Mapping[str, Any], data: Mapping[str, torch.Tensor]) -> int:
        """Placeholder tokens of an image whose processor inputs are ``data``: the patch
        grid (plus the CLS row under the "full" strategy)."""
        vision = _vision_config(hf)
        side = int(vision["image_size"]) // int(vision["patch_size"])
        return side * side + (_select_strategy(hf) == "full")

    def placeholder_ids(self, kind: str, n: int) -> list[int]:
        """``n`` image tokens (LLaVA has no markers around an image)."""
        if kind != "image":
            raise ValueError(f"kind: {type(self).__name__} takes images, not {kind!r}")
        return [self.image_token_id] * n

    def embed_multimodal(self, item: MultimodalItem) -> torch.Tensor:
        """``[item.length, hidden]`` language-model embeddings of one image (the vision
        tower and projector run once)."""
        return self.embed_multimodal_many([item])[0]

    @torch.inference_mode()
    def embed_multimodal_many(self, items: Sequence[MultimodalItem]) -> list[torch.Tensor]:
        """Each image's embeddings, the vision tower run over the tiles of several images at
        once (at most ``VISION_TILES_PER_CALL`` tiles a call): one call's launches for a
        pass's pictures instead of one call each."""
        tiles = [self._tiles(item) for item in items]
        out: list[torch.Tensor] = []
        for run in vision_batches([t.shape[0] for t in tiles], VISION_TILES_PER_CALL):
            features = self._image_features(torch.cat(tiles[run]))
            parts = features.split([t.shape[0] for t in tiles[run]])
            out.extend(self._assemble(item, f) for item, f in zip(items[run], parts, strict=True))
        return out

    def _tiles(self, item: MultimodalItem) -> torch.Tensor:
        """The ``[tiles, 3, H, W]`` pixels the vision tower takes of ``item``."""
        pixels = item.data["pixel_values"]
        return pixels.reshape(-1, *pixels.shape[-3:])

    def _assemble(self, item: MultimodalItem, features: torch.Tensor) -> torch.Tensor:
        """``item``'s embeddings from its tiles' projected features ``[tiles, rows, hidden]``."""
        return features.reshape(-1, features.shape[-1])

    # ------------------------------------------------------------ the model
    @property
    def device(self) -> torch.device:
        return self.multi_modal_projector.linear_1.weight.device

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The projected features ``[tiles, rows, hidden]`` of ``pixels [tiles, 3, H, W]``."""
        weight = self.multi_modal_projector.linear_1.weight
        selected = self.vision_tower(pixels.to(weight.device, weight.dtype), self.feature_layers)
        if self.select_strategy == "default":
            selected = selected[:, 1:]
        return self.multi_modal_projector(selected)

    def set_attention(self, backend: Any) -> None:
        """Use ``backend`` for the language model's attention (None: none)."""
        self.language_model.set_attention(backend)

    @property
    def attn(self) -> Any:
        return self.language_model.attn

    def init_buffers(self) -> None:
        """Recompute derived buffers (RoPE table, CLIP position ids) after materialising."""
        self.language_model.init_buffers()
        self.vision_tower.init_buffers()

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """The language model over the batch, rows ``batch.mm_rows`` embedded as
        ``batch.mm_embeds`` (their input ids are pad ids, never looked up)."""
        lm = self.language_model
        return lm(batch, inputs_embeds=lm.multimodal_embeddings(batch))

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | Int4Codes]],
                     ) -> dict[tuple[str, str | None], Int4Codes]:
        """Copy checkpoint tensors into the parameters (the language model's through
        :meth:`LlamaForCausalLM.load_weights`). Raises ValueError naming a tensor that
        belongs nowhere, a shape mismatch, or the weights the checkpoint lacks."""
        own = {n: p for n, p in self.named_parameters() if n.startswith(self.vision_prefixes)}
        missing = set(own)

        def language(items: Iterable[tuple[str, Any]]) -> Iterable[tuple[str, Any]]:
            for name, tensor in items:
                ours = _our_name(name)
                if not ours.startswith(self.vision_prefixes):
                    yield ours.removeprefix("language_model."), tensor
                    continue
                param = own.get(ours)
                if param is None:
                    raise ValueError(f"checkpoint tensor {name!r} does not belong to this model")
                if tuple(param.shape) != tuple(tensor.shape):
                    raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} does not "
                                     f"match {tuple(param.shape)}")
                param.copy_(tensor)
                missing.discard(ours)

        stored = self.language_model.load_weights(language(weights))
        if missing:
            names = sorted(missing)
            raise ValueError(f"checkpoint lacks {len(names)} weight(s): "
                             + ", ".join(names[:8]) + (" ..." if len(names) > 8 else ""))
        return stored


class LlavaNextForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA-NeXT: LLaVA with any-resolution tiling (``image_grid_pinpoints``), the padding
    cut off the tiled features and an ``image_newline`` row after each row of them."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        if self.select_strategy != "default":
            raise ValueError("vision_feature_select_strategy: LLaVA-NeXT tiles features "
                             "without the CLS row; only 'default' is supported")
        self.grid_pinpoints = [list(p) for p in self.hf_config["image_grid_pinpoints"]]
        self.image_newline = nn.Parameter(torch.empty(config.hidden_size))

    @classmethod
    def _default_image_processor(cls, hf: Mapping[str, Any]) -> Any:
        from transformers import LlavaNextImageProcessor

        side = int(_vision_config(hf)["image_size"])
        return LlavaNextImageProcessor(size={"shortest_edge": side},
                                       crop_size={"height": side, "width": side},
                                       image_grid_pinpoints=hf["image_grid_pinpoints"],
                                       image_mean=_CLIP_MEAN, image_std=_CLIP_STD)

    @classmethod
    def image_tokens(cls, hf: Mapping[str, Any], data: Mapping[str, torch.Tensor]) -> int:
        """The base tile's patches, then the unpadded tiled grid, each of its rows closed by
        a newline row (transformers' ``pack_image_features``, counted on shapes)."""
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            unpad_image,
        )

        vision = _vision_config(hf)
        image_size = int(vision["image_size"])
        side = image_size // int(vision["patch_size"])
        size = data["image_sizes"].reshape(-1)[:2].tolist()
        tiles_h, tiles_w = get_anyres_image_grid_shape(
            size, [list(p) for p in hf["image_grid_pinpoints"]], image_size)
        grid = unpad_image(torch.empty(0, tiles_h * side, tiles_w * side), size)
        return side * side + grid.shape[1] * (grid.shape[2] + 1)

    def _tiles(self, item: MultimodalItem) -> torch.Tensor:
        """The base tile and the any-resolution tiles the image's size asks for."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        size = item.data["image_sizes"].reshape(-1)[:2].tolist()
        tiles = image_size_to_num_patches(size, self.grid_pinpoints, self.vision_config.image_size)
        return super()._tiles(item)[:tiles]

    def _assemble(self, item: MultimodalItem, features: torch.Tensor) -> torch.Tensor:
        """The base tile's rows, then the tiled grid unpadded, a newline row after each row."""
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            unpad_image,
        )

        size = item.data["image_sizes"].reshape(-1)[:2].tolist()
        image_size = self.vision_config.image_size
        base, rest = features[0], features[1:]              # [tiles, side*side, hidden]
        side = image_size // self.vision_config.patch_size
        tiles_h, tiles_w = get_anyres_image_grid_shape(size, self.grid_pinpoints, image_size)
        grid = rest.view(tiles_h, tiles_w, side, side, -1).permute(4, 0, 2, 1, 3).contiguous()
        grid = unpad_image(grid.flatten(1, 2).flatten(2, 3), size)
        newline = self.image_newline[:, None, None].expand(*grid.shape[:-1], 1).to(grid)
        grid = torch.cat((grid, newline), dim=-1).flatten(1, 2).transpose(0, 1)
        return torch.cat((base, grid), dim=0)


def _vision_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    vision = hf.get("vision_config")
    if not isinstance(vision, Mapping):
        raise ValueError("vision_config: a LLaVA config needs its vision tower's config")
    out = dict(vision)
    kind = out.get("model_type", "clip_vision_model")
    if kind != "clip_vision_model":
        raise ValueError(f"vision_config.model_type: only CLIP vision towers are supported, "
                         f"got {kind!r}")
    out.pop("model_type", None)
    return out


def _image_token_id(hf: Mapping[str, Any]) -> int:
    token = hf.get("image_token_index", hf.get("image_token_id"))
    if token is None:
        raise ValueError("image_token_index: a LLaVA config must name its image token")
    return int(token)


def _select_strategy(hf: Mapping[str, Any]) -> str:
    strategy = hf.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy: expected 'default' or 'full', "
                         f"got {strategy!r}")
    return strategy


def _feature_layers(hf: Mapping[str, Any], num_layers: int) -> list[int]:
    """``vision_feature_layer`` as non-negative ``hidden_states`` indices (0..num_layers)."""
    given = hf.get("vision_feature_layer", -2)
    layers = [given] if isinstance(given, int) else list(given)
    out = [k if k >= 0 else num_layers + 1 + k for k in layers]
    if not out or not all(0 <= k <= num_layers for k in out):
        raise ValueError(f"vision_feature_layer: {given!r} is outside the vision tower's "
                         f"{num_layers} layers")
    return out


_PREFIX = re.compile(r"^(?:model\.)?(language_model\.(?:model\.)?|vision_tower\.(?:vision_model\.)?"
                     r"|multi_modal_projector\.|image_newline$|lm_head\.)")


def _our_name(name: str) -> str:
    """A checkpoint name (transformers 4 or 5 layout) as our parameter name."""
    match = _PREFIX.match(name)
    if match is None:
        return name
    head, rest = match.group(1), name[match.end():]
    if head.startswith("language_model."):
        return f"language_model.model.{rest}" if not rest.startswith("lm_head.") else \
            f"language_model.{rest}"
    if head == "lm_head.":
        return f"language_model.lm_head.{rest}"
    if head.startswith("vision_tower."):
        return f"vision_tower.{rest}"
    return head + rest
