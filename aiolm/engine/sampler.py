"""Sampling the next token of each request: host-side preparation, device-side sampling.

:meth:`Sampler.prepare` (host) turns the batch's :class:`~aiolm.sampling.SamplingParams` into
per-row tensors once per batch composition and updates only what changes from step to step
(penalty counts, the ``min_tokens`` mask). :meth:`Sampler.sample` (device) applies penalties,
``logit_bias``, the constraint bitmask, temperature, top-k, top-p and min-p, and draws the
tokens without any host synchronisation: the runner fetches the results with one copy per
step.

On a GPU, draws use the exponential race (``argmax(p / q)`` with ``q ~ Exp(1)``), which
samples from ``p`` without a cumulative search. On the CPU, where a random number per
vocabulary entry costs more than the rest of the sampling, they use the inverse CDF (one
uniform a row, a cumulative sum and a search). A seeded request draws from its own
``torch.Generator``, so its output does not depend on the requests it is batched with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs
import numpy as np
import torch

if TYPE_CHECKING:
    from .request import Req

__all__ = ["SampleOutput", "Sampler", "SamplingBatchInfo", "apply_token_bitmask", "token_logprobs",
           "top_token_logprobs"]

_BITS = 32


@attrs.define(eq=False, kw_only=True)
class SamplingBatchInfo:
    """Per-row sampling tensors of one batch composition (built on the host, live on the device).

    ``rids`` identifies the composition; rows follow the order of the requests given to
    :meth:`Sampler.prepare`.
    """

    rids: tuple[str, ...]
    all_greedy: bool
    greedy_mask: torch.Tensor                  # [bs] bool
    any_greedy: bool = True                    # False: no row takes the argmax
    temperatures: torch.Tensor                 # [bs, 1] float (1.0 on greedy rows)
    top_ks: torch.Tensor | None                # [bs, 1] int64 (vocab size where disabled)
    top_ps: torch.Tensor | None                # [bs, 1] float
    min_ps: torch.Tensor | None                # [bs, 1] float
    frequency_penalties: torch.Tensor | None   # [bs, 1] float
    presence_penalties: torch.Tensor | None    # [bs, 1] float
    output_counts: torch.Tensor | None         # [bs, vocab] float: occurrences in output_ids
    counted: list[int]                         # output tokens already in ``output_counts``
    generators: list[torch.Generator | None]   # per row: the request's own generator, if seeded
    top_logprobs: int                          # the most top logprobs any row asks for
    want_logprobs: bool
    # logit_bias of every row as (row, token) -> bias; None when no row has one.
    bias_rows: torch.Tensor | None = None      # [n] int64
    bias_tokens: torch.Tensor | None = None    # [n] int64
    bias_values: torch.Tensor | None = None    # [n] float
    # Rebuilt every step: (row, token) pairs banned until the row reaches ``min_tokens``.
    suppress_rows: torch.Tensor | None = None
    suppress_tokens: torch.Tensor | None = None


@attrs.define(eq=False, kw_only=True)
class SampleOutput:
    """Device tensors of one sampling step (fetched to the host by the runner)."""

    next_ids: torch.Tensor                     # [bs] int64
    logprobs: torch.Tensor | None = None       # [bs] float: logprob of the chosen token
    top_ids: torch.Tensor | None = None        # [bs, k] int64
    top_logprobs: torch.Tensor | None = None   # [bs, k] float


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set the logits of disallowed tokens to -inf, in place.

    ``bitmask`` is int32 ``[bs, words]``; bit ``t % 32`` of word ``t // 32`` set means token
    ``t`` is allowed. Tokens past ``32 * words`` are disallowed.
    """
    bs, vocab = logits.shape
    on_cpu = logits.device.type == "cpu" and bitmask.device.type == "cpu"
    if on_cpu:
        # numpy unpacks the bits in one pass (little-endian words: byte 0 holds tokens
        # 0-7), and a select writes the row: on this 2-core CPU 1.0 ms for 32 rows of
        # 49,152 tokens all allowed (the shift-and-mask below: 1.8 ms), 5.7 ms for random
        # bits (8.2 ms).
        words = bitmask.to(torch.int32).contiguous().numpy()
        bits = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")
        allowed = torch.from_numpy(bits).view(bs, -1).bool()
    else:
        shifts = torch.arange(_BITS, device=logits.device, dtype=torch.int32)
        words = bitmask.to(device=logits.device, dtype=torch.int32, non_blocking=True)
        allowed = ((words.unsqueeze(-1) >> shifts) & 1).bool().view(bs, -1)
    covered = min(vocab, allowed.shape[1])
    head, allowed = logits[:, :covered], allowed[:, :covered]
    if on_cpu:
        head.copy_(torch.where(allowed, head, float("-inf")))
    else:
        head.masked_fill_(~allowed, float("-inf"))
    if covered < vocab:
        logits[:, covered:] = float("-inf")


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw (unprocessed) logprobs of ``targets`` under ``logits`` rows, and greedy agreement.

    ``logits``: [n, vocab]; ``targets``: [n] int64. Returns ``(logprobs [n] float,
    is_argmax [n] bool)``. Used for scoring, where no sampling parameter applies.
    """
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, targets.view(-1, 1)).view(-1)
    return chosen, lp.argmax(dim=-1) == targets


def top_token_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most likely tokens of each ``logits`` row with their raw logprobs.

    ``logits``: [n, vocab]. Returns ``(logprobs [n, k] float, ids [n, k] int64)``, most
    likely first. The top-k of the logits are those of the logprobs (log_softmax is
    monotone), so only the normaliser is computed over the whole row.
    """
    logits = logits.float()
    values, ids = logits.topk(k, dim=-1)
    return values - torch.logsumexp(logits, dim=-1, keepdim=True), ids


