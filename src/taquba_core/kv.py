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
  ``durable=False`` may return before (for background sweeps, and for
  claims, which wait for durability after releasing their queue's lock).
  Either returns a :class:`Durability`: ``await d.wait()`` returns once the
  commit is durable.  Commits become durable in commit order (SlateDB's WAL
  is ordered), so waiting for one commit implies every earlier one.
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


class Durability:
    """What :meth:`Transaction.commit` returns: a way to wait until the commit is durable.

    This base class is the handle of a commit that is durable already (or of
    a store without durability, such as the in-memory one): ``wait`` returns
    at once.  Adapters subclass it for commits still on their way.
    """

    __slots__ = ()

    async def wait(self) -> None:
        """Return once the commit is durable."""


DURABLE = Durability()
"""The handle of a commit that is already durable."""


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
    async def commit(self, *, durable: bool = True) -> Durability:
        """Apply the writes atomically; with ``durable``, return once they are durable.

        Returns a :class:`Durability` (:data:`DURABLE` when ``durable``): the
        writes are visible to later transactions when ``commit`` returns,
        durable once ``wait()`` returned.

        Raises:
            StoreConflict: a concurrent commit wrote a key this one wrote.
            StoreFenced: another writer took the store over.
        """

    @abstractmethod
    async def rollback(self) -> None:
        """Discard the writes."""


class KVStore(ABC):
    """A transactional store.  ``url`` names it for messages.

    ``read_only`` stores refuse writes; a queue opened on one neither
    recovers claims nor runs background sweeps.
    """

    url: str = ""
    read_only: bool = False

    @abstractmethod
    async def begin(self) -> Transaction:
        """Start a snapshot-isolated transaction."""

    async def sync(self) -> None:
        """Return once every commit that a transaction can already read is durable.

        A transaction that wrote nothing gets no durability of its own, yet
        what it read may belong to a commit still on its way to durability;
        a caller that answers from such a read (a dedup hit) syncs first.
        The default suits stores whose commits are durable when visible.
        """

    @abstractmethod
    async def close(self) -> None:
        """Flush and release the store; later calls fail."""


class ForwardingTransaction(Transaction):
    """Forwards every call to ``inner``; subclass it to observe or change some of them."""

    def __init__(self, inner: Transaction) -> None:
        self.inner = inner

    async def get(self, key: bytes) -> bytes | None:
        return await self.inner.get(key)

    async def scan(
        self,
        prefix: bytes,
        *,
        start_after: bytes | None = None,
        end: bytes | None = None,
        limit: int | None = None,
    ) -> list[tuple[bytes, bytes]]:
        return await self.inner.scan(prefix, start_after=start_after, end=end, limit=limit)

    async def put(self, key: bytes, value: bytes) -> None:
        await self.inner.put(key, value)

    async def delete(self, key: bytes) -> None:
        await self.inner.delete(key)

    async def merge_counter(self, key: bytes, delta: int) -> None:
        await self.inner.merge_counter(key, delta)

    async def commit(self, *, durable: bool = True) -> Durability:
        return await self.inner.commit(durable=durable)

    async def rollback(self) -> None:
        await self.inner.rollback()


class ForwardingStore(KVStore):
    """Wraps ``inner``: ``begin`` wraps each transaction with :meth:`wrap` (identity by default)."""

    def __init__(self, inner: KVStore) -> None:
        self.inner = inner
        self.url = inner.url
        self.read_only = inner.read_only

    def wrap(self, txn: Transaction) -> Transaction:
        return txn

    async def begin(self) -> Transaction:
        return self.wrap(await self.inner.begin())

    async def sync(self) -> None:
        await self.inner.sync()

    async def close(self) -> None:
        await self.inner.close()
