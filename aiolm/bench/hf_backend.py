"""The transformers peer: aiolm programs executed call by call on ``model.generate``.

:class:`HFBackend` is an aiolm :class:`~aiolm.backends.base.Backend`, so the benchmark runs
the *identical* program code on it. It does what a user of plain ``transformers`` would:
one call at a time, batch 1, no KV reuse across calls; ``select`` by one forward pass per
choice. It shares the engine's weights (:func:`~aiolm.bench.models.to_transformers`), its
tokenizer and chat template, and its stop rules (``aiolm.engine.stopping.StopChecker``:
EOS unless ``ignore_eos``, ``min_tokens``, stop strings and regexes), so both systems do
the same work token for token. JSON / regex constraints apply the same llguidance token
masks in a logits processor (without jump-forward, which ``generate`` has no way to do).

A multimodal model (LLaVA, Qwen2.5-VL) takes images (and Qwen2.5-VL videos) as the engine
does: the same processor, the same placement of each image's run of image tokens in the
prompt (:func:`~aiolm.engine.multimodal.prepare_multimodal`), the processor's tensors
passed to ``generate`` (:class:`_VisualInputs`); transformers' model runs its own vision
tower on them, once per call.
"""

from __future__ import annotations

import math
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import anyio.from_thread
import anyio.to_thread

from ..backends.base import (
    Backend,
    Capabilities,
    Chunk,
    GenerateRequest,
    ScoreResult,
    Usage,
    choose_by_method,
)
from ..chat import ChatTemplate, JinjaChatTemplate, chat_template_for, render_text
from ..errors import ContextLengthExceeded, UnsupportedFeature
from ..sequences import common_prefix_length
from ..values import VideoData

if TYPE_CHECKING:
    from ..backends.engine import LoadedModel
    from ..constraints.base import Matcher
    from ..engine.tokenizer import Tokenizer
    from ..values import ImageData

__all__ = ["HFBackend"]


