"""Constraint masks for a whole batch, and jump-forward after sampling (engine thread only).

Each step the runtime asks :meth:`GrammarBackend.fill_bitmask` for the int32 bitmask of the
rows about to be sampled (the sampler applies it on the device). Every matcher, built in or
a user's own, goes the same way (:class:`~aiolm.constraints.Matcher`): a row with one
forced token is a one-bit write, rows of llguidance matchers are computed together by
llguidance's thread pool with the GIL released, the others fill their rows one by one. After
sampling, :meth:`GrammarBackend.after_sample` advances a request's matcher and says which
tokens to drop and append (jump-forward).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np
import torch

from ..constraints._llg_matcher import set_single_token
from ..errors import ConstraintError

if TYPE_CHECKING:
    from ..constraints.base import Matcher
    from .request import Req

__all__ = ["GrammarBackend", "JumpForward"]


@attrs.frozen(kw_only=True)
class JumpForward:
    """What to do with a request's ``output_ids`` after its sampled token was advanced.

    Drop the last ``rollback`` tokens, then append ``append`` (the matcher has already
    advanced through them). ``ok`` is False when a token broke the constraint (the sampler
    ignored the mask, the grammar engine hit a limit, or the finished value failed the
    constraint's check): the request must end, its output is not valid; ``reason`` is the
    matcher's own account (:meth:`~aiolm.constraints.Matcher.error`). ``finished`` is True
    when the constraint is complete (only EOS may follow).
    """

    ok: bool = True
    rollback: int = 0
    append: tuple[int, ...] = ()
    finished: bool = False
    reason: str = ""


_NOTHING = JumpForward()
_FINISHED = JumpForward(finished=True)


class GrammarBackend:
    """Batched constraint masks and jump-forward decisions for the engine loop.

    ``vocab_size`` is the model's (the width of the logits); the bitmask has
    ``ceil(vocab_size / 32)`` words per row. ``device`` is where the sampler runs.
    ``jump_forward=False`` is the ablation: forced tokens are then decoded one forward pass
    each (the masks admit only the next forced token, so the text is the same either way).
    """

    def __init__(self, vocab_size: int, *, jump_forward: bool = True,
                 num_threads: int | None = None,
                 device: torch.device | str | None = None) -> None:
        if not isinstance(vocab_size, int) or vocab_size <= 0:
            raise ValueError(f"vocab_size: expected a positive int, got {vocab_size!r}")
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self.jump_forward = jump_forward
        # llguidance's pool takes 80% of the cores by default; with fewer than two threads
        # handing rows to it only adds a thread switch, so they are computed here in turn.
        threads = num_threads if num_threads is not None else int(0.8 * (os.cpu_count() or 1))
        self._parallel = threads >= 2
        self._num_threads = num_threads
        self._executor: Any = None
        self._pin = torch.cuda.is_available()
        dev = torch.device(device) if device is not None else None
        self._device = dev if dev is not None and dev.type == "cuda" else None

    # ------------------------------------------------------------------ masks
    def bitmask_for(self, reqs: Sequence[Req]) -> torch.Tensor | None:
        """The bitmask of ``reqs`` in row order, or None when none is constrained.

        The signature of the runner's ``bitmask_fn``. Rows of unconstrained requests allow
        every token. With a CUDA ``device`` the mask is already on its way there (an
        asynchronous copy from pinned memory, so the host does not wait for the GPU).
        """
        entries = [(i, r.matcher) for i, r in enumerate(reqs) if r.matcher is not None]
        if not entries:
            return None
        bitmask = self.fill_bitmask(entries, len(reqs))
        if self._device is not None:
            bitmask = bitmask.to(self._device, non_blocking=True)
        return bitmask

    def fill_bitmask(self, entries: Sequence[tuple[int, Matcher]],
                     batch_size: int) -> torch.Tensor:
        """A CPU int32 ``[batch_size, words]`` bitmask (pinned when CUDA is present).

        ``entries`` are ``(row, matcher)`` pairs; rows not listed allow every token. Every
        listed matcher writes its row: a forced token as one bit, llguidance matchers
        (:meth:`~aiolm.constraints.Matcher.llguidance_mask`) in parallel (on machines with
        the cores for it), others in turn. Raises ``ConstraintError`` with the grammar
        engine's message when a matcher cannot compute its mask (a limit it hit).
        """
        bitmask = torch.empty((batch_size, self.words), dtype=torch.int32, pin_memory=self._pin)
        # NOTE: numpy's fill and rows, not torch's: torch parallelises a fill this size over
        # its intra-op threads, which costs milliseconds when the cores are busy, and a
        # torch row costs a microsecond per constrained request per step.
        rows = bitmask.numpy()
        rows.fill(-1)
        parallel: list[tuple[Any, int]] = []  # full-width rows, written in place
        narrow: dict[int, list[tuple[Any, int]]] = {}  # by llguidance's narrower width
        pooled: list[tuple[Any, Matcher]] = []
        for row, matcher in entries:
            token = matcher.only_token()
            if token is not None:
                set_single_token(rows[row], token)
                continue
            ll = matcher.llguidance_mask(self.words)
            if ll is None:
                matcher.fill_next_token_mask(bitmask[row])
                continue
            if isinstance(ll, tuple):
                ll, width = ll
                narrow.setdefault(width, []).append((ll, row))
            else:
                parallel.append((ll, row))
            pooled.append((ll, matcher))
        self._compute(parallel, bitmask.data_ptr(), self.words, batch_size)
        for width, group in narrow.items():
            # llguidance writes exactly its tokenizer's width: compute the group's rows
            # packed, then place them; the tokens past the tokenizer's are never allowed.
            packed = np.empty((len(group), width), dtype=np.int32)
            self._compute([(ll, i) for i, (ll, _) in enumerate(group)], packed.ctypes.data,
                          width, len(group))
            index = [row for _, row in group]
            rows[index, :width] = packed
            rows[index, width:] = 0
        for ll, matcher in pooled:
            if ll.is_error():  # its row is not a mask: the request must end
                raise ConstraintError(f"the constraint failed: {matcher.error()}")
        return bitmask

    def _compute(self, pairs: Sequence[tuple[Any, int]], base: int, words: int,
                 batch_size: int) -> None:
        """llguidance's masks of ``pairs`` (matcher, row) into rows of ``words`` words at
        address ``base``: in its thread pool when there are several and the cores for it."""
        if len(pairs) > 1 and self._parallel:
            self._executor_().unsafe_compute_mask_ptr(list(pairs), base, words * 4, batch_size)
            return
        for ll, row in pairs:  # each call releases the GIL while it computes
            ll.unsafe_compute_mask_ptr(base + row * words * 4, words * 4)

    def _executor_(self) -> Any:
        if self._executor is None:
            import llguidance

            self._executor = llguidance.LLExecutor(self._num_threads)
        return self._executor

    # -------------------------------------------------------------- after sampling
    def after_sample(self, matcher: Matcher, token: int, *, limit: int) -> JumpForward:
        """Advance ``matcher`` by the sampled ``token`` and decide the jump-forward.

        Call it after ``token`` was appended to the request's ``output_ids``. ``limit`` is
        how many more tokens the request may gain (``max_tokens`` minus the output length,
        counting ``token``); forced tokens beyond it are not appended, so the request then
        ends on ``length`` with an incomplete value. With jump-forward on, two or more forced
        tokens are appended at once; a canonical re-split of the sampled token is applied
        with either setting (it costs no forward pass: the token is not computed yet).
        """
        if not matcher.advance(token):
            return JumpForward(ok=False, reason=matcher.error())
        if matcher.is_finished():
            return _FINISHED
        rollback, forced = matcher.jump_forward()
        if not forced:
            return _NOTHING
        if self.jump_forward and len(forced) >= 2:
            count = len(forced)
        else:
            count = min(rollback, len(forced))
        count = min(count, max(limit, 0) + rollback)
        append = tuple(forced[:count])
        for i, t in enumerate(append):
            if not matcher.advance(t):  # a forced token that completes a failing value
                return JumpForward(ok=False, rollback=rollback, append=append[:i],
                                   reason=matcher.error())
        return JumpForward(rollback=rollback, append=append, finished=matcher.is_finished())
