"""Seeded synthetic text with predictable token counts, for the benchmark workloads.

The workloads reproduce the *shapes* of the paper's data sets (prefix lengths, fork widths,
turn counts, output lengths), not their content. Text is made of common English words,
each of which most BPE tokenizers encode as one token with its leading space, so ``n``
words are close to ``n`` tokens. Everything is drawn from a ``random.Random`` the caller
seeds, so a workload's inputs are identical across runs, variants and peers.
"""

from __future__ import annotations

import random

__all__ = ["SIZES", "Size", "check_size", "sentence", "title", "words"]

Size = str
#: The workload sizes ``aiolm bench --size`` accepts: ``tiny`` for tests (seconds on a tiny
#: model), ``small`` for the CPU suite (SmolLM2-135M on two cores, ablations and the
#: transformers peer included, in about ten minutes), ``full`` for the paper's shapes (GPU).
SIZES: tuple[Size, ...] = ("tiny", "small", "full")

_VOCAB = """
time year people way day man thing woman life child world school state family student
group country problem hand part place case week company system program question work
government number night point home water room mother area money story fact month lot
right study book eye job word business issue side kind head house service friend father
power hour game line end member law car city community name president team minute idea
kid body information back parent face others level office door health person art war
history party result change morning reason research girl guy moment air teacher force
education foot boy age policy music market sense nation plan college interest death
experience effect class control care field development role effort rate heart drug show
leader light voice wife police mind price report decision son view relationship town road
arm difference value building action model season society tax director position player
record paper space ground form event official matter center couple site project activity
star table need court oil situation cost industry figure street image phone data picture
practice piece land product doctor wall patient worker news test movie north love support
technology step baby computer type attention film tree source organization hair window
evidence population site green small large early young important public bad same able
human local late hard major better economic strong possible whole free military true
federal international full special easy clear recent certain personal open red difficult
available likely short single medical current wrong private past foreign fine common poor
natural significant similar hot dead central happy serious ready simple left physical
general environmental financial blue democratic dark various entire close legal religious
cold final main huge popular traditional cultural build stay fall cut reach kill remain
suggest raise pass sell require report decide pull break thank receive join explain hope
develop carry drive return walk offer remember consider appear buy wait serve die send
expect stop create speak read allow add spend grow open win teach lead understand watch
follow begin help talk turn start show hear play run move like live believe hold bring
happen write provide sit stand lose pay meet include continue set learn change
""".split()

_CAPITALIZED = [w.capitalize() for w in _VOCAB[:120]]


def check_size(size: object) -> Size:
    """Return ``size`` if it is one of :data:`SIZES`, else raise ``ValueError`` naming it."""
    if size not in SIZES:
        raise ValueError(f"size: expected one of {', '.join(SIZES)}, got {size!r}")
    return size  # type: ignore[return-value]


def words(rng: random.Random, n: int) -> str:
    """``n`` random words separated by single spaces (about ``n`` tokens)."""
    if n < 0:
        raise ValueError(f"n: must be >= 0, got {n}")
    return " ".join(rng.choice(_VOCAB) for _ in range(n))


def sentence(rng: random.Random, n: int) -> str:
    """``n`` words as a sentence: capitalized, ending in a full stop (``n >= 1``)."""
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    text = words(rng, n)
    return text[0].upper() + text[1:] + "."


def title(rng: random.Random, n: int = 2) -> str:
    """A short capitalized name (a subject, a person, a city) of ``n`` words."""
    return " ".join(rng.choice(_CAPITALIZED) for _ in range(n))
