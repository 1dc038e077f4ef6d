"""What one program run shares between its states: the backend, its session, the run-level
sampling defaults and the stream-event sink; and the small values a run produces."""

from __future__ import annotations

import functools
import itertools
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from ..backends.base import Backend, Capabilities, TokenLogprob, Usage
from ..chat import SIMPLE_TEMPLATE, ChatTemplate
from ..constraints.base import Constraint
from ..errors import UnsupportedFeature
from ..primitives import Gen
from ..sampling import SamplingParams
from ..tools.spec import ToolCall

__all__ = ["GenerationMeta", "RunContext", "StreamEvent", "is_json_schema", "next_request_id"]

_ids = itertools.count()
_ID_PREFIX = uuid.uuid4().hex[:16]


def next_request_id() -> str:
    """A process-unique request id (cheaper than a uuid4 per request)."""
    return f"{_ID_PREFIX}-{next(_ids)}"


def is_json_schema(constraint: Constraint | None) -> bool:
    """True when ``constraint`` stands for a JSON schema (its output is one JSON value)."""
    grammar = constraint.as_grammar() if constraint is not None else None
    return grammar is not None and grammar.kind == "json_schema"


@functools.lru_cache(maxsize=4096)
def _merged_sampling(gen: Gen, defaults: tuple[tuple[str, Any], ...]) -> SamplingParams:
    return gen.sampling_params(dict(defaults))


@attrs.frozen(kw_only=True)
class StreamEvent:
    """A piece of generated text, as ``program.stream(...)`` yields it.

    ``name`` is the variable being generated (``None`` for an unnamed ``gen``), ``text`` the
    new text (the deltas of one variable concatenate to its final text; for a gen that
    called tools, to the text it wrote besides the calls), ``branch`` the path of
    fork-branch indices of the state that generated it (``()`` for the program's own).
    ``reasoning`` is new thinking of a ``reasoning=True`` gen. ``partial`` is the value so
    far of a ``json_schema`` gen (``{"name": "Al"}``: see
    :func:`aiolm.tools.partial_json.parse_partial_json`) or of a gen with tools (the calls
    so far, as ``[{"name": ..., "arguments": {...}}]``); ``None`` for other gens.
    """

    name: str | None
    text: str
    branch: tuple[int, ...] = ()
    reasoning: str = ""
    partial: Any = None


@attrs.frozen(kw_only=True)
class GenerationMeta:
    """How a ``gen`` or ``select`` variable was produced (``state.meta(name)``).

    Token counts are the backend's (words for the scripted backend). ``logprobs`` is set when
    the gen asked for ``return_logprobs`` / ``top_logprobs``; ``choice_logprobs`` (select
    only) is each choice's normalized logprob. A gen with ``reasoning=True`` has its thinking
    in ``reasoning``; a gen with ``tools`` has the calls it made in ``tool_calls`` (empty
    when it answered in text; ``finish_reason`` is ``"tool_calls"`` when it called).
    ``attempts`` is how many outputs were generated to get one that passes its constraint's
    check after decoding (1 unless an output failed it; see ``docs/constraints.md``).
    """

    finish_reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] | None = None
    matched_stop: str | int | None = None
    choice_logprobs: tuple[float, ...] | None = None
    reasoning: str | None = None
    tool_calls: tuple[ToolCall, ...] | None = None
    attempts: int = 1

    @classmethod
    def from_usage(cls, usage: Usage, *, finish_reason: str, **extra: object) -> GenerationMeta:
        """Meta of a variable from the backend's token counts (``extra``: the other fields)."""
        return cls(
            finish_reason=finish_reason,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cached_tokens=usage.cached_tokens,
            **extra,
        )


EmitFn = Callable[[StreamEvent], Awaitable[None]]


@attrs.define(eq=False)
class RunContext:
    """Shared by a program run's state and all its fork branches (one backend session)."""

    backend: Backend
    defaults: dict[str, Any]
    emit: EmitFn | None = None
    #: The program's name (shown by a state's repr and notebook display).
    program: str = ""
    session: Any = attrs.field(init=False)
    caps: Capabilities = attrs.field(init=False)
    template: ChatTemplate = attrs.field(init=False)
    chat: bool = attrs.field(init=False)
    _defaults_key: tuple[tuple[str, Any], ...] | None = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.session = self.backend.new_session()
        self.caps = self.backend.capabilities
        self.template = self.backend.chat_template or SIMPLE_TEMPLATE
        self.chat = self.caps.chat_only
        try:
            self._defaults_key = tuple(sorted(self.defaults.items()))
            hash(self._defaults_key)
        except TypeError:  # an unhashable default (a list of stop token ids): no memo
            self._defaults_key = None

    def sampling_for(self, gen: Gen) -> SamplingParams:
        """``gen``'s sampling params over the run's defaults.

        Memoized across runs: the same gens recur in every run of a program (run_batch).
        """
        if self._defaults_key is not None:
            try:
                return _merged_sampling(gen, self._defaults_key)
            except TypeError:  # the gen holds an unhashable setting
                pass
        return gen.sampling_params(self.defaults)

    def check_constraint(self, constraint: Constraint, what: str) -> None:
        """Raise ``UnsupportedFeature`` if the backend cannot enforce ``constraint``."""
        if is_json_schema(constraint):
            if not self.caps.json_schema:
                raise UnsupportedFeature(
                    f"{self.backend.model_name} cannot constrain {what} to a JSON schema; "
                    "use a backend that supports json_schema (aiolm.Engine)"
                )
        elif not self.caps.regex:
            raise UnsupportedFeature(
                f"{self.backend.model_name} cannot constrain {what} with "
                f"{type(constraint).__name__} (regex, grammar, choices and dtype need "
                "token-level constraints); use aiolm.Engine, or select() for choices"
            )
