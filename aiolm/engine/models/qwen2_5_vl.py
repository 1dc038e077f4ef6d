"""Qwen2.5-VL: its vision transformer in plain torch, and our Llama-family language model
with multimodal rotary positions (M-RoPE).

- Vision tower (``visual.*``, written here in plain torch, not ``transformers``' module; it
  runs once per image or video on the prefill path): a patch embedding over
  ``temporal_patch_size`` frames x ``patch_size``² pixels, blocks of RMSNorm + attention
  with 2D rotary (height, width) + gated MLP, where the blocks of
  ``fullatt_block_indexes`` attend over each whole frame and the others within windows of
  ``window_size`` pixels, then the patch merger (each ``spatial_merge_size``² patches to
  one language-model token). Semantics follow ``transformers``'
  ``Qwen2_5_VisionTransformerPretrainedModel`` exactly (the same window order, the rotary
  in float32, the merger's GELU).
- Language model: :class:`~.llama.LlamaForCausalLM` (Qwen2: q/k/v bias) with
  :class:`~..layers.rotary.MRotaryEmbedding`; a pass uses ``batch.mrope_positions``
  ``[3, N]`` when given, else ``batch.positions`` on all three rows (plain RoPE).
- :meth:`Qwen2_5_VLForConditionalGeneration.mrope_positions` reproduces ``transformers``'
  ``get_rope_index`` for images and videos.

Weights load by our loader from the checkpoint's safetensors under the names
``transformers`` saves (``model.layers.*``, ``visual.*``, ``lm_head.weight``; the
``model.language_model.*`` / ``model.visual.*`` spellings are accepted too).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from ..forward_batch import ForwardBatch
from ..layers import MergedLinear, RMSNorm, SiluAndMul
from ..layers.rotary import MRotaryEmbedding
from ..model_config import ModelConfig
from ..multimodal import vision_batches
from .llama import LlamaForCausalLM

if TYPE_CHECKING:
    from PIL import Image

    from ..layers.quant import Int4Codes

__all__ = ["Qwen2_5_VLForConditionalGeneration", "QwenVLProcessor", "VisionConfig"]

# Qwen2.5-VL samples video at 2 frames per second (qwen-vl-utils' FPS); frames given
# without a rate are taken to be that far apart.
DEFAULT_VIDEO_FPS = 2.0
#: The most patches one vision-tower call takes (a pass's pictures batched: a 672x504
#: picture is 1,728 patches; a longer video goes alone).
VISION_PATCHES_PER_CALL = 32768

_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


@attrs.frozen(kw_only=True)
class VisionConfig:
    """The vision tower's geometry (the checkpoint's ``vision_config``)."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    hidden_act: str = "silu"
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    tokens_per_second: float = 4.0
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = attrs.field(default=(7, 15, 23, 31),
                                                         converter=tuple)
    rope_theta: float = 10000.0

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> VisionConfig:
        """From a HF ``vision_config`` dict; ValueError for an unsupported activation."""
        act = cfg.get("hidden_act", "silu")
        if act != "silu" and act not in _ACTIVATIONS:
            raise ValueError(f"vision_config.hidden_act: unsupported {act!r}; "
                             f"supported: silu, {', '.join(_ACTIVATIONS)}")
        rope = cfg.get("rope_parameters") or {}
        return cls(
            depth=int(cfg["depth"]), hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]), num_heads=int(cfg["num_heads"]),
            out_hidden_size=int(cfg["out_hidden_size"]), hidden_act=act,
            in_channels=int(cfg.get("in_channels", 3)),
            patch_size=int(cfg.get("patch_size", 14)),
            spatial_merge_size=int(cfg.get("spatial_merge_size", 2)),
            temporal_patch_size=int(cfg.get("temporal_patch_size", 2)),
            tokens_per_second=float(cfg.get("tokens_per_second", 4)),
            window_size=int(cfg.get("window_size", 112)),
            fullatt_block_indexes=tuple(cfg.get("fullatt_block_indexes", (7, 15, 23, 31))),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# --------------------------------------------------------------------------- vision tower


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class VisionAttention(nn.Module):
    """Bidirectional attention within segments (frames or windows), 2D rotary on q and k."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, segments: list[tuple[torch.Tensor, int]],
                cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        # The rotary in float32, as transformers' apply_rotary_pos_emb_vision.
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        q = (q.float() * c + _rotate_half(q.float()) * s).to(x.dtype)
        k = (k.float() * c + _rotate_half(k.float()) * s).to(x.dtype)
        out = torch.empty_like(q)
        for rows, _length in segments:
            # rows [S, L]: S segments of L tokens each, attended in one batched call.
            qs, ks, vs = (t[rows].transpose(1, 2) for t in (q, k, v))   # [S, H, L, D]
            out[rows] = F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2)
        return self.proj(out.reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedLinear(config.hidden_size, [("gate", size), ("up", size)],
                                         bias=True)
        self.down_proj = nn.Linear(size, config.hidden_size, bias=True)
        self.act = config.hidden_act
        self.silu_and_mul = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.act == "silu":
            return self.down_proj(self.silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(_ACTIVATIONS[self.act](gate) * up)


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_size, 1e-6)
        self.norm2 = RMSNorm(config.hidden_size, 1e-6)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor, segments: list[tuple[torch.Tensor, int]],
                cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), segments, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm, then each ``spatial_merge_size``² consecutive patches -> one token (MLP)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.merged = config.hidden_size * config.spatial_merge_size ** 2
        self.ln_q = RMSNorm(config.hidden_size, 1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.merged, self.merged), nn.GELU(),
                                 nn.Linear(self.merged, config.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.merged))


class VisionTransformer(nn.Module):
    """``forward(pixel_values [P, C*T*p*p], grid_thw [n, 3])`` -> ``[P / merge², out_hidden]``:
    the language-model embeddings of ``n`` images or videos whose patches are laid out one
    after another (the processor's layout)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = _PatchEmbed(config)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config)
        self.register_buffer("inv_freq", torch.empty(config.head_dim // 4), persistent=False)

    def reset_cache(self) -> None:
        """Recompute the rotary inverse frequencies (after meta-device construction)."""
        half = self.config.head_dim // 2
        exponents = torch.arange(0, half, 2, dtype=torch.float) / half
        self.inv_freq = (1.0 / (self.config.rope_theta ** exponents)).to(self.inv_freq.device)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        unit = cfg.spatial_merge_size ** 2
        grids = [tuple(int(v) for v in g) for g in grid_thw.tolist()]
        device = pixel_values.device
        window_index, window_lens = _window_index(grids, cfg)
        frame_lens = [h * w for t, h, w in grids for _ in range(t)]
        order = (window_index.view(-1, 1) * unit + torch.arange(unit)).view(-1).to(device)

        x = self.patch_embed(pixel_values)[order]
        angles = _patch_positions(grids, cfg.spatial_merge_size).to(device)[order]
        freqs = (angles[..., None].float() * self.inv_freq).flatten(1)       # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        full = _segments(frame_lens, device)
        windowed = _segments(window_lens, device)
        for i, block in enumerate(self.blocks):
            x = block(x, full if i in cfg.fullatt_block_indexes else windowed, cos, sin)
        merged = self.merger(x)
        return merged[torch.argsort(window_index).to(device)]


class _PatchEmbed(nn.Module):
    """The Conv3d whose stride equals its kernel, as the matmul it is (same weight layout:
    ``proj.weight [hidden, C, T, p, p]``)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.proj = _Conv3dWeight(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        flat = pixel_values.to(weight.dtype).reshape(pixel_values.shape[0], -1)
        return F.linear(flat, weight.reshape(weight.shape[0], -1))


class _Conv3dWeight(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        p, t = config.patch_size, config.temporal_patch_size
        self.weight = nn.Parameter(torch.empty(config.hidden_size, config.in_channels, t, p, p))


def _patch_positions(grids: Sequence[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """Each patch's (row, column) ``[P, 2]``, patches ordered merge block by merge block
    (transformers' ``get_vision_position_ids``)."""
    out = []
    for t, h, w in grids:
        hpos, wpos = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        hpos = hpos.reshape(shape).transpose(1, 2).flatten()
        wpos = wpos.reshape(shape).transpose(1, 2).flatten()
        out.append(torch.stack([hpos, wpos], dim=-1).repeat(t, 1))
    return torch.cat(out)


def _window_index(grids: Sequence[tuple[int, int, int]],
                  cfg: VisionConfig) -> tuple[torch.Tensor, list[int]]:
    """The merged tokens reordered window by window, and each window's length in patches
    (transformers' ``get_vision_window_index``; empty windows dropped)."""
    merge = cfg.spatial_merge_size
    size = cfg.window_size // merge // cfg.patch_size
    unit = merge * merge
    index, lens, base = [], [], 0
    for t, h, w in grids:
        gh, gw = h // merge, w // merge
        ids = torch.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h, pad_w = size - gh % size, size - gw % size
        padded = F.pad(ids, (0, pad_w, 0, pad_h), "constant", -100)
        nh, nw = (gh + pad_h) // size, (gw + pad_w) // size
        padded = padded.reshape(t, nh, size, nw, size).permute(0, 1, 3, 2, 4)
        padded = padded.reshape(t, nh * nw, size * size)
        counts = (padded != -100).sum(-1).reshape(-1)
        flat = padded.reshape(-1)
        index.append(flat[flat != -100] + base)
        lens.extend(int(c) * unit for c in counts if c > 0)
        base += t * gh * gw
    return torch.cat(index), lens


def _segments(lengths: list[int], device: torch.device) -> list[tuple[torch.Tensor, int]]:
    """Consecutive segments of ``lengths`` grouped by length: ``(rows [S, L], L)`` for each
    length, so a block attends over all segments of one length in one batched call."""
    starts: dict[int, list[int]] = {}
    offset = 0
    for n in lengths:
        starts.setdefault(n, []).append(offset)
        offset += n
    return [((torch.tensor(s)[:, None] + torch.arange(n)).to(device), n)
            for n, s in starts.items()]


# --------------------------------------------------------------------------- the model


class Qwen2_5_VLForConditionalGeneration(LlamaForCausalLM):
    """Qwen2.5-VL over the engine's paged KV cache (the multimodal model contract of
    :mod:`aiolm.engine.multimodal`)."""

    multimodal = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        mm = config.hf_config
        if mm is None or not isinstance(mm.get("vision_config"), Mapping):
            raise ValueError("Qwen2_5_VLForConditionalGeneration: the config has no "
                             "vision_config")
        self.vision_config = VisionConfig.from_hf(mm["vision_config"])
        if self.vision_config.out_hidden_size != config.hidden_size:
            raise ValueError(f"vision_config.out_hidden_size: {self.vision_config.out_hidden_size}"
                             f" must equal the language model's hidden_size {config.hidden_size}")
        self.image_token_id = int(mm["image_token_id"])
        self.video_token_id = int(mm["video_token_id"])
        self.vision_start_token_id = int(mm["vision_start_token_id"])
        self.vision_end_token_id = int(mm["vision_end_token_id"])
        self.model.rotary_emb = MRotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta,
            _mrope_section(mm), config.rope_scaling,
        )
        self.visual = VisionTransformer(self.vision_config)

    def init_buffers(self) -> None:
        super().init_buffers()
        self.visual.reset_cache()

    # ------------------------------------------------------------------ contract

    @classmethod
    def build_processor(cls, model_dir: str | None, *,
                        hf_config: Mapping[str, Any] | None = None) -> QwenVLProcessor:
        """The image/video preprocessing of ``model_dir``'s config files; without a
        directory, the Qwen2-VL defaults at the patch geometry of ``hf_config`` (a named
        dummy config) when given. Raises FileNotFoundError for a directory without
        ``preprocessor_config.json``."""
        return QwenVLProcessor.from_dir(model_dir, hf_config=hf_config)

    def placeholder_ids(self, kind: str, n: int) -> list[int]:
        """``<|vision_start|>`` + ``n`` image (or video) tokens + ``<|vision_end|>``."""
        token = {"image": self.image_token_id, "video": self.video_token_id}.get(kind)
        if token is None:
            raise ValueError(f"kind: expected 'image' or 'video', got {kind!r}")
        return [self.vision_start_token_id, *([token] * n), self.vision_end_token_id]

    def embed_multimodal(self, item: Any) -> torch.Tensor:
        """The language-model embeddings ``[item.length, hidden]`` of one image or video
        (the vision tower once). Raises ValueError when the processor's grid does not give
        ``item.length`` tokens."""
        return self.embed_multimodal_many([item])[0]

    @torch.inference_mode()
    def embed_multimodal_many(self, items: Sequence[Any]) -> list[torch.Tensor]:
        """Each item's embeddings, the vision tower run over several items' patches laid one
        after another (at most ``VISION_PATCHES_PER_CALL`` a call; attention stays within
        each image or frame and window, as for one). Raises ValueError when an item's grid
        does not give its ``length`` tokens."""
        inputs = [_item_inputs(item) for item in items]
        unit = self.vision_config.spatial_merge_size ** 2
        patches = [int(grid.prod(-1).sum()) for _, grid in inputs]
        weight = self.model.embed_tokens.weight
        out: list[torch.Tensor] = []
        for run in vision_batches(patches, VISION_PATCHES_PER_CALL):
            pixels = torch.cat([p for p, _ in inputs[run]]).to(weight.device)
            grids = torch.cat([g.reshape(-1, 3) for _, g in inputs[run]])
            merged = self.visual(pixels, grids).to(weight.dtype)
            out.extend(merged.split([n // unit for n in patches[run]]))
        for item, emb in zip(items, out, strict=True):
            if emb.shape[0] != item.length:
                raise ValueError(f"{item.kind}: the vision tower gave {emb.shape[0]} embeddings "
                                 f"for {item.length} placeholder tokens")
        return out

    def mrope_positions(self, input_ids: Sequence[int],
                        items: Sequence[Any]) -> tuple[torch.Tensor, int]:
        """The prompt's M-RoPE positions ``[3, len(input_ids)]`` (int64) and the rope delta
        of the tokens after it (``transformers``' ``get_rope_index``): text tokens count up
        on all three rows; an item's tokens take (time, row, column) over its merged grid,
        starting where the text before it ended, time scaled by ``tokens_per_second`` x
        ``second_per_grid_ts`` for video; the text after it resumes at that start plus
        the larger of the grid's merged height and width."""
        merge = self.vision_config.spatial_merge_size
        runs: list[torch.Tensor] = []
        pos = 0   # the next text position
        done = 0  # tokens placed so far
        for item in sorted(items, key=lambda it: it.offset):
            if item.offset < done:
                raise ValueError("items: overlapping multimodal items")
            if item.offset > done:
                n = item.offset - done
                runs.append(torch.arange(pos, pos + n).expand(3, n))
                pos += n
            _, grid = _item_inputs(item)
            t, h, w = (int(v) for v in grid[0])
            gh, gw = h // merge, w // merge
            step = 1.0
            if item.kind == "video":
                step = self.vision_config.tokens_per_second * _second_per_grid(item)
            times = (torch.arange(t) * step).long()
            tt, hh, ww = torch.meshgrid(times, torch.arange(gh) + pos, torch.arange(gw) + pos,
                                        indexing="ij")
            run = torch.stack([tt + pos, hh, ww]).reshape(3, -1)
            if run.shape[1] != item.length:
                raise ValueError(f"{item.kind}: grid {t}x{h}x{w} gives {run.shape[1]} tokens, "
                                 f"the item has {item.length}")
            runs.append(run)
            pos += max(gh, gw)
            done = item.offset + item.length
        total = len(input_ids)
        if total < done:
            raise ValueError(f"items: reach token {done}, past the prompt's {total}")
        if total > done:
            runs.append(torch.arange(pos, pos + total - done).expand(3, total - done))
        positions = torch.cat(runs, dim=1) if runs else torch.zeros(3, 0, dtype=torch.long)
        delta = int(positions.max()) + 1 - total if total else 0
        return positions.to(torch.long).contiguous(), delta

    # ------------------------------------------------------------------ forward

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """:meth:`LlamaForCausalLM.forward` with the multimodal inputs: rows
        ``batch.mm_rows`` take ``batch.mm_embeds`` instead of their (pad) token's
        embedding, and ``batch.mrope_positions`` ``[3, N]`` rotate q and k when given."""
        return super().forward(batch, inputs_embeds=self.multimodal_embeddings(batch),
                               positions=batch.mrope_positions)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | Int4Codes]],
                     ) -> dict[tuple[str, str | None], Int4Codes]:
        """:meth:`LlamaForCausalLM.load_weights` over the checkpoint's names, the vision
        tower's included (its MLP gate/up fused like the language model's)."""
        return super().load_weights((_our_name(name), t) for name, t in weights)


def _mrope_section(hf: Mapping[str, Any]) -> list[int]:
    """The M-RoPE split of the rotary frequencies: ``mrope_section`` of the text config's
    ``rope_parameters`` (``rope_scaling`` in older configs, flat or nested)."""
    text = hf.get("text_config") or hf
    for source in (text, hf):
        for key in ("rope_parameters", "rope_scaling"):
            params = source.get(key) or {}
            if params.get("mrope_section"):
                return [int(n) for n in params["mrope_section"]]
    raise ValueError("mrope_section: a Qwen2.5-VL config must give it in its text config's "
                     "rope_parameters")


def _our_name(name: str) -> str:
    if name.startswith("model.language_model."):
        return "model." + name.removeprefix("model.language_model.")
    if name.startswith("model.visual."):
        return name.removeprefix("model.")
    return name


def _item_inputs(item: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel values, grid_thw [1, 3])`` of an image or video item."""
    data = item.data
    if item.kind == "image":
        return data["pixel_values"], data["image_grid_thw"]
    if item.kind == "video":
        return data["pixel_values_videos"], data["video_grid_thw"]
    raise ValueError(f"kind: expected 'image' or 'video', got {item.kind!r}")


def _second_per_grid(item: Any) -> float:
    value = item.data.get("second_per_grid_ts")
    if value is None:
        return 1.0
    return float(value.reshape(-1)[0]) if isinstance(value, torch.Tensor) else float(value)


# --------------------------------------------------------------------------- processor


class QwenVLProcessor:
    """Images and videos to the vision tower's inputs, with ``transformers``' Qwen2-VL
    image processor (dynamic resolution: each image resized to a multiple of
    ``patch_size * merge_size`` within ``[min_pixels, max_pixels]``).

    Video frames go through the same image processor (resized alike, at the video
    configuration's pixel bounds) and are then laid out as ``transformers``'
    ``Qwen2VLVideoProcessor`` lays them out (``temporal_patch_size`` consecutive frames
    per patch, the last frame repeated to fill the last one): that processor needs
    torchvision, which the engine does not depend on.
    """

    def __init__(self, image_processor: Any, video_processor: Any) -> None:
        self.image_processor = image_processor
        self.video_processor = video_processor
        self.merge_size = int(image_processor.merge_size)
        self.temporal_patch_size = int(image_processor.temporal_patch_size)
        self.patch_size = int(image_processor.patch_size)

    @classmethod
    def from_dir(cls, model_dir: str | None, *,
                 hf_config: Mapping[str, Any] | None = None) -> QwenVLProcessor:
        """From ``model_dir``'s ``preprocessor_config.json`` (and
        ``video_preprocessor_config.json`` for video when present); the Qwen2-VL defaults
        when None (video: 128 to 768 x 28² pixels a frame, as transformers' default), with
        the patch geometry of ``hf_config``'s ``vision_config`` when given."""
        if model_dir is None:
            vision = (hf_config or {}).get("vision_config") or {}
            image_cfg: dict[str, Any] = {
                k: int(vision[v]) for k, v in (("patch_size", "patch_size"),
                                               ("merge_size", "spatial_merge_size"),
                                               ("temporal_patch_size", "temporal_patch_size"))
                if v in vision}
            video_cfg = dict(image_cfg, min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28)
        else:
            directory = Path(model_dir)
            path = directory / "preprocessor_config.json"
            if not path.is_file():
                raise FileNotFoundError(f"model: {str(directory)!r} has no preprocessor_config.json "
                                        "(the image processor's configuration)")
            image_cfg = json.loads(path.read_text())
            video_path = directory / "video_preprocessor_config.json"
            video_cfg = json.loads(video_path.read_text()) if video_path.is_file() else image_cfg
        return cls(_image_processor(image_cfg), _image_processor(video_cfg))

    def process_image(self, image: Image.Image) -> tuple[dict[str, torch.Tensor], int]:
        """``({"pixel_values", "image_grid_thw"}, number of image tokens)``."""
        out = self.image_processor(images=[image.convert("RGB")], return_tensors="pt")
        grid = out["image_grid_thw"].to(torch.long)
        data = {"pixel_values": out["pixel_values"], "image_grid_thw": grid}
        return data, int(grid.prod()) // self.merge_size ** 2

    def process_video(self, frames: Sequence[Image.Image], *, fps: float | None = None,
                      ) -> tuple[dict[str, torch.Tensor], int]:
        """``({"pixel_values_videos", "video_grid_thw", "second_per_grid_ts"}, number of
        video tokens)`` of ``frames`` sampled at ``fps`` frames a second (default 2).
        Raises ValueError for no frames or frames of different sizes."""
        if not frames:
            raise ValueError("video: no frames")
        sizes = {f.size for f in frames}
        if len(sizes) != 1:
            raise ValueError(f"video: frames of different sizes {sorted(sizes)}")
        rgb = [f.convert("RGB") for f in frames]
        out = self.video_processor(images=rgb, return_tensors="pt")
        t, c, p = self.temporal_patch_size, 3, self.patch_size
        grid_h, grid_w = (int(v) for v in out["image_grid_thw"][0, 1:])
        per_frame = out["pixel_values"].view(len(rgb), grid_h * grid_w, c, t, p, p)[:, :, :, 0]
        if pad := -len(rgb) % t:
            per_frame = torch.cat([per_frame, per_frame[-1:].expand(pad, -1, -1, -1, -1)])
        groups = per_frame.shape[0] // t
        patches = per_frame.view(groups, t, grid_h * grid_w, c, p, p).permute(0, 2, 3, 1, 4, 5)
        pixels = patches.reshape(groups * grid_h * grid_w, c * t * p * p).contiguous()
        grid = torch.tensor([[groups, grid_h, grid_w]], dtype=torch.long)
        rate = DEFAULT_VIDEO_FPS if fps is None else fps
        data = {"pixel_values_videos": pixels, "video_grid_thw": grid,
                "second_per_grid_ts": torch.tensor([t / rate])}
        return data, groups * grid_h * grid_w // self.merge_size ** 2


def _image_processor(cfg: Mapping[str, Any]) -> Any:
    """transformers' Qwen2-VL image processor of ``cfg`` (its PIL backend: no torchvision)."""
    import transformers

    cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    kwargs = {k: v for k, v in cfg.items()
              if k not in ("image_processor_type", "processor_class", "video_processor_type")}
    return cls(**kwargs)
