"""An in-process mirror of the ``stats:`` counters.

The counters are updated by merges, which SlateDB folds only when they are
read: a store that served many transitions folds thousands of operands per
read.  Because a store has one writer, this process sees every delta it
commits, so it keeps the counters in memory: loaded once at open, then moved
by each committed transaction's deltas.  ``stats()`` reads the mirror; the
store's counters stay the durable truth and are re-read when a commit fails
in a way that leaves its outcome unknown.
"""

from __future__ import annotations

from collections import defaultdict

from . import keys
from .kv import Transaction, decode_counter


class RecordingTransaction(Transaction):
    """Forwards to ``inner`` and records the counter deltas it merges."""

    def __init__(self, inner: Transaction) -> None:
        self.inner = inner
        self.deltas: list[tuple[bytes, int]] = []

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
        self.deltas.append((key, delta))
        await self.inner.merge_counter(key, delta)

    async def commit(self, *, durable: bool = True) -> None:
        await self.inner.commit(durable=durable)

    async def rollback(self) -> None:
        await self.inner.rollback()


class CounterMirror:
    """Counter values by stats key; ``None`` until loaded."""

    def __init__(self) -> None:
        self._values: defaultdict[bytes, int] | None = None

    @property
    def loaded(self) -> bool:
        return self._values is not None

    async def load(self, txn: Transaction) -> None:
        """Read every counter of the store (call when no commit is in flight)."""
        rows = await txn.scan(keys.STATS)
        self._values = defaultdict(int, {k: decode_counter(v) for k, v in rows})

    def apply(self, deltas: list[tuple[bytes, int]]) -> None:
        """Add a committed transaction's deltas."""
        if self._values is not None:
            for key, delta in deltas:
                self._values[key] += delta

    def invalidate(self) -> None:
        """Forget the values (a commit's outcome is unknown); the next read reloads."""
        self._values = None

    def queues(self) -> list[str]:
        """Names of the queues that have counters, sorted."""
        assert self._values is not None
        return sorted({k[len(keys.STATS):].rsplit(b":", 1)[0].decode() for k in self._values})

    def get(self, key: bytes) -> int:
        assert self._values is not None
        return self._values.get(key, 0)
