"""This process's tensor-parallel workers, read from Linux's /proc (no psutil needed)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["alive", "spawned_children"]


def _stat(pid: int) -> tuple[str, int] | None:
    """``(state, parent pid)`` of ``pid``, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()   # the name may hold spaces and ')'
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie has ended)."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def spawned_children() -> set[int]:
    """The live descendants of this process started by multiprocessing's spawn (the
    tensor-parallel workers), but its resource tracker (started with the first of them, it
    lives as long as this process)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) and stat[0] != "Z":
            parents[int(entry.name)] = stat[1]
    mine = {os.getpid()}
    grew = True
    while grew:
        found = {pid for pid, parent in parents.items() if parent in mine} - mine
        grew = bool(found)
        mine |= found
    mine.discard(os.getpid())
    return {pid for pid in mine if b"spawn_main" in _cmdline(pid)}


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
