"""The fuzzer's frontend programs: random ``gen``, ``select``, constrained ``gen`` (regex,
JSON schema, choices, int) and nested ``fork`` ops run through :func:`aiolm.program`,
each checking what it got."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import anyio

from ...primitives import SELECT_METHODS, assistant, gen, select, system, user
from ...program import program
from ..synth import sentence, words
from ._common import _Limits, _Mismatch, _Op, _prefix, _Program, _sampling, _text

if TYPE_CHECKING:
    from ...program import ProgramState
    from .run import _Run


class _Names:
    """Unique variable names within one program."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        return f"v{self.n}"


def _ops(rng: random.Random, lim: _Limits, names: _Names, depth: int, count: int) -> list[tuple[str, _Op]]:
    """``count`` random ops for a state at fork depth ``depth`` (forks nest at most 2 deep)."""
    ops = []
    for k in range(count):
        kind = rng.choices(["gen", "select", "constrained", "fork"],
                           weights=[4, 2, 3, (2, 1, 0)[depth]])[0]
        if kind == "fork":
            # Concatenated branches make the state long; only a last op may grow it so.
            ops.append(_fork_op(rng, lim, names, depth, concat_ok=k == count - 1))
        else:
            ops.append(_LEAF_OPS[kind](rng, lim, names))
    return ops


async def _run_ops(s: ProgramState, ops: Sequence[tuple[str, _Op]], run: _Run) -> None:
    for _label, op in ops:
        await op(s, run)


def _gen_op(rng: random.Random, lim: _Limits, names: _Names) -> tuple[str, _Op]:
    name, text = names(), _text(rng)
    max_tokens = rng.randint(1, lim.max_new_tokens)
    kwargs: dict[str, Any] = {"max_tokens": max_tokens, **_sampling(rng)}
    if rng.random() < 0.2:
        kwargs["stop"] = rng.choice(["e", " the", "\n", "."])
    chat = rng.random() < 0.4
    system_text = sentence(rng, 6) if chat and rng.random() < 0.3 else None

    async def op(s: ProgramState, run: _Run) -> None:
        if system_text is not None:
            s += system(system_text)
        if chat:
            s += user(text)
            s += assistant(gen(name, **kwargs))
        else:
            s += text + gen(name, **kwargs)
        await s.get(name)
        used = s.meta(name).completion_tokens
        if used > max_tokens:
            raise _Mismatch(f"gen {name}: {used} tokens for max_tokens={max_tokens}")

    return f"gen({max_tokens}{', chat' if chat else ''})", op


def _select_op(rng: random.Random, lim: _Limits, names: _Names) -> tuple[str, _Op]:
    name, text = names(), _text(rng)
    choices = list(dict.fromkeys(words(rng, rng.randint(1, 3)) for _ in range(rng.randint(2, 5))))
    if len(choices) == 1:
        choices.append("none of these")
    method = rng.choice(SELECT_METHODS)

    async def op(s: ProgramState, run: _Run) -> None:
        s += text + " " + select(name, choices, method=method)
        value = await s.get(name)
        if value not in choices:
            raise _Mismatch(f"select {name}: {value!r} is not one of {choices}")

    return f"select({len(choices)}, {method})", op


_REGEXES = (r"[0-9]{1,4}", r"(yes|no)", r"[a-z]{2,6}( [a-z]{2,6}){0,2}",
            r"-?[1-9][0-9]{0,2}\.[0-9]{2}", r"(red|green|blue)-[0-9]{2}", r"[A-Z][a-z]{0,5}!?")


def _constrained_op(rng: random.Random, lim: _Limits, names: _Names) -> tuple[str, _Op]:
    """A constrained gen and the check its value must pass; ``max_tokens`` fits any valid
    value (a token is at least one byte), so it must finish with ``"stop"``."""
    name, text = names(), _text(rng)
    kind = rng.choice(["regex", "json", "choices", "int"])
    if kind == "regex":
        pattern = rng.choice(_REGEXES)
        spec: dict[str, Any] = {"regex": pattern}
        budget = 24

        def check(v: Any) -> str | None:
            return None if re.fullmatch(pattern, v) else f"does not match {pattern!r}"
    elif kind == "json":
        schema, budget = _json_schema(rng)
        spec = {"json_schema": schema}

        def check(v: Any) -> str | None:
            return _check_json(schema, v)
    elif kind == "choices":
        options = list(dict.fromkeys(words(rng, rng.randint(1, 4)) for _ in range(rng.randint(2, 5))))
        spec = {"choices": options}
        budget = max(len(o.encode()) for o in options)

        def check(v: Any) -> str | None:
            return None if v in options else f"is not one of {options}"
    else:
        spec = {"dtype": int}
        budget = 20

        def check(v: Any) -> str | None:
            return None if type(v) is int else "is not an int"
    max_tokens = budget + 8
    sampling = _sampling(rng)

    async def op(s: ProgramState, run: _Run) -> None:
        s += text + ": " + gen(name, max_tokens=max_tokens, **spec, **sampling)
        value = await s.get(name)
        meta = s.meta(name)
        if meta.finish_reason != "stop":
            raise _Mismatch(f"{kind} gen {name}: finished with {meta.finish_reason!r} after "
                            f"{meta.completion_tokens} tokens though any valid value fits "
                            f"{budget}: {value!r}")
        problem = check(value)
        if problem is not None:
            raise _Mismatch(f"{kind} gen {name}: {value!r} {problem}")

    return kind, op