class HFBackend(Backend):
    """``transformers`` generate behind the Backend interface (see the module docstring).

    ``model``: what ``aiolm.Engine`` takes (None for the embedded SmolLM2, a HF directory,
    a ``.gguf`` file, or with ``load_format="dummy"`` a named config, e.g. ``"llama-3-8b"``),
    or an already loaded ``LoadedModel`` to share its weights. Loading blocks.
    ``cache_implementation`` is passed to ``generate`` (e.g. ``"static"`` on a GPU).
    Like the engine, one instance serves one event loop.
    """

    capabilities = Capabilities(logprobs=False, images=False)
    #: A multimodal model's (images; video too for a model with video tokens).
    _VISUAL_CAPABILITIES = Capabilities(logprobs=False, images=True)
    _VIDEO_CAPABILITIES = Capabilities(logprobs=False, images=True, video=True)

    def __init__(self, model: str | LoadedModel | None = None, *, load_format: str = "auto",
                 seed: int = 0, device: str = "auto", dtype: str = "auto",
                 cache_implementation: str | None = None) -> None:
        from ..backends.engine import LoadedModel
        from ..engine.multimodal import is_multimodal
        from .models import load_for_bench, to_transformers

        loaded = model if isinstance(model, LoadedModel) else load_for_bench(
            model, load_format=load_format, seed=seed, device=device, dtype=dtype)
        self.loaded = loaded
        self.model = to_transformers(loaded)
        self.tokenizer: Tokenizer = loaded.tokenizer  # type: ignore[assignment]
        # The engine's rule, so both systems see the same prompts (tests/test_bench_engine.py).
        self._template = chat_template_for(self.tokenizer, model_name=self.model_name)
        self.eos_token_ids = tuple(sorted(set(loaded.model_config.eos_token_ids)
                                          | set(self.tokenizer.eos_token_ids)))
        self.context_len = loaded.model_config.context_len
        self._cache_implementation = cache_implementation
        self._lock = anyio.Lock()  # one call at a time, as a plain generate loop runs
        self._visual: _VisualInputs | None = None
        if is_multimodal(loaded.model):
            self._visual = _VisualInputs(loaded, self.model)
            self.capabilities = (self._VIDEO_CAPABILITIES if self._visual.takes_video
                                 else self._VISUAL_CAPABILITIES)

    @property
    def chat_template(self) -> ChatTemplate | JinjaChatTemplate:
        return self._template

    @property
    def model_name(self) -> str:
        return f"transformers ({self.loaded.source})"

    def _prompt_text(self, request: GenerateRequest) -> str:
        if request.prompt is not None:
            return request.prompt
        return render_text(request.messages or (), self._template, open_role="assistant")

    def _prompt_ids(self, request: GenerateRequest) -> list[int]:
        if request.input_ids is not None:
            return list(request.input_ids)
        return self.tokenizer.encode(self._prompt_text(request))

    async def _prompt_inputs(self, request: GenerateRequest) -> tuple[list[int], dict[str, Any]]:
        """The prompt's ids and the extra ``generate`` inputs of its images (none without).

        Raises ``UnsupportedFeature`` for images (or video) the model does not take,
        ``ValueError`` for an unreadable image."""
        if not request.images:
            return self._prompt_ids(request), {}
        visual = self._visual
        if visual is None:
            raise UnsupportedFeature("the transformers peer takes no images (a text model)")
        if not visual.takes_video and any(isinstance(x, VideoData) for x in request.images):
            raise UnsupportedFeature(f"{self.model_name} does not take video")
        ids = self._prompt_ids(request)
        bos = self.tokenizer.bos_token_id
        # Decoding and resizing are blocking CPU work, as in the engine.
        return await anyio.to_thread.run_sync(visual.inputs, ids, request.images, bos)

    @asynccontextmanager
    async def stream(self, request: GenerateRequest) -> AsyncIterator[AsyncIterator[Chunk]]:
        """Generate on a worker thread; chunks cross back one token at a time."""
        sampling = request.sampling
        if sampling.frequency_penalty or sampling.presence_penalty:
            raise UnsupportedFeature("the transformers peer has no frequency/presence penalties")
        ids, visual = await self._prompt_inputs(request)
        if len(ids) + sampling.max_tokens > self.context_len:
            raise ContextLengthExceeded(
                f"prompt: {len(ids)} tokens + max_tokens {sampling.max_tokens} exceed the "
                f"context of {self.context_len}")
        matcher = None
        if request.constraint is not None:
            matcher = await anyio.to_thread.run_sync(request.constraint.compile, self.tokenizer)
        send, receive = anyio.create_memory_object_stream[Chunk](math.inf)
        stop = threading.Event()
        async with self._lock, anyio.create_task_group() as tg, receive:
            tg.start_soon(self._run_thread, ids, visual, request, matcher, send, stop)
            try:
                yield receive
            finally:
                stop.set()  # an early exit stops generate at its next step

    async def _run_thread(self, ids: list[int], visual: dict[str, Any], request: GenerateRequest,
                          matcher: Matcher | None, send: Any, stop: threading.Event) -> None:
        with send:
            await anyio.to_thread.run_sync(self._generate, ids, visual, request, matcher, send,
                                           stop)

    def _generate(self, ids: list[int], visual: dict[str, Any], request: GenerateRequest,
                  matcher: Matcher | None, send: Any, stop: threading.Event) -> None:
        """Run ``generate`` (on a worker thread) with ``visual``, the images' inputs; send
        every piece of text as a chunk."""
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        from ..engine.stopping import StopChecker
        from ._hf_hooks import BanBeforeMin, ConstraintMask, StopRules

        sampling = request.sampling
        checker = StopChecker(sampling, eos_token_ids=self.eos_token_ids,
                              detokenizer=self.tokenizer.detokenizer(ids))
        out_ids: list[int] = []

        def emit(chunk: Chunk) -> None:
            try:
                anyio.from_thread.run_sync(send.send_nowait, chunk)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                stop.set()  # the caller left the stream

        if sampling.max_tokens > 0:
            processors = LogitsProcessorList([BanBeforeMin(len(ids), sampling, self.eos_token_ids)])
            if matcher is not None:
                processors.append(ConstraintMask(matcher, len(ids)))
            rules = StopRules(checker, len(ids), out_ids, emit, stop)
            config = GenerationConfig(
                max_new_tokens=sampling.max_tokens, do_sample=not sampling.greedy,
                temperature=sampling.temperature if not sampling.greedy else None,
                top_p=sampling.top_p if not sampling.greedy else None,
                top_k=sampling.top_k if sampling.top_k > 0 and not sampling.greedy else None,
                min_p=sampling.min_p if sampling.min_p > 0 and not sampling.greedy else None,
                eos_token_id=None, pad_token_id=self.eos_token_ids[0] if self.eos_token_ids else 0,
                cache_implementation=self._cache_implementation,
            )
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            with torch.inference_mode():
                self.model.generate(
                    torch.tensor([ids], device=self.loaded.device), **visual,
                    generation_config=config,
                    logits_processor=processors, stopping_criteria=StoppingCriteriaList([rules]),
                )
        final = checker.finish_length() if not checker.finished else None
        emit(Chunk(
            text=final.text if final is not None else "",
            finish_reason=checker.finish_reason,  # type: ignore[arg-type]
            usage=Usage(prompt_tokens=len(ids), completion_tokens=len(out_ids)),
            matched_stop=checker.matched_stop,
        ))

    async def score(self, prefix: GenerateRequest, continuations: Sequence[str],
                    method: str = "token_length_normalized") -> ScoreResult:
        """One forward pass per choice (and per choice alone for ``unconditional_normalized``)."""
        if not continuations:
            raise ValueError("continuations: need at least one choice")
        if prefix.images:
            raise UnsupportedFeature("the transformers peer scores no prompt with images (nor "
                                     "does the engine); use gen with choices")
        if prefix.input_ids is not None:
            prefix_ids = list(prefix.input_ids)
            fulls = [prefix_ids + self.tokenizer.encode(c) for c in continuations]
        else:
            text = self._prompt_text(prefix)
            prefix_ids = self.tokenizer.encode(text)
            fulls = [self.tokenizer.encode(text + c) for c in continuations]
        async with self._lock:
            return await anyio.to_thread.run_sync(self._score, prefix_ids, fulls, method)

    def _score(self, prefix_ids: list[int], fulls: list[list[int]], method: str) -> ScoreResult:
        import torch

        shared = min(common_prefix_length(prefix_ids, f) for f in fulls)
        context = self.tokenizer.bos_token_id
        context = context if context is not None else self.eos_token_ids[0]
        if shared == 0:
            fulls, shared = [[context, *f] for f in fulls], 1

        def logprobs(seq: list[int], start: int) -> tuple[list[float], int]:
            with torch.inference_mode():
                logits = self.model(torch.tensor([seq], device=self.loaded.device)).logits[0]
            lp = torch.log_softmax(logits[start - 1:-1].float(), dim=-1)
            target = torch.tensor(seq[start:], device=lp.device)
            chosen = lp.gather(1, target[:, None])[:, 0].tolist()
            agree = (lp.argmax(dim=-1) == target).tolist()
            return chosen, next((k for k, ok in enumerate(agree) if not ok), len(agree))

        cond = [logprobs(f, shared) if len(f) > shared else ([], 0) for f in fulls]
        unconditional = None
        if method == "unconditional_normalized":
            unconditional = [logprobs([context, *f[shared:]], 1)[0] if len(f) > shared else []
                             for f in fulls]
        index, normalized = choose_by_method(
            method, [c[0] for c in cond], greedy_matches=[c[1] for c in cond],
            unconditional_logprobs=unconditional)
        return ScoreResult(
            index=index, normalized_logprobs=normalized,
            token_logprobs=tuple(tuple(c[0]) for c in cond),
            unconditional_logprobs=None if unconditional is None else tuple(map(tuple, unconditional)),
            usage=Usage(prompt_tokens=sum(len(f) for f in fulls)),
        )


