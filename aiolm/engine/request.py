"""One generation request as the engine loop sees it: plain state, no behaviour.

THE INVARIANT (shared by prefill, chunked prefill, retraction-recompute and jump-forward):
a request's tokens are :attr:`Req.all_ids`, one list that grows as tokens arrive (the prompt,
then the output); K/V exist for the first ``kv_len`` of them
(``req_to_token[req_pool_idx, :kv_len]``). When ``num_missing == 1`` the request needs a
DECODE step; when more, an EXTEND of (up to a chunk of) the missing tokens. Sampling
happens only when an extend reaches the end of ``all_ids``.

The overlapped loop samples a token on the device before the host knows it: until then it
stands in ``all_ids`` as a *placeholder*, a negative id (``-1 - j``: row ``j`` of the
sampled ids of the pass in flight), and ``pending`` counts the placeholders, always the last
items of ``all_ids``. A request with placeholders may decode (its input is taken on the
device) but is never matched against the prefix cache nor cached up to them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, MutableSequence
from typing import TYPE_CHECKING, Any, overload

import attrs

from ..sampling import SamplingParams

if TYPE_CHECKING:
    from ..cache.radix import TreeNode
    from ..constraints.base import Matcher
    from .multimodal import MultimodalInputs

__all__ = ["OutputIds", "Req"]


class OutputIds(MutableSequence[int]):
    """A request's output tokens: a live view of ``all_ids`` after the prompt.

    Reading copies nothing but what is asked for; ``append`` / ``extend`` / ``+=`` grow the
    request's one token list in place. Compares equal to a list or tuple of the same ids.
    """

    __slots__ = ("_ids", "_start")

    def __init__(self, ids: list[int], start: int) -> None:
        self._ids = ids
        self._start = start

    def __len__(self) -> int:
        return len(self._ids) - self._start

    def _index(self, i: int) -> int:
        n = len(self._ids) - self._start
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("output_ids index out of range")
        return self._start + i

    @overload
    def __getitem__(self, i: int) -> int: ...
    @overload
    def __getitem__(self, i: slice) -> list[int]: ...
    def __getitem__(self, i: int | slice) -> int | list[int]:
        if isinstance(i, slice):
            return self._ids[self._start:][i]
        return self._ids[self._index(i)]

    def __setitem__(self, i: Any, value: Any) -> None:
        if isinstance(i, slice):
            tail = self._ids[self._start:]
            tail[i] = value
            self._ids[self._start:] = tail
        else:
            self._ids[self._index(i)] = value

    def __delitem__(self, i: int | slice) -> None:
        if isinstance(i, slice):
            tail = self._ids[self._start:]
            del tail[i]
            self._ids[self._start:] = tail
        else:
            del self._ids[self._index(i)]

    def insert(self, index: int, value: int) -> None:
        n = len(self)
        index = max(0, min(n, index + n if index < 0 else index))
        self._ids.insert(self._start + index, value)

    def append(self, value: int) -> None:
        self._ids.append(value)

    def extend(self, values: Iterable[int]) -> None:
        self._ids.extend(values)

    def __iadd__(self, values: Iterable[int]) -> OutputIds:
        self._ids.extend(values)
        return self

    def __iter__(self) -> Iterator[int]:
        ids, start = self._ids, self._start
        return (ids[k] for k in range(start, len(ids)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, OutputIds | list | tuple):
            return self[:] == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self[:])


@attrs.define(eq=False, kw_only=True, init=False)
class Req:
    """A request's tokens, sampling parameters and engine-side bookkeeping.

    Built as ``Req(rid=..., input_ids=..., sampling=..., output_ids=(), ...)``. Written by
    the scheduler (``req_pool_idx``, ``kv_len``, ``alloc_len``, ``locked_len``,
    ``cached_len``, ``last_node``, ``arrival``, ``overtaken``, ``retractions``) and by the
    runtime (``output_ids``, ``pending``, ``finish_reason``, ``matcher``;
    ``return_all_logits`` and ``max_prefix_match`` once a request that generates has its
    prompt's scores).
    """

    rid: str
    #: The prompt then the output (then the placeholders of tokens in flight): the one list.
    all_ids: list[int]
    #: How many leading tokens of ``all_ids`` are the prompt.
    prompt_len: int
    sampling: SamplingParams = attrs.field(factory=SamplingParams)
    matcher: Matcher | None = None
    #: Scoring: the runner returns the logprobs of every computed token whose next token is
    #: known, not just the last logits (the request is still sampled if ``max_tokens > 0``).
    return_all_logits: bool = False
    #: At most this many leading tokens may come from the prefix cache (scoring needs the
    #: logits from that position on); ``None`` means no limit beyond ``len(all_ids) - 1``.
    max_prefix_match: int | None = None
    #: A caller's own data (the runtime's stream handle, say); the scheduler never reads it.
    user_data: Any = None
    #: The images (videos) of a multimodal request, whose placeholder runs in the prompt
    #: hold pad ids (>= the vocabulary size); None for a text request.
    mm: MultimodalInputs | None = None

    finish_reason: str | None = None
    req_pool_idx: int | None = None
    #: Tokens whose K/V are computed (or queued to be, by a pass in flight) and in the pool.
    kv_len: int = 0
    #: Tokens with slots in ``req_to_token`` (``kv_len`` plus those of the pass scheduled).
    alloc_len: int = 0
    #: Leading tokens whose slots belong to the radix tree (locked through ``last_node``);
    #: the request owns the slots of ``locked_len .. alloc_len``.
    locked_len: int = 0
    #: Prompt tokens that came from the radix cache at first admission (usage.cached_tokens).
    cached_len: int = 0
    last_node: TreeNode | None = None
    #: Monotone arrival counter, set by ``Scheduler.add``.
    arrival: int = 0
    #: Scheduling passes in which later-arrived requests were admitted while this one waited.
    overtaken: int = 0
    #: Times the request was admitted (more than once after retraction).
    admissions: int = 0
    #: Times the request was retracted to free KV memory.
    retractions: int = 0
    #: Placeholders at the end of ``all_ids``: sampled tokens the host does not know yet.
    pending: int = 0
    _outputs: OutputIds = attrs.field(init=False, repr=False)

    def __init__(self, *, rid: str, input_ids: Iterable[int],
                 sampling: SamplingParams | None = None, output_ids: Iterable[int] = (),
                 **fields: Any) -> None:
        ids = list(input_ids)
        prompt_len = len(ids)
        ids.extend(output_ids)
        self.__attrs_init__(rid=rid, all_ids=ids, prompt_len=prompt_len,
                            sampling=sampling if sampling is not None else SamplingParams(),
                            **fields)
        self._outputs = OutputIds(ids, prompt_len)

    @property
    def input_ids(self) -> list[int]:
        """The prompt (a copy)."""
        return self.all_ids[:self.prompt_len]

    @property
    def output_ids(self) -> OutputIds:
        """The output tokens: a live view of ``all_ids`` after the prompt (see
        :class:`OutputIds`); assigning a sequence replaces them."""
        return self._outputs

    @output_ids.setter
    def output_ids(self, values: Iterable[int]) -> None:
        if values is self._outputs:  # ``req.output_ids += ids`` assigns the view back
            return
        self.all_ids[self.prompt_len:] = list(values)

    @property
    def num_outputs(self) -> int:
        """``len(output_ids)``, placeholders included."""
        return len(self.all_ids) - self.prompt_len

    @property
    def seq_len(self) -> int:
        """``len(all_ids)``."""
        return len(self.all_ids)

    @property
    def num_missing(self) -> int:
        """Tokens of ``all_ids`` whose K/V are not computed yet."""
        return len(self.all_ids) - self.kv_len

    @property
    def needs_extend(self) -> bool:
        """True when more than one token is missing (prefill, chunk, recompute, jump-forward),
        or the last one of a prefill-only request (``max_tokens=0``: no decode pass will
        compute it, and a prompt chunked one token short of its end would never finish), or
        any prompt token of a multimodal request (whose prompt only extends compute: a
        decode pass never carries image rows or M-RoPE table positions)."""
        missing = len(self.all_ids) - self.kv_len
        if missing != 1:
            return missing > 1
        return self.sampling.max_tokens == 0 or (self.mm is not None
                                                 and self.kv_len < self.prompt_len)

    @property
    def needs_decode(self) -> bool:
        """True when exactly the last token is missing and ``max_tokens`` allows another
        (a request whose last allowed token is still in flight will finish with it)."""
        return (len(self.all_ids) - self.kv_len == 1
                and len(self.all_ids) - self.prompt_len < self.sampling.max_tokens
                and (self.mm is None or self.kv_len >= self.prompt_len))

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def remaining_tokens(self) -> int:
        """Output tokens still allowed by ``max_tokens``."""
        return max(0, self.sampling.max_tokens - (len(self.all_ids) - self.prompt_len))
