"""``LLGMatcher``: the :class:`~aiolm.constraints.Matcher` of the built-in constraints,
backed by an llguidance ``LLMatcher``.

Beyond llguidance's own state it keeps a *plan*: the canonical tokens of the text the
constraint forces next (llguidance's fast-forward tokens: the forced bytes tokenized, less a
tail that could still merge with what follows). While a plan is open, the mask admits only
its next token, so decoding step by step produces exactly the tokens that jump-forward
appends in one pass: the ``jump_forward`` switch changes the number of forward passes, never
the text.
"""

from __future__ import annotations

from typing import Any

from .base import Matcher

__all__ = ["LLGMatcher"]


def _row_pointer(row: Any) -> tuple[int, int]:
    """(address, words) of a contiguous 1-D int32 CPU tensor or numpy array."""
    if hasattr(row, "data_ptr"):  # torch.Tensor
        if row.dim() != 1 or row.device.type != "cpu" or not row.is_contiguous():
            raise ValueError("bitmask_row: expected a contiguous 1-D int32 CPU tensor")
        if str(row.dtype) != "torch.int32":
            raise ValueError(f"bitmask_row: expected dtype int32, got {row.dtype}")
        return row.data_ptr(), row.numel()
    if row.ndim != 1 or not row.flags["C_CONTIGUOUS"] or row.dtype.name != "int32":
        raise ValueError("bitmask_row: expected a contiguous 1-D int32 array")
    return row.ctypes.data, row.size


def set_single_token(row: Any, token: int) -> None:
    """Make ``token`` the only allowed token of ``bitmask_row`` (a CPU tensor or array)."""
    target = row.numpy() if hasattr(row, "numpy") else row  # numpy: no torch dispatch cost
    target.fill(0)
    bit = 1 << (token % 32)
    target[token // 32] = bit - (1 << 32) if bit >= 1 << 31 else bit  # as a signed int32


class LLGMatcher(Matcher):
    """An llguidance ``LLMatcher`` behind the aiolm :class:`Matcher` protocol.

    Built by :func:`aiolm.constraints._llg.compile_spec`; use ``spec.compile(tokenizer)``.
    """

    def __init__(self, ll: Any, ll_tokenizer: Any, eos_token_ids: frozenset[int]) -> None:
        self._ll = ll
        self._llt = ll_tokenizer
        self._eos = eos_token_ids
        self._consumed = 0  # tokens llguidance holds history for (rollback bound)
        self._plan: list[int] | None = None  # None: not computed since the last change
        self._after_free: int | None = None  # the last token, when it was sampled freely

    # -- engine-side helpers (used by aiolm.engine.grammar_backend) -------------------------

    @property
    def ll_matcher(self) -> Any:
        """The underlying ``llguidance.LLMatcher`` (for batched mask computation)."""
        return self._ll

    @property
    def mask_words(self) -> int:
        """Words of the mask llguidance writes: ``ceil(tokenizer vocab / 32)``."""
        return (self._llt.vocab_size + 31) // 32

    def planned_token(self) -> int | None:
        """The only token the mask admits next (a forced token), or None for a full mask."""
        plan = self._ensure_plan()
        return plan[0] if plan else None

    def error(self) -> str:
        """llguidance's error message; empty unless the matcher is in its error state."""
        return self._ll.get_error()

    # -- the Matcher protocol ---------------------------------------------------------------

    def fill_next_token_mask(self, bitmask_row: Any) -> None:
        token = self.planned_token()
        if token is not None:
            set_single_token(bitmask_row, token)
            return
        ptr, words = _row_pointer(bitmask_row)
        need = self.mask_words
        if words >= need:
            self._ll.unsafe_compute_mask_ptr(ptr, need * 4)
            bitmask_row[need:] = 0  # model vocabulary beyond the tokenizer's: never allowed
        else:  # the model's vocabulary is smaller than the tokenizer's: compute, then cut
            full = _scratch_like(bitmask_row, need)
            self._ll.unsafe_compute_mask_ptr(_row_pointer(full)[0], need * 4)
            bitmask_row[:] = full[:words]

    def advance(self, token_id: int) -> bool:
        if self._ll.is_error():
            return False
        plan = self._plan
        if plan and token_id == plan[0]:
            if not self._ll.consume_token(token_id):
                return False
            self._plan = plan[1:] or None
            self._after_free = None
        else:
            if token_id in self._eos:
                if not self._ll.is_accepting() or not self._ll.consume_token(token_id):
                    return False
            elif self._ll.try_consume_tokens([token_id]) != 1:  # refused: state unchanged
                return False
            self._plan = None
            self._after_free = token_id
        self._consumed += 1
        return True

    def forced_tokens(self) -> list[int]:
        return list(self._ensure_plan())

    def jump_forward(self) -> tuple[int, list[int]]:
        token = self._after_free
        self._after_free = None
        if token is not None and token not in self._eos:
            retokenized = self._retokenize_boundary(token)
            if retokenized is not None:
                return 1, list(retokenized)
        return 0, self.forced_tokens()

    def is_finished(self) -> bool:
        return self._ll.is_stopped()

    def accepts_eos(self) -> bool:
        return self._ll.is_accepting()

    def fork(self) -> LLGMatcher:
        twin = LLGMatcher(self._ll.deep_copy(), self._llt, self._eos)
        twin._consumed = self._consumed
        twin._plan = None if self._plan is None else list(self._plan)
        twin._after_free = self._after_free
        return twin

    def rollback(self, n: int) -> None:
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"rollback: n must be a non-negative int, got {n!r}")
        if n > self._consumed:
            raise ValueError(f"rollback: n={n} exceeds the {self._consumed} tokens advanced")
        if n == 0:
            return
        if not self._ll.rollback(n):
            raise RuntimeError(f"llguidance could not roll back {n} tokens: {self.error()}")
        self._consumed -= n
        self._plan = None
        self._after_free = None

    # -- internals ----------------------------------------------------------------------------

    def _ensure_plan(self) -> list[int]:
        if self._plan is None:
            # compute_ff_bytes is ~0.2 µs; only tokenize (~10 µs) when something is forced.
            forced = self._ll.compute_ff_bytes() if not self._ll.is_stopped() else b""
            self._plan = self._ll.compute_ff_tokens() if forced else []
        return self._plan

    def _retokenize_boundary(self, token: int) -> list[int] | None:
        """Canonical tokens of (``token``'s text + the forced text), if they differ from
        ``token`` + the plan at their first token; then the matcher is rolled back by one and
        the plan holds them. None when the boundary is already canonical."""
        forced = self._ll.compute_ff_bytes()
        if not forced:
            return None
        head = self._llt.decode_bytes([token])
        canonical, _ = self._llt.tokenize_partial(head + forced)
        if not canonical or canonical[0] == token:
            return None
        if len(self._llt.decode_bytes(canonical)) < len(head):
            return None  # the canonical prefix would drop the sampled text: keep the token
        self._ll.rollback(1)
        if self._ll.validate_tokens(canonical) != len(canonical):
            self._ll.consume_token(token)  # the grammar rejects the re-split: keep ours
            return None
        self._consumed -= 1
        self._plan = list(canonical)
        return canonical


def _scratch_like(row: Any, words: int) -> Any:
    """An uninitialised int32 row of ``words`` words, of the same kind as ``row``."""
    if hasattr(row, "data_ptr"):
        import torch

        return torch.empty(words, dtype=torch.int32)
    import numpy as np

    return np.empty(words, dtype=np.int32)
