"""KV memory: the token-slot allocator, the per-layer K/V buffers and the request → slots table.

Memory is token-granular (page size 1, like the radix tree): every token of every sequence
occupies one *slot*, an index into the K/V buffers of every layer. Slot 0 is reserved for
padding (CUDA-graph padding rows write their K/V there), so real slots are ``1..size`` and
the buffers have ``size + 1`` rows.
"""

from __future__ import annotations

import torch

__all__ = ["KVPool", "ReqToTokenPool", "TokenSlotAllocator", "kv_bytes_per_token"]


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name}: must be >= 1, got {value}")
    return value


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype) -> int:
    """Bytes of K and V one token occupies across all layers (what one KV slot costs)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * num_kv_heads * head_dim * elem


class TokenSlotAllocator:
    """Hands out KV slots ``1..size``.

    The free list is a tensor on ``device``; freed slots are queued and merged into it only
    when an allocation needs them, so ``alloc`` and ``free`` cost O(1) Python work whatever
    their size (no per-token loops). Slots are recycled first-in first-out.
    """

    def __init__(self, size: int, device: torch.device | str = "cpu") -> None:
        self.size = _positive_int("size", size)
        self.device = torch.device(device)
        self._free = torch.arange(1, size + 1, dtype=torch.int64, device=self.device)
        self._pending: list[torch.Tensor] = []
        self._available = size

    def available_size(self) -> int:
        """Number of free slots."""
        return self._available

    def alloc(self, n: int) -> torch.Tensor | None:
        """Take ``n`` free slots: an int64 tensor of ``n`` distinct slot ids on the device.

        Returns ``None`` (and takes nothing) when fewer than ``n`` slots are free; never a
        partial allocation.
        """
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n: expected an int, got {type(n).__name__}")
        if n < 0:
            raise ValueError(f"n: must be >= 0, got {n}")
        if n > self._available:
            return None
        if n > self._free.numel():
            self._merge()
        out = self._free[:n].clone()
        self._free = self._free[n:]
        self._available -= n
        return out

    def free(self, slots: torch.Tensor) -> None:
        """Return ``slots`` (any integer tensor of slot ids) to the free list.

        The caller guarantees the slots are allocated and not freed twice;
        :meth:`free_slots` lets an integrity check verify it.
        """
        n = slots.numel()
        if n == 0:
            return
        self._pending.append(slots.reshape(-1).to(device=self.device, dtype=torch.int64))
        self._available += n

    def free_slots(self) -> torch.Tensor:
        """A copy of every free slot id (for integrity checks; not for the hot path)."""
        self._merge()
        return self._free.clone()

    def reset(self) -> None:
        """Mark every slot free (the caller drops every reference to allocated slots)."""
        self._free = torch.arange(1, self.size + 1, dtype=torch.int64, device=self.device)
        self._pending.clear()
        self._available = self.size

    def _merge(self) -> None:
        if self._pending:
            self._free = torch.cat([self._free, *self._pending])
            self._pending.clear()


class KVPool:
    """Per-layer K and V buffers of shape ``[size + 1, num_kv_heads, head_dim]``."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, size: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.num_layers = _positive_int("num_layers", num_layers)
        self.num_kv_heads = _positive_int("num_kv_heads", num_kv_heads)
        self.head_dim = _positive_int("head_dim", head_dim)
        self.size = _positive_int("size", size)
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (size + 1, num_kv_heads, head_dim)
        # Padding rows read slot 0, which must never hold NaN garbage: it is zeroed. Every
        # other slot is written before it is read (K/V of a request's first kv_len tokens),
        # so on the CPU the rest is left unwritten: its pages are committed only as slots
        # are first used, and a large idle pool costs neither RAM nor start-up time. On CUDA
        # memory is committed at allocation anyway and zeroing it costs nothing.
        alloc = torch.empty if self.device.type == "cpu" else torch.zeros
        self.k_buffers = [alloc(shape, dtype=dtype, device=self.device)
                          for _ in range(num_layers)]
        self.v_buffers = [alloc(shape, dtype=dtype, device=self.device)
                          for _ in range(num_layers)]
        for buf in (*self.k_buffers, *self.v_buffers):
            buf[0].zero_()

    def set_kv(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k``/``v`` (``[n, num_kv_heads, head_dim]``) to rows ``slots`` of ``layer``."""
        self.k_buffers[layer][slots] = k.to(self.dtype)
        self.v_buffers[layer][slots] = v.to(self.dtype)

    def get_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole K and V buffers of ``layer``."""
        return self.k_buffers[layer], self.v_buffers[layer]

    def kv_bytes_per_token(self) -> int:
        """Bytes of K/V one token occupies across all layers (:func:`kv_bytes_per_token`)."""
        return kv_bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype)


class ReqToTokenPool:
    """The request → slots table: ``req_to_token[row, j]`` is the slot of token ``j``.

    ``req_to_token`` is an int32 tensor ``[max_requests, max_context_len]``; each running
    request owns one row from :meth:`alloc` until :meth:`free`.
    """

    def __init__(self, max_requests: int, max_context_len: int,
                 device: torch.device | str = "cpu") -> None:
        self.max_requests = _positive_int("max_requests", max_requests)
        self.max_context_len = _positive_int("max_context_len", max_context_len)
        self.device = torch.device(device)
        self.req_to_token = torch.zeros((max_requests, max_context_len), dtype=torch.int32,
                                        device=self.device)
        # Popped from the end: row 0 is handed out first.
        self._free_rows = list(range(max_requests - 1, -1, -1))
        self._is_free = [True] * max_requests

    def available_size(self) -> int:
        """Number of free rows."""
        return len(self._free_rows)

    def alloc(self) -> int | None:
        """Take a free row, or ``None`` when every row is in use."""
        if not self._free_rows:
            return None
        row = self._free_rows.pop()
        self._is_free[row] = False
        return row

    def is_free(self, row: int) -> bool:
        """Whether ``row`` (in ``0..max_requests - 1``) is free."""
        return self._is_free[row]

    def free(self, row: int) -> None:
        """Give ``row`` back. Raises ``RuntimeError`` when it is already free."""
        if not 0 <= row < self.max_requests:
            raise ValueError(f"row: must be in [0, {self.max_requests}), got {row}")
        if self._is_free[row]:
            raise RuntimeError(f"req_to_token row {row} freed twice")
        self._is_free[row] = True
        self._free_rows.append(row)

    def write(self, row: int, start: int, slots: torch.Tensor) -> None:
        """Record ``slots`` as the slots of tokens ``start .. start + len(slots)`` of ``row``."""
        n = slots.numel()
        if n:
            self.req_to_token[row, start:start + n] = slots.to(torch.int32)

    def read(self, row: int, start: int, end: int) -> torch.Tensor:
        """The slots of tokens ``start .. end`` of ``row`` as an int64 tensor."""
        return self.req_to_token[row, start:end].to(torch.int64)
