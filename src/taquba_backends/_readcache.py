"""The values this process last committed, kept so that reads of them skip SlateDB.

A queue mostly reads what it wrote moments ago: a claim reads the record an
enqueue just put, an ack the record the claim just put.  On SlateDB each such
read costs a snapshot and a point read, two calls across the FFI boundary
whose completion wakes the event loop from another thread.  The process that
opened a store is its only writer, so the value it last committed under a
key *is* the key's current value: :class:`ReadCache` keeps those values (and
deletions, as ``None``) for the most recently written keys, up to a byte
budget, and :class:`~taquba_backends.slatedb_store.SlateDBTransaction`
answers reads from it when no commit after its start wrote the key.

Forgetting is always safe (the read goes to SlateDB instead), so the cache
evicts the keys written longest ago, and a write whose outcome is unknown
forgets its keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

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

    def remember(self, writes: Mapping[bytes, bytes | None]) -> None:
        """Record committed ``writes``; evict the keys written longest ago beyond the budget."""
        entries = self._entries
        for key, value in writes.items():
            old = entries.pop(key, MISS)
            if old is not MISS:
                self._size -= _cost(key, old)  # type: ignore[arg-type]
            entries[key] = value  # at the end: the most recently written
            self._size += _cost(key, value)
        while self._size > self._budget and entries:
            key = next(iter(entries))
            self._size -= _cost(key, entries.pop(key))

    def forget(self, keys: Iterable[bytes]) -> None:
        """Drop ``keys`` (their committed values are no longer known)."""
        for key in keys:
            old = self._entries.pop(key, MISS)
            if old is not MISS:
                self._size -= _cost(key, old)  # type: ignore[arg-type]

    def clear(self) -> None:
        self._entries.clear()
        self._size = 0


def _cost(key: bytes, value: bytes | None) -> int:
    return len(key) + (len(value) if value is not None else 0) + ENTRY_OVERHEAD