class Sampler:
    """Chooses next tokens for a batch of requests.

    One per engine; used by the engine thread only. ``eos_token_ids`` are banned (with the
    request's ``stop_token_ids``) until a request has ``min_tokens`` output tokens.
    """

    def __init__(self, *, vocab_size: int, device: torch.device | str, seed: int,
                 eos_token_ids: Sequence[int] = ()) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.eos_token_ids = tuple(eos_token_ids)
        self._generator = torch.Generator(self.device)
        self._generator.manual_seed(seed)
        self._req_generators: dict[str, torch.Generator] = {}
        self._info: SamplingBatchInfo | None = None

    def release(self, rid: str) -> None:
        """Forget a finished request's generator."""
        self._req_generators.pop(rid, None)

    # ------------------------------------------------------------------ host side
    def prepare(self, reqs: Sequence[Req]) -> SamplingBatchInfo:
        """Build (or update) the sampling tensors for ``reqs``, in row order. Host side.

        Reuses the previous step's tensors when the composition is unchanged; only the
        penalty counts of new output tokens and the ``min_tokens`` mask are updated. Raises
        what building a row raises; the runner then prepares each request alone to find the
        one that fails (see ``ModelRunner.run``), so nothing half-built is kept.
        """
        rids = tuple(r.rid for r in reqs)
        info = self._info
        try:
            if (info is None or info.rids != rids
                    or any(len(r.output_ids) < n
                           for r, n in zip(reqs, info.counted, strict=True))):
                info = self._build(reqs, rids)
                self._info = info
            if info.output_counts is not None:
                self._count_new_outputs(info, reqs)
            self._build_suppression(info, reqs)
        except BaseException:
            self._info = None
            raise
        return info

    def _build(self, reqs: Sequence[Req], rids: tuple[str, ...]) -> SamplingBatchInfo:
        params = [r.sampling for r in reqs]
        dev = self.device
        greedy = [p.greedy for p in params]

        def column(values: list[float] | list[int], dtype: torch.dtype) -> torch.Tensor:
            return self._on_device(values, dtype).view(-1, 1)

        sampled = [p for p, g in zip(params, greedy, strict=True) if not g]
        need_top_k = any(0 < p.top_k < self.vocab_size for p in sampled)
        need_top_p = any(p.top_p < 1.0 for p in sampled)
        need_min_p = any(p.min_p > 0.0 for p in sampled)
        need_penalty = any(p.frequency_penalty or p.presence_penalty for p in params)
        generators: list[torch.Generator | None] = []
        for r, g in zip(reqs, greedy, strict=True):
            if g or r.sampling.seed is None:
                generators.append(None)
                continue
            gen = self._req_generators.get(r.rid)
            if gen is None:
                gen = torch.Generator(dev)
                gen.manual_seed(r.sampling.seed)
                self._req_generators[r.rid] = gen
            generators.append(gen)
        bias_rows: list[int] = []
        bias_tokens: list[int] = []
        bias_values: list[float] = []
        for row, p in enumerate(params):
            # Ids past the vocabulary were refused when the request was submitted.
            for token, bias in p.logit_bias:
                bias_rows.append(row)
                bias_tokens.append(token)
                bias_values.append(bias)
        biased = bool(bias_rows)
        return SamplingBatchInfo(
            rids=rids,
            all_greedy=all(greedy), any_greedy=any(greedy),
            greedy_mask=torch.tensor(greedy, dtype=torch.bool).to(dev, non_blocking=True),
            temperatures=column(
                [1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)],
                torch.float32),
            top_ks=column([p.top_k if 0 < p.top_k < self.vocab_size else self.vocab_size
                           for p in params], torch.int64) if need_top_k else None,
            top_ps=column([p.top_p for p in params], torch.float32) if need_top_p else None,
            min_ps=column([p.min_p for p in params], torch.float32) if need_min_p else None,
            frequency_penalties=column([p.frequency_penalty for p in params], torch.float32)
            if need_penalty else None,
            presence_penalties=column([p.presence_penalty for p in params], torch.float32)
            if need_penalty else None,
            output_counts=torch.zeros(len(reqs), self.vocab_size, dtype=torch.float32, device=dev)
            if need_penalty else None,
            counted=[0] * len(reqs),
            generators=generators,
            top_logprobs=max((p.top_logprobs for p in params), default=0),
            want_logprobs=any(p.logprobs or p.top_logprobs for p in params),
            bias_rows=self._on_device(bias_rows, torch.int64) if biased else None,
            bias_tokens=self._on_device(bias_tokens, torch.int64) if biased else None,
            bias_values=self._on_device(bias_values, torch.float32) if biased else None,
        )

    def _on_device(self, values: list[int] | list[float], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    def _count_new_outputs(self, info: SamplingBatchInfo, reqs: Sequence[Req]) -> None:
        # Only the rows with a penalty are counted: the others multiply their counts by 0,
        # and may hold placeholders (tokens in flight, negative ids) of the overlapped loop,
        # which never lets a request with a penalty run ahead of its tokens.
        rows: list[int] = []
        toks: list[int] = []
        for i, r in enumerate(reqs):
            if not (r.sampling.frequency_penalty or r.sampling.presence_penalty):
                continue
            new = r.output_ids[info.counted[i]:]
            if new and min(new) < 0:
                raise RuntimeError(f"request {r.rid}: a penalty needs its output tokens, and "
                                   "one is still in flight")
            rows.extend([i] * len(new))
            toks.extend(new)
            info.counted[i] = len(r.output_ids)
        if toks:
            assert info.output_counts is not None
            index = torch.tensor([rows, toks], dtype=torch.int64).to(self.device, non_blocking=True)
            info.output_counts.index_put_(
                (index[0], index[1]),
                torch.ones(len(toks), dtype=torch.float32, device=self.device),
                accumulate=True,
            )

    def _build_suppression(self, info: SamplingBatchInfo, reqs: Sequence[Req]) -> None:
        rows: list[int] = []
        toks: list[int] = []
        for i, r in enumerate(reqs):
            p = r.sampling
            if len(r.output_ids) >= p.min_tokens:
                continue
            banned = set(p.stop_token_ids)
            if not p.ignore_eos:
                banned.update(self.eos_token_ids)
            banned = {t for t in banned if t < self.vocab_size}
            rows.extend([i] * len(banned))
            toks.extend(sorted(banned))
        if toks:
            index = torch.tensor([rows, toks], dtype=torch.int64).to(self.device, non_blocking=True)
            info.suppress_rows, info.suppress_tokens = index[0], index[1]
        else:
            info.suppress_rows = info.suppress_tokens = None

    # ---------------------------------------------------------------- device side
    def sample(self, logits: torch.Tensor, info: SamplingBatchInfo,
               bitmask: torch.Tensor | None = None) -> SampleOutput:
        """Choose one token per row of ``logits`` ([bs, vocab] float32). No host sync.

        Order: frequency/presence penalties (over the row's output tokens), ``logit_bias``,
        the constraint ``bitmask`` and the ``min_tokens`` ban (-inf: a constraint or the ban
        wins over any bias), then greedy rows take the argmax and the others are drawn after
        temperature, top-k, top-p and min-p.

        Logprobs (when any row asks) are the ``log_softmax`` of the *processed* logits:
        after penalties, the bias, the masks and temperature (1 for greedy rows), before the
        top-k / top-p / min-p truncation, so alternatives outside the truncation keep finite
        values.
        """
        logits = logits.float()
        if logits.shape[1] > self.vocab_size:
            logits = logits[:, : self.vocab_size]
        owned = False  # whether ``logits`` is our own tensor, which the masks may write
        if info.output_counts is not None:
            assert info.frequency_penalties is not None and info.presence_penalties is not None
            counts = info.output_counts
            logits = (logits - info.frequency_penalties * counts
                      - info.presence_penalties * (counts > 0).float())
            owned = True
        if info.bias_rows is not None:
            # Each (row, token) appears once, so a gather and a put add the biases (no sort,
            # no host sync).
            index = (info.bias_rows, info.bias_tokens)
            logits = logits.index_put(index, logits[index] + info.bias_values)
            owned = True
        if not owned and (bitmask is not None or info.suppress_rows is not None):
            logits = logits.clone()  # masks below write in place; keep the caller's tensor
        if bitmask is not None:
            apply_token_bitmask(logits, bitmask)
        if info.suppress_rows is not None:
            logits[info.suppress_rows, info.suppress_tokens] = float("-inf")

        if info.all_greedy:
            next_ids = logits.argmax(dim=-1)
            scaled = logits
        else:
            scaled = logits / info.temperatures
            next_ids = self._draw(scaled, info)
            if info.any_greedy:
                next_ids = torch.where(info.greedy_mask, logits.argmax(dim=-1), next_ids)

        out = SampleOutput(next_ids=next_ids)
        if info.want_logprobs:
            lp = torch.log_softmax(scaled, dim=-1)
            out.logprobs = lp.gather(1, next_ids.view(-1, 1)).view(-1)
            if info.top_logprobs:
                out.top_logprobs, out.top_ids = lp.topk(info.top_logprobs, dim=-1)
        return out

    def _draw(self, scaled: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
        probs = torch.softmax(scaled, dim=-1)
        if info.top_ks is not None or info.top_ps is not None:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            drop = torch.zeros_like(sorted_probs, dtype=torch.bool)
            if info.top_ks is not None:
                ranks = torch.arange(probs.shape[1], device=probs.device).view(1, -1)
                drop |= ranks >= info.top_ks
            if info.top_ps is not None:
                # Keep the smallest head whose mass reaches top_p (the first token always stays).
                before = sorted_probs.cumsum(dim=-1) - sorted_probs
                drop |= before > info.top_ps
            if info.min_ps is not None:
                drop |= sorted_probs < info.min_ps * sorted_probs[:, :1]
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
        elif info.min_ps is not None:
            probs = probs.masked_fill(probs < info.min_ps * probs.amax(dim=-1, keepdim=True), 0.0)

        if probs.device.type == "cpu":
            return self._draw_inverse_cdf(probs, info)
        noise = torch.empty_like(probs)
        noise.exponential_(generator=self._generator)
        for row, gen in enumerate(info.generators):
            if gen is not None:
                noise[row].exponential_(generator=gen)
        return (probs / noise.clamp_min_(1e-20)).argmax(dim=-1)

    def _draw_inverse_cdf(self, probs: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
        """One token a row by the inverse of its cumulative distribution: one uniform a row.

        The CPU's draw. The exponential race above needs a random number per vocabulary
        entry, and the CPU's ``exponential_`` over 32 x 49,152 entries took 25 ms (a
        cumulative sum and a search: 1.3 ms), a fifth of a batch-32 decode step of SmolLM2
        on two cores. Both are exact samplers; a seeded request draws from its own generator.
        """
        uniform = torch.empty((probs.shape[0], 1), dtype=probs.dtype, device=probs.device)
        uniform.uniform_(generator=self._generator)
        for row, gen in enumerate(info.generators):
            if gen is not None:
                uniform[row].uniform_(generator=gen)
        cdf = probs.cumsum(dim=-1)
        total = cdf[:, -1:]
        # Below the total, strictly: the first entry of the CDF past the target then has
        # mass of its own (a rounded draw at the top would land past the last token with
        # mass, on one the masks or the truncation removed).
        target = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
        return torch.searchsorted(cdf, target, right=True).view(-1)
