"""``aiolm.Engine``: the in-process engine as an async :class:`~aiolm.backends.base.Backend`.

The engine loop (:class:`aiolm.engine.core.EngineCore`) runs on its own thread. This
module is its async front: it validates and tokenizes requests on the caller's task, posts
them to the loop's inbox, and fans the loop's per-step events out to per-request streams.
The loop crosses into the event loop once per step with a non-blocking, thread-safe
``call_soon`` of the running event loop (asyncio's ``call_soon_threadsafe`` or trio's
``TrioToken.run_sync_soon``), so it never waits on the event loop.

Prompt encoding, submission and the event fan-out are :mod:`aiolm.backends._engine_requests`;
turning scores into a choice is :mod:`aiolm.backends._engine_score`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import attrs

from ..chat import SIMPLE_TEMPLATE, ChatTemplate, JinjaChatTemplate, chat_template_for
from ..constraints.limits import ConstraintLimits
from ..engine.config import EngineConfig, resolve_device
from ..engine.loaded import LoadedModel
from ..engine.multimodal import is_multimodal
from ..errors import BackendUnavailable, UnsupportedFeature
from ..sampling import SamplingParams
from ..sequences import common_prefix_length
from ._engine_display import EngineView, engine_html, engine_repr
from ._engine_plumbing import (
    ChunkStream,
    Mailbox,
    Pending,
    as_request,
    read_chat_template,
    soon_caller,
)
from ._engine_requests import EngineRequests, _collected_while_running, _text_chars, _weak_post
from ._engine_score import score_result
from .base import (
    SELECT_METHODS,
    Backend,
    Capabilities,
    Chunk,
    Completion,
    GenerateRequest,
    ScoreResult,
    Usage,
    new_request_id,
)

if TYPE_CHECKING:
    import torch

    from ..constraints.base import Constraint
    from ..engine.core import EngineCore, EngineStatistics, IntegrityReport
    from ..engine.tokenizer import MarkedText, Tokenizer

__all__ = ["Engine", "LoadedModel"]

_log = logging.getLogger("aiolm.engine")

# Longer texts are tokenized on a worker thread (about a millisecond of encoding).
_INLINE_ENCODE_CHARS = 8192
#: The declared defaults of the options (the signature of ``Engine`` takes its own from it).
_DEFAULT = EngineConfig()
_TEXT_CAPABILITIES = Capabilities(images=False)
_MULTIMODAL_CAPABILITIES = Capabilities(images=True)
_VIDEO_CAPABILITIES = Capabilities(images=True, video=True)   # Qwen2.5-VL (H-QVL's addition)


class Engine(EngineRequests, Backend):
    """The in-process inference engine (RadixAttention, cache-aware scheduling, constraints).

    Open it with ``async with Engine(...) as engine`` or ``await engine.start()`` /
    ``await engine.aclose()``. The options, their defaults and what they mean are declared
    once, on :class:`aiolm.engine.config.EngineConfig` (validated here, before anything
    loads; docs/engine.md lists them); ``model`` may also be a :class:`LoadedModel`. Weights
    load in :meth:`start`, on a worker thread.

    Raises ``ValueError`` / ``TypeError`` naming a bad option, ``FileNotFoundError`` naming
    a missing ``chat_template`` file (read here; a Jinja syntax error in the template
    raises ``ValueError`` from :meth:`start`).
    """

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        """What the engine's model can do: images when its class is multimodal (LLaVA,
        Qwen2.5-VL; known once the model is loaded), else text only."""
        loaded = self._loaded
        multimodal = loaded is not None and is_multimodal(loaded.model)
        if multimodal and hasattr(loaded.model, "video_token_id"):
            return _VIDEO_CAPABILITIES
        return _MULTIMODAL_CAPABILITIES if multimodal else _TEXT_CAPABILITIES

    # NOTE: the keyword parameters are EngineConfig's fields, one for one, with its
    # defaults (tests/test_engine_config.py checks both): a new option is declared there
    # and named here.
    def __init__(self, model: str | os.PathLike[str] | LoadedModel | None = None, *,
                 dtype: str = _DEFAULT.dtype, device: str = _DEFAULT.device,
                 attention_backend: str = _DEFAULT.attention_backend,
                 schedule_policy: str = _DEFAULT.schedule_policy,
                 enable_radix_cache: bool = _DEFAULT.enable_radix_cache,
                 chunked_prefill_size: int | None = _DEFAULT.chunked_prefill_size,
                 max_running_requests: int | None = _DEFAULT.max_running_requests,
                 max_total_tokens: int | None = _DEFAULT.max_total_tokens,
                 mem_fraction: float = _DEFAULT.mem_fraction,
                 cuda_graphs: bool = _DEFAULT.cuda_graphs,
                 extend_graph_tokens: int = _DEFAULT.extend_graph_tokens,
                 load_format: str = _DEFAULT.load_format,
                 quantization: str | None = _DEFAULT.quantization,
                 tp_size: int = _DEFAULT.tp_size, seed: int = _DEFAULT.seed,
                 jump_forward: bool = _DEFAULT.jump_forward,
                 mix_decode: bool = _DEFAULT.mix_decode,
                 shared_prefix_min_tokens: int | None = _DEFAULT.shared_prefix_min_tokens,
                 aging_limit: int = _DEFAULT.aging_limit,
                 request_step_timeout: float = _DEFAULT.request_step_timeout,
                 close_timeout: float = _DEFAULT.close_timeout,
                 num_threads: int | None = _DEFAULT.num_threads,
                 overlap: bool | None = _DEFAULT.overlap,
                 compile: bool = _DEFAULT.compile,
                 escape_special_tokens: bool = _DEFAULT.escape_special_tokens,
                 chat_template: str | os.PathLike[str] | None = _DEFAULT.chat_template,
                 constraint_limits: ConstraintLimits = _DEFAULT.constraint_limits) -> None:
        options = dict(locals())  # first: the parameters and nothing else
        del options["self"], options["model"]
        self._loaded = model if isinstance(model, LoadedModel) else None
        if self._loaded is not None:
            model, options["load_format"] = self._loaded.source, self._loaded.load_format
        self.config = EngineConfig(model=model, **options)
        if self._loaded is not None and self.config.tp_size > 1:
            raise ValueError("tp_size: each tensor-parallel rank loads its own shard; pass the "
                             "model's path or name, not a LoadedModel")
        self._chat_template_source = read_chat_template(self.config.chat_template)
        if self.config.device.startswith("cuda"):  # say it now, not after a model load
            resolve_device(self.config.device)
        self._core: EngineCore | None = None
        self._tokenizer: Tokenizer | None = None
        self._template: ChatTemplate | JinjaChatTemplate = SIMPLE_TEMPLATE
        self._call_soon: Callable[..., None] | None = None
        self._streams: dict[str, Mailbox] = {}
        self._tickets: dict[int, Pending] = {}
        self._ticket_ids = itertools.count()
        self._failed: BaseException | None = None
        self._last_statistics: EngineStatistics | None = None
        self._closed = False
        self._finalizer: weakref.finalize | None = None
        self._processor: Any = None
        self._processed: Any = None   # the processor's outputs of recent images, by content

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Load the model (on a worker thread) and start the engine loop.

        Raises ``RuntimeError`` if already started or closed, ``FileNotFoundError`` for a
        missing model, ``ValueError`` for options the machine cannot honour or a
        ``chat_template`` with a Jinja syntax error.
        """
        if self._closed:
            raise RuntimeError("Engine.start: this engine was closed; create a new Engine")
        if self._core is not None:
            raise RuntimeError("Engine.start: the engine was already started")
        self._call_soon = soon_caller()
        loaded = self._loaded
        workers = None  # tensor parallelism: the worker processes, until the core owns them
        if loaded is None and self.config.tp_size > 1:
            from ..engine.tp_workers import start_tensor_parallel

            loaded, workers = await anyio.to_thread.run_sync(start_tensor_parallel, self.config)
        elif loaded is None:
            cfg = self.config
            loaded = await anyio.to_thread.run_sync(lambda: LoadedModel.load(
                cfg.model, dtype=cfg.dtype, device=cfg.device, load_format=cfg.load_format,
                seed=cfg.seed, quantization=cfg.quantization))
        try:
            if loaded.in_use:
                raise RuntimeError("model: this LoadedModel is used by another open Engine")
            template = chat_template_for(loaded.tokenizer, self._chat_template_source,
                                         model_name=self.model_name)
            template = _with_model_image_token(template, loaded)
        except BaseException:
            if workers is not None:
                workers.close()
            raise
        loaded.in_use = True
        self._loaded = loaded
        try:
            from ..engine.core import EngineCore

            # The loop thread holds the core; the core must not hold the engine, or an
            # engine whose last reference is dropped could never be collected and stopped.
            post = _weak_post(weakref.ref(self))
            self._core = await anyio.to_thread.run_sync(lambda: EngineCore(
                self.config, model=loaded.model, model_config=loaded.model_config,
                tokenizer=loaded.tokenizer, device=loaded.device, post=post, workers=workers))
        except BaseException:
            loaded.in_use = False
            if workers is not None:
                workers.close()
            raise
        self._finalizer = weakref.finalize(self, _collected_while_running, self._core,
                                           self.model_name, loaded)
        self._finalizer.atexit = False  # at exit the daemon loop thread simply ends
        self._tokenizer = loaded.tokenizer
        if loaded.tokenizer is not None:  # computed once, off the event loop
            await anyio.to_thread.run_sync(lambda: loaded.tokenizer.max_token_chars)
        self._template = template
        self._core.start()

    async def aclose(self) -> None:
        """Stop the engine loop and release its memory; open streams fail with
        :class:`BackendUnavailable`. Idempotent; waits (shielded) for the loop to stop, at
        most ``close_timeout`` seconds: a loop still busy then (a forward pass cannot be
        interrupted) is logged and left to its daemon thread, the engine is marked failed
        (:attr:`failure`) and its weights stay taken."""
        core, self._core = self._core, None
        self._closed = True
        if core is None:
            return
        if self._finalizer is not None:
            self._finalizer.detach()
        core.shutdown()
        timeout = self.config.close_timeout
        with anyio.CancelScope(shield=True):
            stopped = await anyio.to_thread.run_sync(core.join, timeout)
        self._last_statistics = core.statistics()
        self._fail_all(BackendUnavailable("the engine was closed"))
        if not stopped:
            _log.error("the engine loop did not stop within close_timeout=%g s; leaving its "
                       "thread behind", timeout)
            self._failed = self._failed or BackendUnavailable(
                f"the engine loop did not stop within {timeout:g} s of aclose()")
            return
        device = core.runner.device
        del core   # the loop has ended: its KV pool and graphs go with the last reference
        await anyio.to_thread.run_sync(_release_device_memory, device)
        if self._loaded is not None:
            self._loaded.in_use = False

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        """One line: model, device, dtype, state, and the KV pool's size while running."""
        return engine_repr(self._view())

    def _repr_html_(self) -> str:
        """The engine in a notebook: model, device, dtype, attention backend, state and,
        while running, its :meth:`statistics` (requests, tokens, cache hit rate, KV slots)."""
        return engine_html(self._view())

    def _view(self) -> EngineView:
        loaded, core, failure = self._loaded, self._core, self.failure
        if failure is not None:
            state = "failed"
        elif self._closed:
            state = "closed"
        else:
            state = "running" if core is not None else "not started"
        return EngineView(
            model=self.model_name,
            device=str(loaded.device) if loaded is not None else self.config.device,
            dtype=loaded.model_config.dtype if loaded is not None else self.config.dtype,
            attention_backend=(core.runner.attention_backend if core is not None
                               else self.config.attention_backend),
            state=state,
            statistics=core.statistics() if state == "running" and core is not None else None,
            failure=failure,
        )

    # ----------------------------------------------------------------- properties
    @property
    def model_name(self) -> str:
        return os.path.basename(self.config.model or "SmolLM2-135M-Instruct")

    @property
    def chat_template(self) -> ChatTemplate | JinjaChatTemplate:
        """The chat template chat requests render with (``chat_template`` if given, else the
        tokenizer's): role prefixes/suffixes, or, for a template that does not wrap each turn
        on its own, the template itself (warned at :meth:`start`; see
        :func:`aiolm.chat.chat_template_for`); SIMPLE_TEMPLATE without a tokenizer or a
        template."""
        return self._template

    @property
    def chat_template_source(self) -> str | None:
        """The Jinja chat template in use: ``chat_template`` if given, else the tokenizer's
        own (known after :meth:`start`); ``None`` where there is none. Never waits."""
        if self._chat_template_source is not None:
            return self._chat_template_source
        return self._tokenizer.chat_template_source if self._tokenizer is not None else None

    def render_chat(self, messages: Sequence[dict[str, Any]], *,
                    tools: Sequence[dict[str, Any]] | None = None,
                    add_generation_prompt: bool = True, **template_kwargs: Any) -> MarkedText:
        """OpenAI-format ``messages`` (and ``tools``) rendered by :attr:`chat_template_source`.

        Returns a :class:`~aiolm.engine.tokenizer.MarkedText` whose message content is
        marked literal, so that special-token text a message carries encodes as ordinary
        tokens when the text is the prompt (see ``escape_special_tokens``). Runs the
        template on the caller's thread. Raises :class:`BackendUnavailable` before
        :meth:`start`, :class:`UnsupportedFeature` without a tokenizer or a template,
        ``ValueError`` when the template fails (naming ``chat_template``).
        """
        self._require_core()
        tok = self._require_tokenizer("render_chat")
        if self.chat_template_source is None:
            raise UnsupportedFeature(f"{self.model_name} has no chat template; pass "
                                     "Engine(chat_template=...)")
        return tok.render_chat(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                               chat_template=self._chat_template_source, **template_kwargs)

    @property
    def tokenizer(self) -> Tokenizer | None:
        """The engine's tokenizer (None for dummy weights); available after :meth:`start`."""
        return self._tokenizer

    @property
    def failure(self) -> BaseException | None:
        """The error that stopped the engine loop; ``None`` while it is healthy, not yet
        started, or closed cleanly. Read-only; never waits."""
        if self._failed is not None:
            return self._failed
        return self._core.failure if self._core is not None else None

    def statistics(self) -> EngineStatistics:
        """A frozen snapshot: requests, KV slots, token counts, cache hit rate, passes.

        After the loop failed, or the engine closed, the last snapshot it took. Raises
        :class:`BackendUnavailable` before :meth:`start`.
        """
        if self._core is not None:
            return self._core.statistics()
        if self._last_statistics is not None:
            return self._last_statistics
        return self._require_core().statistics()

    async def flush_cache(self) -> int:
        """Evict every cached prefix no request uses; returns the number of freed tokens."""
        return await self._command(self._require_core().flush_cache)

    async def check_integrity(self) -> IntegrityReport:
        """Check the engine's KV accounting between two steps (waits for the loop to reach it).

        Returns an :class:`~aiolm.engine.core.IntegrityReport`; raises ``RuntimeError``
        naming the broken invariant: a radix-cache invariant, a slot both free and cached or
        freed twice, a table row without its request, or, once idle, slots or locks still
        held (a leak). For tests, soaks and debugging; cheap enough to call between programs.
        """
        value = await self._command(self._require_core().check)
        if isinstance(value, RuntimeError):
            raise value
        return value

    # ------------------------------------------------------------------ generation
    def stream(self, request: GenerateRequest | str | Sequence[int] | None = None, /, *,
               prompt: str | None = None, input_ids: Sequence[int] | None = None,
               constraint: Constraint | None = None, prompt_logprobs: bool = False,
               **sampling: Any) -> contextlib.AbstractAsyncContextManager[AsyncIterator[Chunk]]:
        """Stream a completion: ``async with engine.stream(prompt, max_tokens=...) as chunks``.

        Takes a :class:`GenerateRequest`, or a prompt (text or token ids) with sampling
        options. ``prompt_logprobs``: the first chunk carries the raw logprob of every
        prompt token (see :attr:`GenerateRequest.prompt_logprobs`); with ``max_tokens=0``
        the request only scores its prompt. Validation errors (``ValueError``,
        ``ContextLengthExceeded``, ...) raise on entry. Leaving the block early aborts the
        request and frees its KV slots.
        """
        req = as_request(request, prompt, input_ids, constraint, sampling,
                         prompt_logprobs=prompt_logprobs)
        return self._open(req)

    async def generate(self, request: GenerateRequest | str | Sequence[int] | None = None, /,
                       *, prompt: str | None = None, input_ids: Sequence[int] | None = None,
                       constraint: Constraint | None = None, prompt_logprobs: bool = False,
                       **sampling: Any) -> Completion:
        """Run one request to the end; same arguments as :meth:`stream`."""
        req = as_request(request, prompt, input_ids, constraint, sampling,
                         prompt_logprobs=prompt_logprobs)
        # One wake-up for the whole completion, not one per engine step: the event loop's
        # work per token is what limits a busy engine's throughput.
        async with self._open(req, final_only=True) as chunks:
            whole = await chunks.whole()
        return Completion(text=whole.text, token_ids=whole.token_ids, logprobs=whole.logprobs,
                          finish_reason=whole.finish_reason, usage=whole.usage or Usage(),
                          matched_stop=whole.matched_stop,
                          prompt_logprobs=whole.prompt_logprobs)

    async def prefill(self, prefix: GenerateRequest) -> None:
        """Compute and cache ``prefix``'s prompt (a fork's shared prefix, its images
        included); nothing if empty."""
        self._refuse_images(prefix)
        ids = await self._encode(prefix)
        if not ids:
            return
        ids, mm = await self._with_images(ids, prefix)
        await self._run_to_end(self._require_core().new_request(
            new_request_id(), ids, SamplingParams(max_tokens=0), mm=mm))

    async def score(self, prefix: GenerateRequest, continuations: Sequence[str],
                    method: str = "token_length_normalized") -> ScoreResult:
        """Score ``continuations`` after ``prefix``: the prefix is prefilled once, then all
        continuations are scored in one batch (and, for ``unconditional_normalized``, also
        with no prompt)."""
        if method not in SELECT_METHODS:
            raise ValueError(f"method: expected one of {', '.join(SELECT_METHODS)}, got {method!r}")
        if not continuations:
            raise ValueError("continuations: need at least one choice")
        self._refuse_images(prefix)
        core = self._require_core()
        tok = self._require_tokenizer("select")

        def encode() -> tuple[list[int], list[list[int]]]:
            if prefix.input_ids is not None:
                ids = list(prefix.input_ids)
                return ids, [ids + tok.encode(c) for c in continuations]
            # The prompt once (and with the first choice), not once per choice.
            return tok.encode_continuations(self._prompt_text(prefix), continuations)

        chars = _text_chars(prefix)
        self._refuse_overlong(chars + max(len(c) for c in continuations))
        prefix_ids, fulls = (encode() if chars + sum(map(len, continuations)) <= _INLINE_ENCODE_CHARS
                             else await anyio.to_thread.run_sync(encode))
        mms: list[Any] = [None] * len(fulls)
        if prefix.images:
            # Each choice's prompt gets the prefix's images in place (the same pad ids: the
            # radix cache shares them); only the choices' own tokens are scored.
            loaded = self._loaded
            assert loaded is not None   # _refuse_images let a multimodal model's prefix in
            prefix_ids, *expanded = await anyio.to_thread.run_sync(lambda: [
                self._prepare_images(loaded, ids, prefix.images)
                for ids in (prefix_ids, *fulls)])
            prefix_ids = prefix_ids[0]
            fulls, mms = [ids for ids, _ in expanded], [mm for _, mm in expanded]
        shared = min(common_prefix_length(prefix_ids, f) for f in fulls)
        if shared == 0:  # nothing to condition on: start from a context token
            ctx = [self._context_token()]
            fulls, shared = [ctx + f for f in fulls], 1
        conts = [f[shared:] for f in fulls]
        await self._run_to_end(core.new_request(new_request_id(), fulls[0][:shared],
                                                SamplingParams(max_tokens=0),
                                                mm=_items_before(mms[0], shared)))
        scoring = [core.new_request(new_request_id(), f, SamplingParams(max_tokens=0),
                                    return_all_logits=True, max_prefix_match=shared - 1,
                                    mm=mm)
                   for f, c, mm in zip(fulls, conts, mms, strict=True) if c]
        unconditional = []
        if method == "unconditional_normalized":
            ctx = [self._context_token()]
            unconditional = [core.new_request(new_request_id(), ctx + c,
                                              SamplingParams(max_tokens=0),
                                              return_all_logits=True, max_prefix_match=0)
                             for c in conts if c]
        finals = await self._run_all(scoring + unconditional)
        cond_final, unc_final = finals[: len(scoring)], finals[len(scoring):]
        return score_result(method, conts, shared, cond_final, unc_final)

    # ------------------------------------------------------------------ internals
    @contextlib.asynccontextmanager
    async def _open(self, request: GenerateRequest, *,
                    final_only: bool = False) -> AsyncIterator[AsyncIterator[Chunk]]:
        core = self._require_core()
        self._refuse_images(request)
        ids = await self._encode(request)
        ids, mm = await self._with_images(ids, request)
        matcher = None
        if request.constraint is not None:
            # A user's own constraint may need no tokenizer (dummy weights pass None).
            matcher = await anyio.to_thread.run_sync(
                request.constraint.compile_for, self._tokenizer, self.config.constraint_limits)
        req = core.new_request(request.request_id, ids, request.sampling, matcher=matcher,
                               prompt_logprobs=request.prompt_logprobs, mm=mm)
        mailbox = self._submit(req, final_only=final_only)
        chunks = ChunkStream(mailbox)
        try:
            yield chunks
        finally:
            self._release(req.rid, mailbox, abort=not chunks.done)

    async def _encode(self, request: GenerateRequest) -> list[int]:
        """The prompt's token ids; a long text is encoded on a worker thread, so that one
        large prompt never stalls the event loop (8 MB of text takes seconds), and a text
        too long for the context is refused before it is encoded at all."""
        if request.input_ids is not None:
            return list(request.input_ids)
        chars = _text_chars(request)
        self._refuse_overlong(chars)
        if chars > _INLINE_ENCODE_CHARS:
            return await anyio.to_thread.run_sync(self._prompt_ids, request)
        return self._prompt_ids(request)


