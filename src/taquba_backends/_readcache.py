"""The values last pruned from the SlateDB adapter's overlay, so that reads of them skip SlateDB.

A queue mostly reads what it wrote moments ago: a claim reads the record an
enqueue just put, an ack the record the claim just put.  The SlateDB
adapter keeps recent commits in its overlay (see ``_versions.py``) until
every open transaction's snapshot holds them; :class:`ReadCache` then keeps
the newest value pruned per key (``None``: deleted), up to a byte budget.
The process that opened a store is its only writer, so that value is the
key's value for every transaction until the overlay holds a newer version,
and a read answered here saves a call across the FFI boundary.

Forgetting is always safe (the read goes to SlateDB instead), so the cache
evicts the keys written longest ago.
"""

from __future__ import annotations

ENTRY_OVERHEAD = 96
"""Bytes charged per entry beyond its key and value (dict slot, tuple, object headers)."""


class Miss:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISS"


MISS = Miss()
"""What :meth:`ReadCache.get` returns for a key it does not hold."""


class ReadCache:
    """Committed values (``None``: deleted) of recently written keys, within ``budget`` bytes."""

    __slots__ = ("_budget", "_entries", "_size")

    def __init__(self, budget: int) -> None:
        self._budget = budget
        self._entries: dict[bytes, bytes | None] = {}
        self._size = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size(self) -> int:
        """Bytes charged for the entries held (keys, values and :data:`ENTRY_OVERHEAD` each)."""
        return self._size

    def get(self, key: bytes) -> bytes | None | Miss:
        """The last committed value under ``key`` (``None``: deleted), or :data:`MISS`."""
        return self._entries.get(key, MISS)

    def remember(self, key: bytes, value: bytes | None) -> None:
        """Record ``value`` (``None``: deleted) under ``key``; evict the keys remembered longest ago beyond the budget."""
        entries = self._entries
        old = entries.pop(key, MISS)
        if old is not MISS:
            self._size -= _cost(key, old)  # type: ignore[arg-type]
        entries[key] = value  # at the end: the most recent
        self._size += _cost(key, value)
        while self._size > self._budget and entries:
            oldest = next(iter(entries))
            self._size -= _cost(oldest, entries.pop(oldest))


def _cost(key: bytes, value: bytes | None) -> int:
    return len(key) + (len(value) if value is not None else 0) + ENTRY_OVERHEAD
