"""Environment variables read by the engine: the experiment's knobs that benchmarks flip for
ablations (``AIOLM_RIDERS_IN_FLIGHT``, ``AIOLM_HYBRID_EXTEND_SETTLES``, …) and the debug
switch ``AIOLM_DEBUG_CHECKS``. They are not engine options: what they select is either the
measured default or its ablation (docs/benchmarks.md says which and by how much)."""

from __future__ import annotations

import os

__all__ = ["env_flag"]

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def env_flag(name: str, default: bool = False) -> bool:
    """Whether environment variable ``name`` says yes (``1``, ``true``, ``yes``, ``on``) or no
    (``0``, ``false``, ``no``, ``off``, empty); ``default`` when it is not set. Any other
    value is refused, naming the variable, rather than read as either."""
    value = os.environ.get(name)
    if value is None:
        return default
    word = value.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"{name}: expected 1/0, true/false, yes/no or on/off, got {value!r}")
