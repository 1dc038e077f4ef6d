"""What a fuzzing run reports: its :class:`Fault`\\ s and :class:`FuzzReport`, the seed each
program is built from, and the comparison of two greedy completions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from ...backends.base import Completion

__all__ = ["FAULT_KINDS", "Fault", "FuzzReport", "first_greedy_mismatch", "program_seed"]


#: What a :class:`Fault` can be.
FAULT_KINDS = ("error", "integrity", "not-idle", "mismatch", "stall")


@attrs.frozen(kw_only=True)
class Fault:
    """One problem found. ``seed`` rebuilds the program (see :func:`program_seed`);
    ``program`` is its index in the run (for a fault found after a round — ``integrity``,
    ``not-idle`` — the round's first program)."""

    seed: int
    program: int
    kind: str = attrs.field(validator=attrs.validators.in_(FAULT_KINDS))
    message: str


@attrs.frozen(kw_only=True)
class FuzzReport:
    """What one :func:`fuzz_engine` run did and found.

    ``requests``: the generate / stream / score calls the fuzzer made (counted as they are
    made, through a counting wrapper around the engine: aborted and failed calls count, a
    fork's prefix prefill and a ``select``'s internal scoring requests do not).
    ``retractions``: the engine's retractions during the run.
    """

    seed: int
    programs: int
    requests: int
    cancelled: int
    dropped_streams: int
    retractions: int
    integrity_checks: int
    wall_s: float
    faults: tuple[Fault, ...]

    def ok(self) -> bool:
        """True when the run found nothing."""
        return not self.faults

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (faults as dicts)."""
        return attrs.asdict(self)


def program_seed(run_seed: int, index: int) -> int:
    """The seed program ``index`` of a run seeded ``run_seed`` is built from (readable:
    run 42's program 17 is ``42_000_000_017``)."""
    return run_seed * 1_000_000_000 + index


def first_greedy_mismatch(reference: Completion, other: Completion, margin: float) -> str | None:
    """Where greedy ``other`` really departs from greedy ``reference``; ``None`` if nowhere.

    Both are completions of the same greedy request (``.token_ids``; ``reference`` with
    ``.logprobs`` carrying its top logprobs). Equal tokens agree. At the first different
    token the comparison stops, and the divergence is accepted when the reference scored
    ``other``'s token within ``margin`` nats of its own choice: a near-tie that rounding may
    flip (a float32 caller passes ~1e-3, bfloat16 ~0.1). If ``other``'s token is not among
    the reference's top logprobs, its gap is at least the reference's top-1 minus its last
    listed top (with ``top_logprobs=2``: the top-2 margin); the divergence is accepted only
    when that bound is within ``margin``. A length difference without a divergence is
    reported too.
    """
    ref, got = reference.token_ids, other.token_ids
    for i, (a, b) in enumerate(zip(ref, got, strict=False)):
        if a == b:
            continue
        if i >= len(reference.logprobs) or not reference.logprobs[i].top:
            return f"token {i}: {b} instead of {a}, and the reference has no top logprobs there"
        lp = reference.logprobs[i]
        top = {tid: value for tid, _text, value in lp.top}
        if b in top:
            gap = top.get(a, lp.logprob) - top[b]
            if gap <= margin:
                return None
            return f"token {i}: {b} instead of {a}, {gap:.3g} nats below it in the reference"
        bound = lp.logprob - min(top.values())
        if bound <= margin:
            return None
        return (f"token {i}: {b} instead of {a}, not among the reference's top {len(top)} "
                f"{sorted(top)} (at least {bound:.3g} nats below it)")
    if len(ref) != len(got):
        return f"{len(got)} tokens instead of the reference's {len(ref)}, all shared ones equal"
    return None
