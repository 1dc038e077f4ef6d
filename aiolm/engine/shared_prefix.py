"""Shared-prefix ("cascade") decode: which requests of a decode batch share a cached prefix.

Requests that share a long prompt prefix (the same image, few-shot examples, a system
prompt, a fork's trunk) hold the same KV slots for it: the radix cache gives every one of
them the tree's slots (``req_to_token[row, :locked_len]`` are the slots of the path from the
root to the request's ``last_node``). A plain decode step still reads that prefix's K/V once
per request; :func:`~aiolm.engine.attention.triton_kernels.decode_attention_shared` reads it
once per group and gives each member its own suffix on top.

:func:`find_groups` forms the groups on the host from the tree: each request's *anchor* is
the first node of its path at least ``min_tokens`` deep; requests with the same anchor share
at least that much, and a group's shared length is the depth of its members' deepest common
node (never past any member's ``locked_len``). :func:`prefix_groups` puts them on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs
import torch

if TYPE_CHECKING:
    from .request import Req

__all__ = ["AUTO_MIN_TOKENS", "PrefixGroups", "auto_min_tokens", "find_groups", "max_members",
           "prefix_groups"]

#: The shared prefix ``shared_prefix_min_tokens=None`` groups from, for the models it is
#: turned on for. Measured on nvidia-h200 (64 requests in groups of 5, 32 KV heads of 128):
#: 2,340 shared tokens read 1.6x faster grouped, 600 only 1.1x; end to end llava-next-7b's
#: image-qa 1.23x, llava-1.5-7b's (576-token pictures) 0.92x (docs/engine.md).
AUTO_MIN_TOKENS = 1024

#: The most query rows (members x query heads of a KV head) one program of the kernel holds.
_MAX_ROWS = 64


def auto_min_tokens(num_q_heads: int, num_kv_heads: int, device_type: str) -> int:
    """What ``shared_prefix_min_tokens=None`` means for a model: :data:`AUTO_MIN_TOKENS` for
    a multi-head model (one query head per KV head) on CUDA, else 0 (off). With grouped-query
    heads the plain kernel already reads a repeated prefix from the L2 cache and the
    grouped one was slower (0.85x at Llama-3's 32 x 8 heads on nvidia-h200)."""
    if device_type == "cuda" and num_q_heads == num_kv_heads:
        return AUTO_MIN_TOKENS
    return 0


def max_members(num_q_heads: int, num_kv_heads: int) -> int:
    """The most requests one group may have for a model with these (per-device) heads: the
    kernel keeps every member's queries of one KV head in registers (at most 64 rows)."""
    per_kv_head = 1 << max(0, (num_q_heads // num_kv_heads) - 1).bit_length()
    return max(2, min(16, _MAX_ROWS // per_kv_head))


@attrs.frozen(kw_only=True, eq=False)
class PrefixGroups:
    """A decode batch's shared-prefix groups, as the attention kernels read them.

    ``prefix_lens`` int32 [bs]: each request's shared prefix (0: in no group); ``rows``
    int32 [G, M]: each group's members (batch indices, -1 padding); ``lens`` int32 [G]:
    each group's shared length. ``max_len`` and ``max_suffix`` (the longest shared prefix
    and the longest rest of a sequence past its shared prefix) let the backend plan its
    splits without reading the device.
    """

    prefix_lens: torch.Tensor
    rows: torch.Tensor
    lens: torch.Tensor
    max_len: int
    max_suffix: int

    @property
    def count(self) -> int:
        """How many groups."""
        return self.rows.shape[0]


def _path(node: Any) -> list[Any]:
    """The nodes from the root's child down to ``node`` (the root has no parent)."""
    out = []
    while node is not None and node.parent is not None:
        out.append(node)
        node = node.parent
    out.reverse()
    return out


def find_groups(reqs: Sequence[Req], *, min_tokens: int, max_members: int = 16,
                ) -> list[tuple[int, list[int]]]:
    """The groups of ``reqs`` (a decode batch, in order) sharing a cached prefix of at least
    ``min_tokens`` tokens: ``(shared length, batch indices)`` pairs, each with 2 to
    ``max_members`` members, the indices ascending. ``min_tokens`` 0 or less: no groups."""
    if min_tokens <= 0 or len(reqs) < 2:
        return []
    by_anchor: dict[int, list[tuple[int, list[Any], list[int]]]] = {}
    for i, req in enumerate(reqs):
        if req.last_node is None or req.locked_len < min_tokens:
            continue
        path = _path(req.last_node)
        depths, depth = [], 0
        for node in path:
            depth += len(node.key)
            depths.append(depth)
        anchor = next((k for k, d in enumerate(depths) if d >= min_tokens), None)
        if anchor is None:
            continue
        by_anchor.setdefault(id(path[anchor]), []).append((i, path, depths))
    groups: list[tuple[int, list[int]]] = []
    for members in by_anchor.values():
        if len(members) < 2:
            continue
        for start in range(0, len(members), max_members):
            chunk = members[start:start + max_members]
            if len(chunk) < 2:
                continue
            first_path, first_depths = chunk[0][1], chunk[0][2]
            common = 0
            for k, node in enumerate(first_path):
                if all(len(p) > k and p[k] is node for _, p, _ in chunk):
                    common = k
                else:
                    break
            shared = min(first_depths[common], *(reqs[i].locked_len for i, _, _ in chunk))
            if shared >= min_tokens:
                groups.append((shared, [i for i, _, _ in chunk]))
    return groups


def prefix_groups(groups: Sequence[tuple[int, Sequence[int]]], seq_lens: Sequence[int],
                  device: torch.device, *, width: int | None = None) -> PrefixGroups | None:
    """``groups`` (from :func:`find_groups`) on ``device`` for a batch of ``seq_lens``, or
    None for no groups. ``width``: the members a row holds (padded with -1; default the
    largest group's); a fixed width keeps the kernel's shape, so it compiles once."""
    if not groups:
        return None
    width = width or max(len(m) for _, m in groups)
    prefix = [0] * len(seq_lens)
    rows: list[int] = []
    for shared, members in groups:
        for i in members:
            prefix[i] = shared
        rows += [*members, *([-1] * (width - len(members)))]
    # One copy to the device for the three. Each starts on 16 bytes, as a tensor of its own
    # would: Triton compiles a kernel variant per pointer alignment.
    bs, cells = len(seq_lens), len(rows)
    at_rows, at_lens = _aligned(bs), _aligned(bs) + _aligned(cells)
    flat = [0] * (at_lens + len(groups))
    flat[:bs], flat[at_rows:at_rows + cells] = prefix, rows
    flat[at_lens:] = [shared for shared, _ in groups]
    on_device = torch.tensor(flat, dtype=torch.int32).to(device, non_blocking=True)
    return PrefixGroups(prefix_lens=on_device[:bs],
                        rows=on_device[at_rows:at_rows + cells].view(-1, width),
                        lens=on_device[at_lens:], max_len=max(shared for shared, _ in groups),
                        max_suffix=max(s - p for s, p in zip(seq_lens, prefix, strict=True)))


def _aligned(n: int) -> int:
    """``n`` int32 values rounded up to whole 16 bytes."""
    return -(-n // 4) * 4
