"""Python regex syntax (what users write) → the Rust ``regex`` syntax llguidance reads.

Users write patterns for Python's ``re`` / ``regex`` modules, and ``Regex.matches_text``
checks outputs with ``regex.fullmatch``. llguidance parses patterns with Rust's
``regex-syntax`` and compiles them to automata, so it cannot express what needs a
backtracking matcher. This module:

- rejects what an automaton cannot express (lookarounds, backreferences, conditionals,
  atomic groups, possessive quantifiers, word boundaries, anchors inside the pattern) with a
  :class:`~aiolm.ConstraintError` naming the construct;
- rewrites what the two syntaxes spell differently: ``\\Z`` → ``\\z``, ``(?#comment)``
  dropped, ``{,n}`` → ``{0,n}``, a ``{`` or ``}`` that is not a quantifier escaped,
  ``\\N{NAME}`` → the character, and inside ``[...]`` a literal ``[`` or the class operators
  ``&&`` / ``--`` / ``~~`` (literal in Python) escaped.

Everything else (classes, ``\\d``/``\\w``/``\\s`` with Unicode meaning in both, ``\\p{..}``,
flags ``(?i)``/``(?s)``/``(?x)``, named groups, lazy quantifiers) passes through unchanged.
"""

from __future__ import annotations

import re
import re._constants as _sre_c  # type: ignore[import-not-found]
import re._parser as _sre_parse  # type: ignore[import-not-found]
import unicodedata
import warnings

from ..errors import ConstraintError

__all__ = ["to_rust_regex"]

_QUANTIFIER = re.compile(r"\{(\d*)(,(\d*))?\}")

_UNSUPPORTED_OPS = {
    _sre_c.GROUPREF: "a backreference",
    _sre_c.GROUPREF_EXISTS: "a conditional group (?(id)yes|no)",
    _sre_c.ATOMIC_GROUP: "an atomic group (?>...)",
    _sre_c.POSSESSIVE_REPEAT: "a possessive quantifier (*+, ++, ?+, {m,n}+)",
}
_BOUNDARY_ATS = {
    _sre_c.AT_BOUNDARY: r"a word boundary \b",
    _sre_c.AT_NON_BOUNDARY: r"a non-word-boundary \B",
    _sre_c.AT_LOC_BOUNDARY: r"a word boundary \b",
    _sre_c.AT_LOC_NON_BOUNDARY: r"a non-word-boundary \B",
    _sre_c.AT_UNI_BOUNDARY: r"a word boundary \b",
    _sre_c.AT_UNI_NON_BOUNDARY: r"a non-word-boundary \B",
}
_START_ATS = {_sre_c.AT_BEGINNING, _sre_c.AT_BEGINNING_STRING, _sre_c.AT_BEGINNING_LINE}
_END_ATS = {_sre_c.AT_END, _sre_c.AT_END_STRING, _sre_c.AT_END_LINE}


def _fail(pattern: str, what: str) -> ConstraintError:
    return ConstraintError(
        f"regex {pattern!r}: {what} is not supported in constrained decoding "
        f"(the pattern must be a regular language; llguidance compiles it to an automaton)"
    )


def _walk(pattern: str, items: list, *, top: bool) -> None:
    last = len(items) - 1
    for i, (op, av) in enumerate(items):
        if op in _UNSUPPORTED_OPS:
            raise _fail(pattern, _UNSUPPORTED_OPS[op])
        if op in (_sre_c.ASSERT, _sre_c.ASSERT_NOT):
            direction, sub = av
            kind = "lookahead" if direction == 1 else "lookbehind"
            neg = "negative " if op == _sre_c.ASSERT_NOT else ""
            raise _fail(pattern, f"a {neg}{kind}")
        if op == _sre_c.AT:
            if av in _BOUNDARY_ATS:
                raise _fail(pattern, _BOUNDARY_ATS[av])
            at_edge = top and ((av in _START_ATS and i == 0) or (av in _END_ATS and i == last))
            if not at_edge:
                raise _fail(pattern, "an anchor (^, $, \\A, \\Z) inside the pattern")
        for sub in _children(op, av):
            # A top-level alternation keeps its branches at the top (``^a|^b`` is fine).
            _walk(pattern, list(sub), top=top and op == _sre_c.BRANCH)


