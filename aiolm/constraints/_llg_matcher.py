"""``LLGMatcher``: the :class:`~aiolm.constraints.Matcher` of the built-in constraints,
backed by an llguidance ``LLMatcher``.

Beyond llguidance's own state it keeps a *plan*: the canonical tokens of the text the
constraint forces next (llguidance's fast-forward tokens: the forced bytes tokenized, less a
tail that could still merge with what follows). While a plan is open, the mask admits only
its next token, so decoding step by step produces exactly the tokens that jump-forward
appends in one pass: the ``jump_forward`` switch changes the number of forward passes, never
the text.

A matcher may also carry a *check* of the finished text (a JSON schema's keywords that the
grammar cannot enforce): it then refuses to end on text that fails it (the token that would
complete the value, or EOS), and :meth:`LLGMatcher.error` says why.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .base import Matcher

if TYPE_CHECKING:
    from ._regex_masks import RegexMasks

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
    ``check(text)`` returns why a complete output is still not valid (None when it is).
    ``masks`` keeps a regex's masks per automaton state across requests (see
    :mod:`aiolm.constraints._regex_masks`).
    """

    def __init__(self, ll: Any, ll_tokenizer: Any, eos_token_ids: frozenset[int], *,
                 check: Callable[[str], str | None] | None = None,
                 masks: RegexMasks | None = None) -> None:
        self._ll = ll
        self._llt = ll_tokenizer
        self._eos = eos_token_ids
        self._check = check
        self._masks = masks
        # The automaton state after each advanced token (masks kept per state: a regex).
        self._states: list[int | None] = [masks.start] if masks is not None else [None]
        self._tokens: list[int] = []  # advanced tokens, llguidance holds their history
        self._plan: list[int] | None = None  # None: not computed since the last change
        self._after_free: int | None = None  # the last token, when it was sampled freely
        self._refused = ""  # why the last advance refused its token
        self._verdict: tuple[str | None] | None = None  # the check of the text so far

    # -- the engine's batched masks and errors ---------------------------------------------

    @property
    def mask_words(self) -> int:
        """Words of the mask llguidance writes: ``ceil(tokenizer vocab / 32)``."""
        return (self._llt.vocab_size + 31) // 32

    def only_token(self) -> int | None:
        """The only token the mask admits next (a forced token), or None for a full mask."""
        plan = self._ensure_plan()
        return plan[0] if plan else None

    def error(self) -> str:
        """Why the matcher refused its last token or can go no further: llguidance's own
        message (in one line, with the tokens it came after) or the failed check of the
        finished text; empty when nothing went wrong."""
        from ._llg import error_summary

        if self._ll.is_error():
            return error_summary(self._ll.get_error())
        return self._refused

    def llguidance_mask(self, words: int) -> Any | None:
        need = self.mask_words
        if words < need or self.only_token() is not None:
            return None
        if self._states[-1] is not None:  # kept per state: fill_next_token_mask copies it
            return None
        return self._ll if words == need else (self._ll, need)

    # -- the Matcher protocol ---------------------------------------------------------------

    def fill_next_token_mask(self, bitmask_row: Any) -> None:
        token = self.only_token()
        if token is not None:
            set_single_token(bitmask_row, token)
            return
        ptr, words = _row_pointer(bitmask_row)
        need = self.mask_words
        state = self._states[-1]
        kept = self._masks.mask(state) if self._masks is not None else None
        if kept is not None:
            _copy_mask(bitmask_row, kept, words, need)
            return
        if words >= need:
            self._ll.unsafe_compute_mask_ptr(ptr, need * 4)
            if words > need:
                bitmask_row[need:] = 0  # model vocabulary beyond the tokenizer's: never allowed
            full = bitmask_row
        else:  # the model's vocabulary is smaller than the tokenizer's: compute, then cut
            full = _scratch_like(bitmask_row, need)
            self._ll.unsafe_compute_mask_ptr(_row_pointer(full)[0], need * 4)
            bitmask_row[:] = full[:words]
        if self._ll.is_error():  # what was written is not a mask: the request must end
            from ..errors import ConstraintError

            raise ConstraintError(f"the constraint failed: {self.error()}")
        if state is not None and self._masks is not None:
            target = full.numpy() if hasattr(full, "numpy") else full
            self._masks.keep(state, target[:need].tobytes())

    def advance(self, token_id: int) -> bool:
        self._refused = ""
        if self._ll.is_error():
            return False
        if token_id in self._eos and not self.accepts_eos():
            self._refused = self._refused or (
                f"EOS (token {token_id}) before the output is complete")
            return False
        plan = self._plan
        if plan and token_id == plan[0]:
            if not self._ll.consume_token(token_id):
                return False
            after_free = None
        else:
            if token_id in self._eos:
                if not self._ll.consume_token(token_id):
                    return False
            elif self._ll.try_consume_tokens([token_id]) != 1:  # refused: state unchanged
                self._refused = (f"token {token_id} "
                                 f"({self._llt.decode_bytes([token_id])!r}) is not allowed here")
                return False
            plan, after_free = None, token_id
        self._tokens.append(token_id)
        self._verdict = None
        if self._check is not None and token_id not in self._eos and self._ll.is_stopped():
            problem = self._verdict_now()
            if problem is not None:  # the value is complete and fails the check: undo
                self._ll.rollback(1)
                self._tokens.pop()
                self._verdict = None
                self._refused = problem
                return False
        state = self._states[-1]
        if self._masks is not None and token_id not in self._eos:
            state = self._masks.step(state, self._llt.decode_bytes([token_id]))
        self._states.append(state)
        self._plan = (plan[1:] or None) if plan else None
        self._after_free = after_free
        return True

    def forced_tokens(self) -> list[int]:
        return list(self._ensure_plan())

    def jump_forward(self) -> tuple[int, list[int]]:
        token = self._after_free
        self._after_free = None
        forced = None
        if token is not None and token not in self._eos:
            forced = self._forced_bytes()
            retokenized = self._retokenize_boundary(token, forced)
            if retokenized is not None:
                return 1, list(retokenized)
        # The state is unchanged: the forced bytes just computed are the plan's.
        return 0, list(self._ensure_plan(forced))

    def is_finished(self) -> bool:
        return self._ll.is_stopped()

    def accepts_eos(self) -> bool:
        if not self._ll.is_accepting():
            return False
        if self._check is None:
            return True
        problem = self._verdict_now()
        self._refused = problem or ""
        return problem is None

    def output_text(self) -> str:
        """The text of the tokens advanced so far (EOS left out)."""
        tokens = [t for t in self._tokens if t not in self._eos]
        return self._llt.decode_bytes(tokens).decode("utf-8", errors="replace")

    def fork(self) -> LLGMatcher:
        """An independent copy in the same state (the engine never calls it).

        NOTE: llguidance's copy shares the lexer's state cache with this matcher, so one
        that hits a lexer limit fails its twin too; requests never share one (each
        compiles its own)."""
        twin = LLGMatcher(self._ll.deep_copy(), self._llt, self._eos, check=self._check)
        twin._tokens = list(self._tokens)
        twin._states = list(self._states)
        twin._plan = None if self._plan is None else list(self._plan)
        twin._after_free = self._after_free
        return twin

    def rollback(self, n: int) -> None:
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"rollback: n must be a non-negative int, got {n!r}")
        if n > len(self._tokens):
            raise ValueError(f"rollback: n={n} exceeds the {len(self._tokens)} tokens advanced")
        if n == 0:
            return
        if not self._ll.rollback(n):
            raise RuntimeError(f"llguidance could not roll back {n} tokens: {self.error()}")
        del self._tokens[len(self._tokens) - n:]
        del self._states[len(self._states) - n:]
        self._verdict = None
        self._plan = None
        self._after_free = None

    # -- internals ----------------------------------------------------------------------------

    def _verdict_now(self) -> str | None:
        """The check of the text so far (kept until the tokens change)."""
        assert self._check is not None
        if self._verdict is None:
            self._verdict = (self._check(self.output_text()),)
        return self._verdict[0]

    def _forced_bytes(self) -> bytes:
        """The bytes llguidance forces next (~15 µs a call in the json-decode profile on
        the H200 host: asked once a step)."""
        return self._ll.compute_ff_bytes() if not self._ll.is_stopped() else b""

    def _ensure_plan(self, forced: bytes | None = None) -> list[int]:
        """The plan, computed if needed from ``forced`` (the forced bytes in the current
        state, when the caller has them)."""
        if self._plan is None:
            if forced is None:
                forced = self._forced_bytes()
            # Only tokenize (~10 µs) when something is forced.
            self._plan = self._ll.compute_ff_tokens() if forced else []
        return self._plan

    def _retokenize_boundary(self, token: int, forced: bytes) -> list[int] | None:
        """Canonical tokens of (``token``'s text + the ``forced`` text, llguidance's forced
        bytes now), if they differ from ``token`` + the plan at their first token; then the
        matcher is rolled back by one and the plan holds them. None when the boundary is
        already canonical (the matcher unchanged)."""
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
        self._tokens.pop()
        self._states.pop()
        self._verdict = None
        self._plan = list(canonical)
        return canonical


def _copy_mask(row: Any, mask: bytes, words: int, need: int) -> None:
    """Write a kept mask of ``need`` words into ``row`` (of ``words`` words)."""
    import numpy as np

    target = row.numpy() if hasattr(row, "numpy") else row
    kept = np.frombuffer(mask, dtype=np.int32)
    if words >= need:
        target[:need] = kept
        target[need:] = 0
    else:
        target[:] = kept[:words]


def _scratch_like(row: Any, words: int) -> Any:
    """An uninitialised int32 row of ``words`` words, of the same kind as ``row``."""
    if hasattr(row, "data_ptr"):
        import torch

        return torch.empty(words, dtype=torch.int32)
    import numpy as np

    return np.empty(words, dtype=np.int32)