def _json_schema(rng: random.Random) -> tuple[dict[str, Any], int]:
    """A small object schema (some long literal keys: jump-forward) and a byte bound on any
    valid value, in generated form (``", "`` and ``": "`` separators)."""
    props: dict[str, Any] = {}
    bound = 2
    for _ in range(rng.randint(1, 3)):
        key = "_".join(words(rng, rng.randint(3, 6)).split()) if rng.random() < 0.5 \
            else rng.choice(["a", "n", "ok", "name", "id"])
        if key in props:
            continue
        field = rng.choice(["string", "integer", "boolean", "enum"])
        if field == "string":
            longest = rng.randint(1, 8)
            props[key] = {"type": "string", "maxLength": longest}
            value_bytes = 2 + 12 * longest   # a code point may be an escaped surrogate pair
        elif field == "integer":
            lo, hi = rng.randint(-100, 0), rng.randint(1, 5000)
            props[key] = {"type": "integer", "minimum": lo, "maximum": hi}
            value_bytes = max(len(str(lo)), len(str(hi)))
        elif field == "boolean":
            props[key] = {"type": "boolean"}
            value_bytes = 5
        else:
            options = list(dict.fromkeys(rng.choice(words(rng, 4).split()) for _ in range(3)))
            props[key] = {"enum": options}
            value_bytes = 2 + max(len(o) for o in options)
        bound += len(json.dumps(key)) + 2 + value_bytes + 2
    schema = {"type": "object", "properties": props, "required": list(props),
              "additionalProperties": False}
    return schema, bound


def _check_json(schema: dict[str, Any], text: str) -> str | None:
    """Why ``text`` is not valid under one of :func:`_json_schema`'s schemas (None: valid)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"is not JSON ({exc})"
    props = schema["properties"]
    if not isinstance(value, dict) or set(value) != set(props):
        return f"does not have exactly the keys {sorted(props)}"
    for key, spec in props.items():
        v = value[key]
        if "enum" in spec:
            ok = v in spec["enum"]
        elif spec["type"] == "string":
            ok = isinstance(v, str) and len(v) <= spec["maxLength"]
        elif spec["type"] == "integer":
            ok = type(v) is int and spec["minimum"] <= v <= spec["maximum"]
        else:
            ok = type(v) is bool
        if not ok:
            return f"breaks {key!r}: {spec}"
    return None


def _fork_op(rng: random.Random, lim: _Limits, names: _Names, depth: int, *,
             concat_ok: bool) -> tuple[str, _Op]:
    n = rng.randint(1, 8 if depth == 0 else 3)
    text = _text(rng)
    branches = [_ops(rng, lim, names, depth + 1, rng.randint(1, 2)) for _ in range(n)]
    mode = rng.choice(["gather", "concat"]) if concat_ok else "gather"

    async def op(s: ProgramState, run: _Run) -> None:
        s += text
        async with s.fork(n) as forks:
            async with anyio.create_task_group() as tg:
                for branch, ops in zip(forks, branches, strict=True):
                    tg.start_soon(_run_ops, branch, ops, run)
        forks.join(mode=mode)

    inner = "; ".join(",".join(label for label, _ in ops) for ops in branches)
    return f"fork({n}, {mode})[{inner}]", op


def _frontend(rng: random.Random, lim: _Limits) -> _Program:
    """A program through the frontend: 1–4 ops (gen, select, constrained gen, fork)."""
    prefix = _prefix(rng)
    ops = _ops(rng, lim, _Names(), 0, rng.randint(1, 4))

    async def body(run: _Run, index: int) -> None:
        async def fn(s: ProgramState) -> None:
            s += prefix
            await _run_ops(s, ops, run)

        await program(fn).run(backend=run.backend)

    return _Program(label="program[" + ", ".join(label for label, _ in ops) + "]", body=body)


_LEAF_OPS = {"gen": _gen_op, "select": _select_op, "constrained": _constrained_op}