class _VisualInputs:
    """The ``generate`` inputs of a prompt with images for transformers' multimodal model.

    The prompt is laid out by the engine's own :func:`~aiolm.engine.multimodal.prepare_multimodal`
    (same processor, same placement), then each item's run of pad ids becomes the model's
    image (or video) token again, and the items' processor tensors are batched under
    transformers' names (``pixel_values``, ``image_grid_thw``, ``pixel_values_videos`` ...),
    with ``mm_token_type_ids`` where the model's ``forward`` takes them (Qwen2.5-VL in
    transformers >= 5.2x).
    """

    def __init__(self, loaded: LoadedModel, hf_model: Any) -> None:
        import inspect

        from ..engine.multimodal import build_processor

        self.loaded = loaded
        self._processor = build_processor(loaded)
        model = loaded.model
        self._tokens = {"image": int(model.image_token_id)}
        video = getattr(model, "video_token_id", None)
        if video is not None:
            self._tokens["video"] = int(video)
        self.takes_video = video is not None
        self._token_types = "mm_token_type_ids" in inspect.signature(hf_model.forward).parameters
        self._dtype = loaded.model_config.torch_dtype

    def inputs(self, ids: list[int], images: Sequence[ImageData | VideoData],
               bos_token_id: int | None) -> tuple[list[int], dict[str, Any]]:
        """``(ids, inputs)``: the prompt with every image's run of image tokens in place, and
        the keyword inputs of ``generate`` for its images (on the model's device). Blocking;
        raises ``ValueError`` as :func:`~aiolm.engine.multimodal.prepare_multimodal` does."""
        import torch

        from ..engine.multimodal import prepare_multimodal

        config = self.loaded.model_config
        ours, mm = prepare_multimodal(self.loaded.model, self._processor, ids, images,
                                      vocab_size=config.vocab_size, bos_token_id=bos_token_id)
        kind_of = {item.pad_id: item.kind for item in mm.items}
        hf_ids = [self._tokens[kind_of[t]] if t in kind_of else t for t in ours]
        device = self.loaded.device
        out: dict[str, Any] = {}
        for key in dict.fromkeys(key for item in mm.items for key in item.data):
            value = _batched([item.data[key] for item in mm.items if key in item.data])
            if key.startswith("pixel_values"):
                value = value.to(self._dtype)
            out[key] = value.to(device)
        if self._token_types:
            types = {"image": 1, "video": 2}
            out["mm_token_type_ids"] = torch.tensor(
                [[types[kind_of[t]] if t in kind_of else 0 for t in ours]], device=device)
        return hf_ids, out


def _batched(values: Sequence[Any]) -> Any:
    """The items' tensors of one input, concatenated; LLaVA-NeXT's tiles (``[1, tiles, 3,
    H, W]``) zero-padded to the most tiles first, as its processor pads a batch."""
    import torch

    if values[0].dim() == 5:
        most = max(v.shape[1] for v in values)
        values = [torch.nn.functional.pad(v, (0, 0, 0, 0, 0, 0, 0, most - v.shape[1]))
                  for v in values]
    return torch.cat(list(values))