def _with_model_image_token(template: Any, loaded: LoadedModel) -> Any:
    """``template`` writing images as the model's own image token, where the tokenizer has
    that token as a control token (Qwen2.5-VL's ``<|image_pad|>``; LLaVA's ``<image>``): a
    chat's image then encodes to the model's image token id, which
    :func:`~aiolm.engine.multimodal.prepare_multimodal` replaces in place. Otherwise (a
    text model, no tokenizer, or an id the tokenizer holds as ordinary text) unchanged."""
    token_id = getattr(loaded.model, "image_token_id", None)
    if token_id is None or loaded.tokenizer is None or not is_multimodal(loaded.model):
        return template
    text = loaded.tokenizer.special_token_text(int(token_id))
    if text is None or text == template.image_token:
        return template
    return attrs.evolve(template, image_token=text)


def _items_before(mm: Any, end: int) -> Any:
    """``mm`` (a request's :class:`~aiolm.engine.multimodal.MultimodalInputs`, or None)
    for a prompt cut at ``end``: the items whose placeholders lie before it (None for none).
    Raises ``ValueError`` for an item the cut splits."""
    if mm is None:
        return None
    items = [item for item in mm.items if item.offset < end]
    if any(item.offset + item.length > end for item in items):
        raise ValueError("select: the choices diverge inside an image's placeholders")
    return attrs.evolve(mm, items=items) if items else None


def _release_device_memory(device: torch.device) -> None:
    """Give a closed CUDA engine's memory back: collect its reference cycles (the KV pool
    and the CUDA graphs' pool die with them) and empty torch's block cache, so the next
    engine in this process sizes its KV pool from the memory really free (it read a pool
    several times smaller when the last one's blocks were still cached). Nothing on the
    CPU: the pool goes with its last reference, and a full collection there costs a tenth
    of a second or more per close (the test suite closes engines by the thousand)."""
    if device.type != "cuda":
        return
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()
