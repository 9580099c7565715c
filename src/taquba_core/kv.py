"""The abstract transactional key-value interface every store implements.

A backend knows nothing about jobs: it stores bytes under bytes keys with
snapshot isolation.  Semantics every adapter must keep:

* reads (``get``, ``scan``) see the snapshot taken at ``begin`` plus the
  transaction's own writes;
* ``commit`` raises :class:`~taquba_core.errors.StoreConflict` when another
  transaction committed a write (put or delete) to a key this one also
  wrote after this one began (first committer wins) and then applies
  nothing;
* ``merge_counter`` adds a signed 64-bit delta to a little-endian counter;
  merges commute and take no part in conflict detection;
* ``commit(durable=True)`` returns once the write is durable;
  ``durable=False`` may return before (for background sweeps).
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod

COUNTER = struct.Struct("<q")


def decode_counter(value: bytes | None) -> int:
    """A counter's value; an absent key is 0."""
    return COUNTER.unpack(value)[0] if value else 0


def add_counter(existing: bytes | None, operand: bytes) -> bytes:
    """The counter merge: existing + operand, both signed 64-bit little-endian."""
    return COUNTER.pack(decode_counter(existing) + COUNTER.unpack(operand)[0])


class Transaction(ABC):
    """One snapshot-isolated transaction.  Use once: commit or roll back."""

    @abstractmethod
    async def get(self, key: bytes) -> bytes | None:
        """The value under ``key``, or ``None``."""

    @abstractmethod
    async def scan(
        self,
        prefix: bytes,
        *,
        start_after: bytes | None = None,
        end: bytes | None = None,
        limit: int | None = None,
    ) -> list[tuple[bytes, bytes]]:
        """Up to ``limit`` (key, value) pairs whose key starts with ``prefix``, ascending.

        ``start_after`` (exclusive) and ``end`` (exclusive) narrow the range;
        both are full keys.
        """

    @abstractmethod
    async def put(self, key: bytes, value: bytes) -> None:
        """Write ``value`` under ``key``."""

    @abstractmethod
    async def delete(self, key: bytes) -> None:
        """Delete ``key`` (a no-op when absent, but still a write for conflicts)."""

    @abstractmethod
    async def merge_counter(self, key: bytes, delta: int) -> None:
        """Add ``delta`` (signed 64-bit) to the counter under ``key``; no conflict."""

    @abstractmethod
    async def commit(self, *, durable: bool = True) -> None:
        """Apply the writes atomically.

        Raises:
            StoreConflict: a concurrent commit wrote a key this one wrote.
            StoreFenced: another writer took the store over.
        """

    @abstractmethod
    async def rollback(self) -> None:
        """Discard the writes."""


class KVStore(ABC):
    """A transactional store.  ``url`` names it for messages."""

    url: str = ""

    @abstractmethod
    async def begin(self) -> Transaction:
        """Start a snapshot-isolated transaction."""

    @abstractmethod
    async def close(self) -> None:
        """Flush and release the store; later calls fail."""
