"""A read-only view of a SlateDB store that does not fence its writer.

A store has one writer; opening it as a writer (``open_store``) fences the
process that held it.  Commands that only look (``taquba stats``, ``jobs``,
``get``...) open a :class:`SlateDBReader` instead: SlateDB's ``DbReader`` in
follow-latest mode, which writes nothing to the object store.  It sees what
the writer has made durable, as of the moment it was opened.

A reader's transactions answer ``get`` and ``scan``; any write raises
:class:`~taquba_core.errors.ReadOnlyStore`.  Reads are not one snapshot: two
reads of a reader may straddle a change the writer made durable in between
(reference: taquba 0.11.0 ``QueueReader``, which also lags its writer).
"""

from __future__ import annotations

import slatedb.uniffi as sdb

from taquba_core.errors import InvalidStoreUrl, ReadOnlyStore, StoreClosed, StoreError
from taquba_core.kv import DURABLE, Durability, KVStore, Transaction

from ._keyrange import scan_bounds
from .slatedb_store import SCAN_BATCH, CounterMergeOperator, parse_slatedb_url

PERSISTENT_SCHEMES = frozenset({"file", "s3", "gs", "az"})


class SlateDBReader(KVStore):
    """A read-only SlateDB store; create it with :meth:`open`."""

    read_only = True

    def __init__(self, reader: sdb.DbReader, url: str) -> None:
        self._reader = reader
        self.url = url
        self._closed = False

    @classmethod
    async def open(cls, url: str) -> SlateDBReader:
        """Open the store at ``url`` for reading, without fencing its writer.

        Raises:
            InvalidStoreUrl: malformed URL, or a scheme with nothing to read
                (``memory://``).
            StoreError: no store exists at ``url``, or it cannot be read.
        """
        location = parse_slatedb_url(url)
        if location.scheme not in PERSISTENT_SCHEMES:
            raise InvalidStoreUrl(f"store URL {url!r} names no persistent store to read")
        try:
            builder = sdb.DbReaderBuilder(location.path, location.object_store())
            builder.with_merge_operator(CounterMergeOperator())
            builder.with_reader_mode(sdb.ReaderMode.FOLLOW_LATEST())
            reader = await builder.build()
        except sdb.Error.Data as exc:
            if "failed to find latest" in str(exc):
                raise StoreError(f"no store at {url}: nothing has been written there yet") from exc
            raise StoreError(f"cannot read a store at {url}: {exc}") from exc
        except sdb.Error as exc:
            raise StoreError(f"cannot read a store at {url}: {exc}") from exc
        return cls(reader, location.url)

    async def begin(self) -> Transaction:
        """A read-only transaction.

        Raises:
            StoreClosed: the reader was closed.
        """
        if self._closed:
            raise StoreClosed(f"store {self.url} is closed")
        return ReadOnlyTransaction(self)

    async def close(self) -> None:
        """Release the reader; a no-op when already closed."""
        if not self._closed:
            self._closed = True
            await self._reader.shutdown()

    async def get(self, key: bytes) -> bytes | None:
        try:
            return await self._reader.get(key)
        except sdb.Error as exc:
            raise StoreError(f"reading store {self.url} failed: {exc}") from exc

    async def scan(
        self, prefix: bytes, start_after: bytes | None, end: bytes | None, limit: int | None
    ) -> list[tuple[bytes, bytes]]:
        bounds = scan_bounds(prefix, start_after, end)
        if bounds is None or (limit is not None and limit <= 0):
            return []
        key_range = sdb.KeyRange(
            start=bounds.start, start_inclusive=bounds.start_inclusive, end=bounds.end, end_inclusive=False
        )
        out: list[tuple[bytes, bytes]] = []
        try:
            iterator = await self._reader.scan(key_range)
            while True:
                want = SCAN_BATCH if limit is None else min(SCAN_BATCH, limit - len(out))
                batch = await iterator.next_batch(want)
                out.extend((row.key, row.value) for row in batch)
                if len(batch) < want or len(out) == limit:
                    return out
        except sdb.Error as exc:
            raise StoreError(f"reading store {self.url} failed: {exc}") from exc


class ReadOnlyTransaction(Transaction):
    """Reads through a :class:`SlateDBReader`; every write raises :class:`ReadOnlyStore`."""

    def __init__(self, store: SlateDBReader) -> None:
        self._store = store

    def _refuse(self) -> ReadOnlyStore:
        return ReadOnlyStore(f"store {self._store.url} is open read-only; open it as the writer to change it")

    async def get(self, key: bytes) -> bytes | None:
        return await self._store.get(key)

    async def scan(
        self,
        prefix: bytes,
        *,
        start_after: bytes | None = None,
        end: bytes | None = None,
        limit: int | None = None,
    ) -> list[tuple[bytes, bytes]]:
        return await self._store.scan(prefix, start_after, end, limit)

    async def put(self, key: bytes, value: bytes) -> None:
        raise self._refuse()

    async def delete(self, key: bytes) -> None:
        raise self._refuse()

    async def merge_counter(self, key: bytes, delta: int) -> None:
        raise self._refuse()

    async def commit(self, *, durable: bool = True) -> Durability:
        return DURABLE  # nothing was written

    async def rollback(self) -> None:
        return None