def _children(op, av) -> list:
    if op == _sre_c.BRANCH:
        return list(av[1])
    if op == _sre_c.SUBPATTERN:
        return [av[3]]
    if op in (_sre_c.MAX_REPEAT, _sre_c.MIN_REPEAT):
        return [av[2]]
    return []


def _check_supported(pattern: str) -> None:
    """Name the first construct an automaton cannot express (Python ``re`` syntax only)."""
    try:
        with warnings.catch_warnings():  # "possible nested set": Python's own future syntax
            warnings.simplefilter("ignore", FutureWarning)
            parsed = _sre_parse.parse(pattern)
    except re.error:
        return  # ``regex``-module-only syntax (``\p{L}``, ...): llguidance validates it
    _walk(pattern, list(parsed), top=True)


def _rewrite_class(pattern: str, i: int, out: list[str]) -> int:
    """Copy the character class starting at ``pattern[i] == '['``; return the index after it."""
    n = len(pattern)
    out.append("[")
    i += 1
    if i < n and pattern[i] == "^":
        out.append("^")
        i += 1
    if i < n and pattern[i] == "]":  # a leading ']' is literal in Python
        out.append(r"\]")
        i += 1
    while i < n and pattern[i] != "]":
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            i = _rewrite_escape(pattern, i, out, in_class=True)
            continue
        if c == "[":
            posix = re.match(r"\[:\^?[a-z]+:\]", pattern[i:])
            if posix:
                out.append(posix.group())
                i += len(posix.group())
                continue
            out.append(r"\[")
        elif c in "&~-" and pattern[i + 1 : i + 2] == c:
            out.append("\\" + c + "\\" + c)
            i += 2
            continue
        else:
            out.append(c)
        i += 1
    out.append("]")
    return i + 1


def _rewrite_escape(pattern: str, i: int, out: list[str], *, in_class: bool) -> int:
    """Copy the escape at ``pattern[i] == '\\'``; return the index after it."""
    nxt = pattern[i + 1]
    if nxt == "Z" and not in_class:
        out.append(r"\z")
        return i + 2
    if nxt == "N" and pattern[i + 2 : i + 3] == "{":
        end = pattern.find("}", i + 3)
        if end != -1:
            try:
                char = unicodedata.lookup(pattern[i + 3 : end])
            except KeyError:
                raise ConstraintError(
                    f"regex {pattern!r}: unknown character name in {pattern[i : end + 1]!r}"
                ) from None
            out.append(f"\\x{{{ord(char):x}}}")
            return end + 1
    if nxt in "pP" and pattern[i + 2 : i + 3] == "{":  # Unicode property: \p{L}
        end = pattern.find("}", i + 3)
        if end != -1:
            out.append(pattern[i : end + 1])
            return end + 1
    out.append(pattern[i : i + 2])
    return i + 2


def to_rust_regex(pattern: str) -> str:
    """Translate a Python-syntax ``pattern`` for llguidance (see the module docstring).

    Raises :class:`~aiolm.ConstraintError` naming an unsupported construct. The result's
    full-match language equals the input's for every pattern this accepts.
    """
    _check_supported(pattern)
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            i = _rewrite_escape(pattern, i, out, in_class=False)
        elif c == "[":
            i = _rewrite_class(pattern, i, out)
        elif c == "(" and pattern.startswith("(?#", i):
            end = pattern.find(")", i)
            i = n if end == -1 else end + 1
        elif c == "{":
            q = _QUANTIFIER.match(pattern, i)
            if q and (q.group(1) or q.group(2)):
                lo, hi = q.group(1) or "0", q.group(3)
                out.append("{" + lo + ("" if q.group(2) is None else "," + (hi or "")) + "}")
                i = q.end()
            else:
                out.append(r"\{")
                i += 1
        elif c == "}":
            out.append(r"\}")
            i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)
