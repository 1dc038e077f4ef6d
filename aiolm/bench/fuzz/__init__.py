"""A seeded random-program fuzzer for an open :class:`aiolm.Engine`.

:func:`fuzz_engine` drives the engine the way chaotic real traffic does — random programs
through the public frontend (``gen``, ``select``, nested ``fork``/``join``, chat roles,
regex / JSON-schema / choices constraints) and through the engine's own API (``generate``,
streams dropped midway, prompts at the context limit, bursts that overfill the KV pool,
cache flushes), cancelled at random points — and
checks that it stays sound: every program ends without an error, constrained outputs
satisfy their constraints, greedy outputs are the same batched or alone, and after every
round of programs the engine is idle and its KV accounting intact
(``Engine.check_integrity``). It reports problems as :class:`Fault`\\ s; a clean run is the
passing result. It runs in CI on a tiny random model on the CPU, and for a fixed time on a
GPU (``duration_s``).

Reproducing a fault: program ``index`` of a run seeded ``S`` is built from
``random.Random(program_seed(S, index))`` alone, so ``fuzz_engine(engine, seed=S,
programs=index + 1, round_size=R)`` replays the same programs in the same rounds (their
interleaving inside the engine depends on timing).

Layout: :mod:`.report` (faults, the report, program seeds, the greedy comparison),
:mod:`.run` (:func:`fuzz_engine`: rounds of programs and the engine checks after each),
:mod:`._programs` (each kind of program and the mix they are drawn from),
:mod:`._frontend` (the frontend programs' ops) and :mod:`._common` (what they share).
"""

from .report import FAULT_KINDS as FAULT_KINDS
from .report import Fault as Fault
from .report import FuzzReport as FuzzReport
from .report import first_greedy_mismatch as first_greedy_mismatch
from .report import program_seed as program_seed
from .run import fuzz_engine as fuzz_engine
from .run import wait_idle as wait_idle

__all__ = ["FAULT_KINDS", "Fault", "FuzzReport", "first_greedy_mismatch", "fuzz_engine",
           "program_seed", "wait_idle"]
