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

import struct
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

from . import keys
from .errors import CorruptRecord
from .kv import ForwardingTransaction, Transaction, decode_counter

_SCANNED = (keys.PENDING, keys.SCHEDULED, keys.CLAIMED)


class RecordingTransaction(ForwardingTransaction):
    """Forwards to ``inner`` and records the counter deltas it merges and the keys it puts
    in the ranges scanned from a cursor (pending, scheduled, claimed).

    The queue applies the deltas to its :class:`CounterMirror` and reports the
    keys to its scan cursors (:mod:`taquba_core.claim_cursor`).
    """

    def __init__(self, inner: Transaction) -> None:
        super().__init__(inner)
        self.deltas: list[tuple[bytes, int]] = []
        self.scan_keys: list[bytes] = []

    async def put(self, key: bytes, value: bytes) -> None:
        if key.startswith(_SCANNED):
            self.scan_keys.append(key)
        await self.inner.put(key, value)

    async def merge_counter(self, key: bytes, delta: int) -> None:
        self.deltas.append((key, delta))
        await self.inner.merge_counter(key, delta)


def _decode(key: bytes, value: bytes) -> int:
    """The counter stored under ``key``.

    Raises:
        CorruptRecord: naming the key, when the value is not 8 bytes.
    """
    try:
        return decode_counter(value)
    except struct.error as exc:
        raise CorruptRecord(
            f"the counter {key!r} holds {value!r:.60}, not a signed 64-bit little-endian integer"
        ) from exc


class CounterMirror:
    """Counter values by stats key; ``None`` until loaded.

    After :meth:`invalidate` the values are re-read by :meth:`reload`.  A
    commit in flight (visible in the store, its deltas not applied here yet)
    would be counted twice if a re-read saw it and its deltas were added
    afterwards, so :meth:`reload` keeps what it read only when no commit was
    in flight from before the read until its end; otherwise the values read
    answer that one call and the next call reads again.
    """

    def __init__(self) -> None:
        self._values: defaultdict[bytes, int] | None = None
        self._latest: defaultdict[bytes, int] = defaultdict(int)  # the last re-read, while unloaded
        self._in_flight = 0  # commits started whose outcome is not reflected here yet
        self._started = 0  # commits started, ever

    def commit_started(self) -> None:
        """A commit is about to run; pair with :meth:`commit_ended`."""
        self._in_flight += 1
        self._started += 1

    def commit_ended(self, deltas: list[tuple[bytes, int]] | None) -> None:
        """The commit ended: applied with ``deltas`` (``[]`` when it applied nothing),
        or ``None`` when its outcome is unknown (the values are invalidated)."""
        self._in_flight -= 1
        if deltas is None:
            self.invalidate()
        else:
            self.apply(deltas)

    async def reload(self, read: Callable[[Callable[[Transaction], Awaitable[Any]]], Awaitable[Any]]) -> None:
        """Re-read every counter through ``read`` (a snapshot reader) after an invalidation."""
        quiet, mark = self._in_flight == 0, self._started
        rows = await read(lambda txn: txn.scan(keys.STATS))
        values = defaultdict(int, {k: _decode(k, v) for k, v in rows})
        if quiet and self._started == mark and self._values is None:
            self._values = values
        self._latest = values

    def _view(self) -> defaultdict[bytes, int]:
        return self._values if self._values is not None else self._latest

    @property
    def loaded(self) -> bool:
        return self._values is not None

    async def load(self, txn: Transaction) -> None:
        """Read every counter of the store (call when no commit is in flight)."""
        rows = await txn.scan(keys.STATS)
        self._values = defaultdict(int, {k: _decode(k, v) for k, v in rows})

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
        return sorted({k[len(keys.STATS):].rsplit(b":", 1)[0].decode() for k in self._view()})

    def get(self, key: bytes) -> int:
        return self._view().get(key, 0)
