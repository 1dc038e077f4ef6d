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
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

import anyio
import attrs

from .._program.groups import leaf_errors
from ..backends.base import Backend, GenerateRequest
from ..constraints import JSONSchema, Regex
from ..errors import BackendUnavailable
from ..primitives import SELECT_METHODS, assistant, gen, select, system, user
from ..program import program
from .synth import sentence, words

if TYPE_CHECKING:
    from ..backends.base import Chunk, Completion, ScoreResult
    from ..backends.engine import Engine
    from ..program import ProgramState

__all__ = ["FAULT_KINDS", "Fault", "FuzzReport", "first_greedy_mismatch", "fuzz_engine",
           "program_seed", "wait_idle"]

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


async def fuzz_engine(engine: Engine, *, seed: int, programs: int | None = None,
                      duration_s: float | None = None, concurrency: int = 8,
                      round_size: int = 16, max_new_tokens: int = 16, margin: float = 1e-3,
                      stall_s: float = 60.0) -> FuzzReport:
    """Run random programs on the open ``engine`` and report what broke.

    Works in rounds: each starts ``round_size`` programs at once (at most ``concurrency``
    running), waits for all of them, waits (bounded) for the engine to go idle, re-runs the
    round's greedy requests alone and compares them (:func:`first_greedy_mismatch` with
    ``margin``), then calls ``engine.check_integrity()``. Stops after ``programs`` programs
    or, at a round boundary, after ``duration_s`` seconds, whichever comes first.
    ``max_new_tokens`` bounds every unconstrained generation. A program still running after
    ``stall_s`` seconds is cancelled and reported. The report's ``requests`` counts the
    fuzzer's own generate / stream / score calls (see :class:`FuzzReport`).

    One program's failure never stops the run: it becomes a :class:`Fault`. A broken engine
    does (an integrity fault, a request that never leaves, a dead engine loop): what follows
    would be its consequences, not new findings. Mutates the engine's cache and statistics
    only. Raises ``ValueError`` naming a bad argument (neither ``programs`` nor
    ``duration_s``, a bound below 1) and for an engine without a tokenizer.
    """
    if programs is None and duration_s is None:
        raise ValueError("programs, duration_s: give at least one (a count or a time budget)")
    for name, value in (("programs", programs), ("concurrency", concurrency),
                        ("round_size", round_size), ("max_new_tokens", max_new_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    for name, value in (("duration_s", duration_s), ("stall_s", stall_s)):
        if value is not None and not value > 0:
            raise ValueError(f"{name}: must be > 0 seconds, got {value!r}")
    if not margin >= 0:
        raise ValueError(f"margin: must be >= 0 nats, got {margin!r}")
    if engine.tokenizer is None:
        raise ValueError("engine: the fuzzer runs text programs and needs a tokenizer "
                         "(load dummy weights with aiolm.bench.models.load_for_bench)")
    run = _Run(engine=engine, seed=seed, limits=_Limits.of(engine, max_new_tokens),
               margin=margin, stall_s=stall_s, limiter=anyio.CapacityLimiter(concurrency))
    retractions = run.retractions()
    start = time.monotonic()
    done = 0
    while (programs is None or done < programs) and (
            duration_s is None or time.monotonic() - start < duration_s):
        size = round_size if programs is None else min(round_size, programs - done)
        async with anyio.create_task_group() as tg:
            for index in range(done, done + size):
                tg.start_soon(run.one, index)
        done += size
        if not await run.after_round(done - size, done):
            break
    return FuzzReport(
        seed=seed, programs=done, requests=run.requests, cancelled=run.cancelled,
        dropped_streams=run.dropped_streams, retractions=run.retractions() - retractions,
        integrity_checks=run.integrity_checks, wall_s=time.monotonic() - start,
        faults=tuple(run.faults),
    )


# ---------------------------------------------------------------------------- the run


class _Mismatch(Exception):
    """A program's output broke a rule it must keep (a constraint, a token count)."""


@attrs.frozen(kw_only=True)
class _Limits:
    """What programs may ask of this engine."""

    #: Longest prompt + max_tokens: the model's context, or the KV pool if smaller.
    context: int
    vocab: int
    max_new_tokens: int

    @classmethod
    def of(cls, engine: Engine, max_new_tokens: int) -> _Limits:
        # NOTE: the model's context and vocabulary are not public on Engine; the core holds
        # them as plain attributes (the values its request validation uses).
        core = engine._require_core()
        pool = engine.statistics().total_kv_slots
        return cls(context=min(core.context_len, pool), vocab=core.vocab_size,
                   max_new_tokens=max_new_tokens)


@attrs.frozen(kw_only=True)
class _Greedy:
    """A greedy request a program ran in the mix, to re-run alone after the round."""

    index: int
    input_ids: tuple[int, ...]
    max_tokens: int
    completion: Completion


@attrs.define(eq=False, kw_only=True)
class _Run:
    """One fuzzing run's engine, counters and findings."""

    engine: Engine
    seed: int
    limits: _Limits
    margin: float
    stall_s: float
    limiter: anyio.CapacityLimiter
    backend: Backend = attrs.field(init=False)
    requests: int = 0
    cancelled: int = 0
    dropped_streams: int = 0
    integrity_checks: int = 0
    faults: list[Fault] = attrs.field(factory=list)
    greedy: list[_Greedy] = attrs.field(factory=list)
    _last_retractions: int = attrs.field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        self.backend = _Counting(self)

    def retractions(self) -> int:
        """The engine's retractions so far (its last snapshot's, if its loop has died)."""
        with contextlib.suppress(BackendUnavailable):
            self._last_retractions = self.engine.statistics().retractions
        return self._last_retractions

    def fault(self, index: int, kind: str, message: str) -> None:
        self.faults.append(Fault(seed=program_seed(self.seed, index), program=index, kind=kind,
                                 message=message))

    async def one(self, index: int) -> None:
        """Build and run program ``index``; record what went wrong, never raise."""
        prog = _build(random.Random(program_seed(self.seed, index)), self.limits)
        async with self.limiter:
            with anyio.move_on_after(self.stall_s) as scope:
                try:
                    await prog.body(self, index)
                except Exception as exc:  # every failure is a finding, none stops the run
                    kind, what = _describe_error(exc)
                    self.fault(index, kind, f"{prog.label}: {what}")
            if scope.cancelled_caught:
                self.fault(index, "stall", f"{prog.label}: still running after {self.stall_s} s")

    async def after_round(self, first: int, end: int) -> bool:
        """Check the engine after programs ``first..end-1``; False when it is broken."""
        greedy, self.greedy = self.greedy, []
        self.retractions()
        where = f"after programs {first}..{end - 1}"
        try:
            with anyio.fail_after(self.stall_s):
                if await wait_idle(self.engine):
                    for g in sorted(greedy, key=lambda g: g.index):
                        await self._compare_alone(g)
                self.integrity_checks += 1
                report = await self.engine.check_integrity()
        except RuntimeError as exc:  # BackendUnavailable is an AiolmError, not one of these
            self.fault(first, "integrity", f"{where}: {exc}")
            return False
        except TimeoutError:
            self.fault(first, "stall", f"{where}: the engine did not answer within {self.stall_s} s")
            return False
        except BackendUnavailable as exc:
            self.fault(first, "error", f"{where}: the engine is gone: {exc}")
            return False
        if not report.idle:
            self.fault(first, "not-idle", f"{where}: every program ended, yet the engine still "
                       f"has {report.running_requests} running and {report.waiting_requests} "
                       "waiting requests")
            return False
        return True

    async def _compare_alone(self, g: _Greedy) -> None:
        try:
            self.requests += 1
            alone = await self.engine.generate(input_ids=g.input_ids, **_greedy_sampling(g.max_tokens))
        except Exception as exc:
            kind, what = _describe_error(exc)
            self.fault(g.index, kind, f"greedy re-run alone: {what}")
            return
        problem = first_greedy_mismatch(alone, g.completion, self.margin)
        if problem is not None:
            self.fault(g.index, "mismatch", f"greedy in the mix vs alone: {problem}")


async def wait_idle(engine: Engine, timeout: float = 10.0) -> bool:
    """Wait until ``engine`` has no running or queued request (polling its statistics);
    False if it is still busy after ``timeout`` seconds."""
    with anyio.move_on_after(timeout):
        while True:
            stats = engine.statistics()
            if stats.running_requests == 0 and stats.queued_requests == 0:
                return True
            await anyio.sleep(0.005)
    return False


def _describe_error(exc: BaseException) -> tuple[str, str]:
    """The fault kind and message of a program's exception (groups: their leaves)."""
    leaves = list(leaf_errors(exc))
    kind = "mismatch" if any(isinstance(e, _Mismatch) for e in leaves) else "error"
    return kind, "; ".join(str(e) if isinstance(e, _Mismatch) else f"{type(e).__name__}: {e}"
                           for e in leaves)


class _Counting(Backend):
    """The engine as the programs' backend, counting the generate and score calls."""

    def __init__(self, run: _Run) -> None:
        self._run = run
        self._engine = run.engine
        self.capabilities = run.engine.capabilities

    @property
    def chat_template(self) -> Any:
        return self._engine.chat_template

    @property
    def model_name(self) -> str:
        return self._engine.model_name

    def stream(self, request: GenerateRequest) -> AbstractAsyncContextManager[AsyncIterator[Chunk]]:
        self._run.requests += 1
        return self._engine.stream(request)

    async def score(self, prefix: GenerateRequest, continuations: Sequence[str],
                    method: str = "token_length_normalized") -> ScoreResult:
        self._run.requests += 1
        return await self._engine.score(prefix, continuations, method)

    async def prefill(self, prefix: GenerateRequest) -> None:
        await self._engine.prefill(prefix)


# ---------------------------------------------------------------------------- programs

#: A program's coroutine: ``body(run, index)``.
_Body = Callable[[_Run, int], Awaitable[None]]
#: One step of a frontend program, applied to a state (or a fork branch).
_Op = Callable[["ProgramState", _Run], Awaitable[None]]


@attrs.frozen(kw_only=True)
class _Program:
    label: str
    body: _Body


def _build(rng: random.Random, lim: _Limits) -> _Program:
    """One random program, drawn from ``rng`` alone (all randomness is drawn here)."""
    kind = rng.choices(list(_KINDS), weights=[w for w, _ in _KINDS.values()])[0]
    return _KINDS[kind][1](rng, lim)


def _prefix(rng: random.Random) -> str:
    """A program's opening text: half the time one of a few prefixes shared across
    programs (cache hits, in-batch prefix sharing), else a few words of its own."""
    if rng.random() < 0.5:
        return sentence(random.Random(rng.randrange(4)), 24) + "\n"
    return sentence(rng, rng.randint(1, 6)) + "\n"


def _text(rng: random.Random) -> str:
    """A few words of text before a generation; sometimes odd characters."""
    text = words(rng, rng.randint(1, 8))
    if rng.random() < 0.15:
        text += rng.choice([" é ü ß", " 🙂 ok", "\n\t", ' "quoted"', " {json: 1}"])
    return text


def _sampling(rng: random.Random) -> dict[str, Any]:
    if rng.random() < 0.5:
        return {"temperature": 0.0}
    out: dict[str, Any] = {"temperature": rng.choice([0.5, 1.0, 1.5]), "seed": rng.randrange(2**31)}
    if rng.random() < 0.4:
        key, value = rng.choice([("top_p", 0.9), ("top_k", 20), ("min_p", 0.05),
                                 ("frequency_penalty", 0.8), ("presence_penalty", -0.5)])
        out[key] = value
    return out


def _greedy_sampling(max_tokens: int) -> dict[str, Any]:
    return {"temperature": 0.0, "max_tokens": max_tokens, "ignore_eos": True,
            "logprobs": True, "top_logprobs": 2}


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


def _prompt_ids(rng: random.Random, lim: _Limits, n: int) -> list[int]:
    """``n`` token ids; half the time after a prefix shared with other programs."""
    shared: list[int] = []
    if rng.random() < 0.5:
        pool = random.Random(rng.randrange(3))
        shared = [pool.randrange(lim.vocab) for _ in range(min(n // 2, 256))]
    return shared + [rng.randrange(lim.vocab) for _ in range(n - len(shared))]


def _check_completion(done: Completion, *, prompt_len: int, max_tokens: int,
                      ignore_eos: bool) -> None:
    """Raise :class:`_Mismatch` if ``done`` breaks a rule any completion keeps."""
    n = len(done.token_ids)
    problems = []
    if n > max_tokens or (ignore_eos and (n != max_tokens or done.finish_reason != "length")):
        problems.append(f"{n} tokens, finish {done.finish_reason!r} for max_tokens={max_tokens}"
                        f"{' and ignore_eos' if ignore_eos else ''}")
    if done.usage.prompt_tokens != prompt_len or done.usage.completion_tokens != n:
        problems.append(f"usage {done.usage} for a {prompt_len}-token prompt and {n} tokens")
    if done.logprobs and [lp.token_id for lp in done.logprobs] != list(done.token_ids):
        problems.append("logprobs are not those of the generated tokens")
    if problems:
        raise _Mismatch("; ".join(problems))


def _long_prompt(rng: random.Random, lim: _Limits) -> _Program:
    """A token-id prompt that leaves room for just ``max_tokens`` (and a small margin)."""
    max_tokens = rng.randint(1, lim.max_new_tokens)
    n = max(1, lim.context - max_tokens - rng.randint(0, 8))
    ids = _prompt_ids(rng, lim, n)
    sampling = _sampling(rng)

    async def body(run: _Run, index: int) -> None:
        run.requests += 1
        done = await run.engine.generate(input_ids=ids, max_tokens=max_tokens, **sampling)
        _check_completion(done, prompt_len=n, max_tokens=max_tokens, ignore_eos=False)

    return _Program(label=f"long-prompt({n}+{max_tokens})", body=body)


async def _greedy_in_mix(run: _Run, ids: list[int], max_tokens: int) -> Completion:
    """Run a greedy request (with top-2 logprobs) and check its shape."""
    run.requests += 1
    done = await run.engine.generate(input_ids=ids, **_greedy_sampling(max_tokens))
    _check_completion(done, prompt_len=len(ids), max_tokens=max_tokens, ignore_eos=True)
    return done


def _greedy(rng: random.Random, lim: _Limits) -> _Program:
    """A greedy request whose output the round compares with the same request run alone
    (sometimes of 0 tokens: a prefill only)."""
    max_tokens = rng.randint(0, lim.max_new_tokens)
    ids = _prompt_ids(rng, lim, rng.randint(1, 96))

    async def body(run: _Run, index: int) -> None:
        done = await _greedy_in_mix(run, ids, max_tokens)
        run.greedy.append(_Greedy(index=index, input_ids=tuple(ids), max_tokens=max_tokens,
                                  completion=done))

    return _Program(label=f"greedy({len(ids)}+{max_tokens})", body=body)


def _burst(rng: random.Random, lim: _Limits) -> _Program:
    """3–8 greedy requests at once whose outputs together outgrow the KV pool by half (up
    to ``16 * max_new_tokens`` tokens each), so decoding them retracts some and recomputes
    them later. The second half repeats the first: the later twin, retracted first, must
    agree with the earlier one; the first request is also compared with itself run alone."""
    k = rng.randint(3, 8)
    firsts = [_prompt_ids(rng, lim, rng.randint(1, 32)) for _ in range(math.ceil(k / 2))]
    prompts = firsts + firsts[: k - len(firsts)]
    lengths = [max(1, min(16 * lim.max_new_tokens, math.ceil(1.5 * lim.context / k),
                          lim.context - len(ids))) for ids in prompts]

    async def body(run: _Run, index: int) -> None:
        results: list[Any] = [None] * k

        async def one(i: int) -> None:
            results[i] = await _greedy_in_mix(run, prompts[i], lengths[i])

        async with anyio.create_task_group() as tg:
            for i in range(k):
                tg.start_soon(one, i)
        run.greedy.append(_Greedy(index=index, input_ids=tuple(prompts[0]),
                                  max_tokens=lengths[0], completion=results[0]))
        for twin in range(len(firsts), k):
            problem = first_greedy_mismatch(results[twin - len(firsts)], results[twin], run.margin)
            if problem is not None:
                raise _Mismatch(f"request {twin} vs its twin {twin - len(firsts)}: {problem}")

    return _Program(label=f"burst({k}x{max(lengths)})", body=body)


def _dropped_stream(rng: random.Random, lim: _Limits) -> _Program:
    """A stream left after ``keep`` of its chunks (the exit aborts it); sometimes under a
    constraint that cannot finish before ``max_tokens`` (an abort mid-grammar)."""
    max_tokens = rng.randint(2, max(2, lim.max_new_tokens))
    keep = rng.randint(1, max_tokens - 1)
    prompt: dict[str, Any] = ({"prompt": _prefix(rng) + _text(rng)} if rng.random() < 0.5
                              else {"input_ids": _prompt_ids(rng, lim, rng.randint(1, 64))})
    constraint = None
    if rng.random() < 0.3:
        constraint = rng.choice([Regex(f"[a-z ]{{{max_tokens},}}"),
                                 JSONSchema(_json_schema(rng)[0])])
    sampling = _sampling(rng)

    async def body(run: _Run, index: int) -> None:
        run.requests += 1
        got = 0
        async with run.engine.stream(**prompt, max_tokens=max_tokens, ignore_eos=True,
                                     constraint=constraint, **sampling) as chunks:
            async for chunk in chunks:
                got += 1
                if got == keep and chunk.finish_reason is None:
                    run.dropped_streams += 1
                    break

    label = f"dropped-stream({keep}/{max_tokens}{', constrained' if constraint else ''})"
    return _Program(label=label, body=body)


def _flush(rng: random.Random, lim: _Limits) -> _Program:
    """``engine.flush_cache()`` while other programs run (it may evict only unlocked
    prefixes), after a random short delay."""
    delay = rng.uniform(0.0, 0.02)

    async def body(run: _Run, index: int) -> None:
        await anyio.sleep(delay)
        freed = await run.engine.flush_cache()
        if not isinstance(freed, int) or freed < 0:
            raise _Mismatch(f"flush_cache returned {freed!r}, not a count of freed tokens")

    return _Program(label=f"flush({delay * 1000:.0f} ms)", body=body)


def _cancelled(rng: random.Random, lim: _Limits) -> _Program:
    """Another kind of program, cancelled after a random short delay."""
    delay = rng.uniform(0.0, 0.05)
    kind = rng.choices([k for k in _KINDS if k != "cancel"],
                       weights=[w for k, (w, _) in _KINDS.items() if k != "cancel"])[0]
    inner = _KINDS[kind][1](rng, lim)

    async def body(run: _Run, index: int) -> None:
        with anyio.move_on_after(delay) as scope:
            await inner.body(run, index)
        if scope.cancelled_caught:
            run.cancelled += 1

    return _Program(label=f"cancel({delay * 1000:.0f} ms, {inner.label})", body=body)


_LEAF_OPS = {"gen": _gen_op, "select": _select_op, "constrained": _constrained_op}

#: Each kind of program: its weight in the mix and how to build one.
_KINDS: dict[str, tuple[float, Callable[[random.Random, _Limits], _Program]]] = {
    "frontend": (45, _frontend),
    "greedy": (12, _greedy),
    "burst": (5, _burst),
    "dropped-stream": (12, _dropped_stream),
    "long-prompt": (8, _long_prompt),
    "flush": (2, _flush),
    "cancel": (20, _cancelled),
}
