"""The host side of a :class:`~aiolm.engine.runner.ModelRunner` pass around the model.

:class:`StepIO` is the part of the runner that turns a scheduled batch into the device
inputs of its pass (:class:`~aiolm.engine.forward_batch.ForwardBatch`, the placeholders
of a pass in flight resolved on the device), prepares its sampling, picks the rows and
targets of scoring requests, starts the one device → host copy of the results and
unpacks them into a :class:`~aiolm.engine.step_output.StepOutput`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .forward_batch import ForwardBatch, ForwardMode
from .multimodal import pass_embeddings
from .shared_prefix import find_groups, prefix_groups
from .step_output import SampledToken, ScoredTokens, StepOutput

if TYPE_CHECKING:
    from ..cache.pool import KVPool, ReqToTokenPool
    from .request import Req
    from .sampler import Sampler
    from .scheduler import ScheduleBatch
    from .step_output import LaunchedStep

__all__ = ["StepIO"]


class StepIO:
    """The batch-to-device and results-to-host methods of
    :class:`~aiolm.engine.runner.ModelRunner` (a mixin: the state it reads is the
    runner's, set up by ``ModelRunner.__init__``)."""

    device: torch.device
    model: Any
    sampler: Sampler
    kv_pool: KVPool
    req_to_token_pool: ReqToTokenPool
    shared_prefix_min_tokens: int
    shared_prefix_members: int

    def _prepare_sampling(self, reqs: Sequence[Req],
                          rows: list[int]) -> tuple[Any, dict[int, Exception]]:
        """The sampler's tensors for ``rows``, and the rows whose requests broke them.

        One ``prepare`` for the batch; only when it raises is each request prepared alone
        to find the ones that fail, and the batch prepared again without them (an error
        that is no one request's propagates).
        """
        try:
            return self.sampler.prepare([reqs[i] for i in rows]), {}
        except Exception:
            pass
        failed: dict[int, Exception] = {}
        for i in rows:
            try:
                self.sampler.prepare([reqs[i]])
            except Exception as exc:
                failed[i] = exc
        kept = [reqs[i] for i in rows if i not in failed]
        return (self.sampler.prepare(kept) if kept else None), failed

    def _h2d(self, values: list[int]) -> torch.Tensor:
        """An int64 device tensor of ``values``, copied without waiting for the device."""
        return torch.tensor(values, dtype=torch.int64).to(self.device, non_blocking=True)

    def _score_spans(self, batch: ScheduleBatch,
                     rows: Sequence[int]) -> list[tuple[int, int, int, list[int]]]:
        """Per scoring row: (batch row, first logits row, end logits row, target ids)."""
        spans = []
        starts = [0]
        for n in batch.extend_lens:
            starts.append(starts[-1] + n)
        for i in rows:
            req = batch.reqs[i]
            prefix, ext = batch.prefix_lens[i], batch.extend_lens[i]
            ids = req.all_ids
            # Row j (position prefix + j) predicts token prefix + j + 1, known while < len(ids).
            n = min(ext, len(ids) - prefix - 1)
            if n > 0:
                targets = ids[prefix + 1: prefix + 1 + n]
                if req.mm is not None:  # an image's pad ids are no token: score them as 0
                    vocab = self.sampler.vocab_size
                    targets = [t if t < vocab else 0 for t in targets]
                spans.append((i, starts[i], starts[i] + n, targets))
        return spans

    def _start_copy(self, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], Any]:
        """Start the one device → host crossing of the step's results: the host tensors
        (page-locked on CUDA) and the event that says they are there (None on the CPU)."""
        if self.device.type != "cuda":
            return tensors, None
        out = [t.to("cpu", non_blocking=True) for t in tensors]
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        return out, ready

    def _input_ids(self, ids: list[int], previous: LaunchedStep | None) -> torch.Tensor:
        """``ids`` on the device, each placeholder ``-1 - j`` replaced there by the token
        the pass in flight sampled into ``previous.next_ids[j]`` (no host sync).
        ``previous`` is None when no request of the batch has a token in flight."""
        out = torch.tensor(ids, dtype=torch.int64)
        if previous is None:
            return out.to(self.device, non_blocking=True)
        holes = (out < 0).nonzero().view(-1)
        source = -1 - out[holes]
        out[holes] = 0
        out = out.to(self.device, non_blocking=True)
        dev_holes = holes.to(self.device, non_blocking=True)
        dev_source = source.to(self.device, non_blocking=True)
        return out.index_copy_(0, dev_holes, previous.next_ids.index_select(0, dev_source))

    def _unpack(self, host: list[torch.Tensor], sample_rows: list[int], sample_out: Any,
                score_spans: list[tuple[int, int, int, list[int]]], score_top: int,
                batch: ScheduleBatch) -> StepOutput:
        out = StepOutput()
        k = 0
        if sample_rows:
            ids = host[k].tolist()
            k += 1
            lps = tops = top_lps = None
            if sample_out.logprobs is not None:
                lps = host[k].tolist()
                k += 1
            if sample_out.top_ids is not None:
                tops, top_lps = host[k].tolist(), host[k + 1].tolist()
                k += 2
            for j, row in enumerate(sample_rows):
                params = batch.reqs[row].sampling
                want = params.logprobs or params.top_logprobs
                top = ()
                if tops is not None and params.top_logprobs:
                    top = tuple(zip(tops[j][: params.top_logprobs],
                                    top_lps[j][: params.top_logprobs], strict=True))
                out.sampled[row] = SampledToken(
                    token_id=ids[j], logprob=lps[j] if (want and lps is not None) else None,
                    top=top,
                )
        if score_spans:
            lp, greedy = host[k].tolist(), host[k + 1].tolist()
            top_lps, top_ids = ((host[k + 2].tolist(), host[k + 3].tolist()) if score_top
                                else ([], []))
            offset = 0
            for row, a, b, _ in score_spans:
                n = b - a
                want = batch.reqs[row].sampling.top_logprobs
                out.scored[row] = ScoredTokens(
                    first=batch.prefix_lens[row] + 1,
                    logprobs=tuple(lp[offset:offset + n]),
                    greedy=tuple(greedy[offset:offset + n]),
                    top=tuple(tuple(zip(top_ids[j][:want], top_lps[j][:want], strict=True))
                              for j in range(offset, offset + n)) if want else (),
                )
                offset += n
        return out

    def _forward_batch(self, batch: ScheduleBatch,
                       previous: LaunchedStep | None = None) -> ForwardBatch:
        reqs: Sequence[Req] = batch.reqs
        prefix_lens = list(batch.prefix_lens)
        extend_lens = list(batch.extend_lens)
        seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens, strict=True)]
        input_ids: list[int] = []
        positions: list[int] = []
        if batch.mode is ForwardMode.DECODE:
            input_ids = [r.all_ids[p] for r, p in zip(reqs, prefix_lens, strict=True)]
            positions = prefix_lens
        else:
            for r, p, e in zip(reqs, prefix_lens, extend_lens, strict=True):
                input_ids.extend(r.all_ids[p:p + e])
                positions.extend(range(p, p + e))
        multimodal = any(r.mm is not None for r in reqs)
        mm_pass = mrope = None
        shifts: list[tuple[int, int]] = []
        if multimodal:
            shifts = [(r.prompt_len, r.mm.rope_delta) if r.mm is not None else (0, 0)
                      for r in reqs]
            positions = list(positions)   # a decode pass's are its prefix_lens
            _shift_positions(positions, shifts, extend_lens)
            if batch.mode is ForwardMode.EXTEND:
                mm_pass = pass_embeddings(self.model, reqs, prefix_lens, extend_lens)
                mrope = _mrope_positions(reqs, prefix_lens, extend_lens, positions)
        dev = self.device

        def on_device(values: list[int], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(dev, non_blocking=True)

        in_flight = any(r.pending for r in reqs)
        if in_flight and (previous is None or previous.next_ids is None):
            raise RuntimeError("a request of the batch has a token in flight, but no pass "
                               "is in flight to take it from")
        extend = batch.mode is ForwardMode.EXTEND
        groups = None
        if not extend and self.shared_prefix_min_tokens:
            found = find_groups(reqs, min_tokens=self.shared_prefix_min_tokens,
                                max_members=self.shared_prefix_members)
            groups = prefix_groups(found, seq_lens, dev, width=self.shared_prefix_members)
        return ForwardBatch(
            mode=batch.mode,
            batch_size=len(reqs),
            input_ids=self._input_ids(input_ids, previous if in_flight else None),
            positions=on_device(positions, torch.int64),
            out_cache_loc=batch.out_cache_loc.to(dev, torch.int64),
            req_pool_indices=on_device([r.req_pool_idx for r in reqs], torch.int64),
            seq_lens=on_device(seq_lens, torch.int32),
            extend_prefix_lens=on_device(prefix_lens, torch.int32) if extend else None,
            extend_seq_lens=on_device(extend_lens, torch.int32) if extend else None,
            seq_lens_cpu=seq_lens,
            extend_prefix_lens_cpu=prefix_lens if extend else [],
            extend_seq_lens_cpu=extend_lens if extend else [],
            return_logits="all" if any(r.return_all_logits for r in reqs) else "last",
            kv_pool=self.kv_pool,
            req_to_token_pool=self.req_to_token_pool,
            mm_embeds=mm_pass[0] if mm_pass is not None else None,
            mm_rows=mm_pass[1] if mm_pass is not None else None,
            mrope_positions=mrope.to(dev, non_blocking=True) if mrope is not None else None,
            rope_shifts_cpu=shifts if any(d for _, d in shifts) else [],
            prefix_groups=groups,
        )


def _shift_positions(positions: list[int], shifts: list[tuple[int, int]],
                     extend_lens: Sequence[int]) -> None:
    """Add each request's ``rope_delta`` to its positions past its prompt, in place."""
    k = 0
    for (prompt_len, delta), e in zip(shifts, extend_lens, strict=True):
        if delta:
            for j in range(k, k + e):
                if positions[j] >= prompt_len:
                    positions[j] += delta
        k += e


def _mrope_positions(reqs: Sequence[Req], prefix_lens: Sequence[int],
                     extend_lens: Sequence[int], positions: list[int]) -> torch.Tensor | None:
    """The pass's ``[3, num_tokens]`` M-RoPE positions, or None when no request has them:
    prompt rows from the request's table, every other row its (shifted) position on all
    three sections."""
    if not any(r.mm is not None and r.mm.mrope_positions is not None for r in reqs):
        return None
    out = torch.tensor(positions, dtype=torch.int64).unsqueeze(0).repeat(3, 1)
    k = 0
    for r, p, e in zip(reqs, prefix_lens, extend_lens, strict=True):
        table = r.mm.mrope_positions if r.mm is not None else None
        if table is not None and p < r.prompt_len:
            end = min(p + e, r.prompt_len)
            out[:, k:k + end - p] = table[:, p:end]
        k += e
    return out
