"""A pure-Python, in-process store with snapshot isolation (for tests and demos).

:class:`MemoryStore` keeps multiple versions of each key (MVCC):

* (in :class:`~taquba_backends._versions.VersionTable`) a sorted list of keys and, per key, its
  versions as ``(commit_seq, value)`` pairs, oldest first; a ``None`` value is
  a tombstone (a delete);
* :meth:`MemoryStore.begin` records the current commit sequence number; the
  transaction reads the newest version at or below it, with its own buffered
  puts, deletes and counter merges laid on top;
* :meth:`MemoryTransaction.commit` is first-committer-wins: when a key this
  transaction put or deleted has a version committed after it began, it
  raises :class:`~taquba_core.errors.StoreConflict` and applies nothing.
  Counter merges are not checked; they are added to the latest committed
  value at commit.  The check and the apply run without an ``await`` between
  them, so they are atomic with respect to other asyncio tasks;
* versions that no open transaction can see any more are pruned when a
  transaction ends (a transaction dropped without commit or rollback ends
  when it is garbage-collected), and a key whose only remaining version is
  an invisible tombstone is dropped, so memory stays proportional to the
  live data plus what open transactions still see.

For tests, :meth:`MemoryStore.inject_faults` makes upcoming commits fail (see
:class:`FaultPlan`).  Nothing is injected unless a test asks for it.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from taquba_core.errors import (
    StoreClosed,
    StoreConflict,
    StoreError,
)
from taquba_core.kv import (
    DURABLE,
    Durability,
    KVStore,
    Transaction,
)

from ._keyrange import scan_bounds
from ._readcache import MISS
from ._versions import Pins, VersionTable
from ._writebuffer import WriteBuffer, counter_plus


class Fault(Enum):
    """What an injected fault does to one commit."""

    CONFLICT = "conflict"
    """Raise :class:`StoreConflict`; nothing is applied."""
    FAIL_BEFORE_APPLY = "fail before apply"
    """Raise :class:`StoreError`; nothing is applied."""
    FAIL_AFTER_APPLY = "fail after apply"
    """Apply the writes, then raise :class:`StoreError` (an ambiguous failure)."""


@dataclass
class FaultPlan:
    """Faults for the next commits of a :class:`MemoryStore` (tests only).

    Each counter is the number of upcoming eligible commits that get that
    fault; a commit takes at most one fault, in the order ``conflicts``,
    ``fail_before_apply``, ``fail_after_apply``, and each use decrements its
    counter.  A commit is eligible when it writes something (read-only
    commits are never faulted) and, when ``matches`` is given, when
    ``matches(keys)`` is true for the set of keys it puts, deletes or merges.
    """

    conflicts: int = 0
    fail_before_apply: int = 0
    fail_after_apply: int = 0
    matches: Callable[[frozenset[bytes]], bool] | None = None

    def take(self, keys: frozenset[bytes]) -> Fault | None:
        """The fault for a commit writing ``keys``, consuming one use; ``None`` for no fault."""
        if not (self.conflicts or self.fail_before_apply or self.fail_after_apply):
            return None
        if self.matches is not None and not self.matches(keys):
            return None
        if self.conflicts:
            self.conflicts -= 1
            return Fault.CONFLICT
        if self.fail_before_apply:
            self.fail_before_apply -= 1
            return Fault.FAIL_BEFORE_APPLY
        self.fail_after_apply -= 1
        return Fault.FAIL_AFTER_APPLY


class MemoryStore(KVStore):
    """An in-process MVCC store with snapshot isolation.  Opened by ``inmemory://``.

    Not thread-safe: use it from one asyncio event loop.  Its data is lost when
    the object is dropped.
    """

    url = "inmemory://"

    def __init__(self) -> None:
        self._table = VersionTable(keep_base=True)
        self._seq = 0
        self._pins = Pins()  # the start seqs of open transactions
        self._closed = False
        self._faults = FaultPlan()

    # -- public ------------------------------------------------------------

    async def begin(self) -> MemoryTransaction:
        """Start a transaction that sees every commit made so far.

        Raises:
            StoreClosed: the store was closed.
        """
        self._check_open()
        start = self._seq
        self._pins.pin(start)
        return MemoryTransaction(self, start)

    async def close(self) -> None:
        """Close the store; later ``begin`` calls and open transactions raise :class:`StoreClosed`."""
        self._closed = True

    def reopen(self) -> MemoryStore:
        """A new, open store holding this store's committed data (tests only).

        What a durable store shows when it is opened again after ``close``:
        every committed write, none of the open transactions, no fault plan.
        This store is left as it is (closed or not).
        """
        fresh = MemoryStore()
        for key in self._table.keys():
            value = self._read(key, self._seq)
            if value is not None:
                fresh._table.add(key, 0, value)
        return fresh

    def inject_faults(
        self,
        plan: FaultPlan | None = None,
        /,
        *,
        conflicts: int = 0,
        fail_before_apply: int = 0,
        fail_after_apply: int = 0,
    ) -> FaultPlan:
        """Replace the fault plan (tests only) and return it.

        Pass a :class:`FaultPlan`, or its counters as keywords, e.g.
        ``store.inject_faults(fail_after_apply=1)``.  ``inject_faults()`` with
        no argument clears every fault.
        """
        if plan is None:
            plan = FaultPlan(conflicts=conflicts, fail_before_apply=fail_before_apply, fail_after_apply=fail_after_apply)
        self._faults = plan
        return self._faults

    def footprint(self) -> tuple[int, int]:
        """``(keys, versions)`` held now, tombstones included; for tests of pruning."""
        return self._table.footprint()

    # -- used by MemoryTransaction -------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed(f"store {self.url} is closed")

    def _read(self, key: bytes, seq: int) -> bytes | None:
        """The value of ``key`` as of commit ``seq``."""
        value = self._table.read(key, seq)
        return None if value is MISS else value  # type: ignore[return-value]

    def _commit(self, start: int, writes: dict[bytes, bytes | None], merges: dict[bytes, int]) -> None:
        """Check conflicts and apply, atomically (no await).

        ``writes`` holds final values (merges on written keys folded in);
        ``merges`` only the keys that were merged without being written.

        Raises:
            StoreClosed, StoreConflict, StoreError (injected).
        """
        self._check_open()
        fault = self._faults.take(frozenset(writes) | frozenset(merges))
        if fault is Fault.CONFLICT:
            raise StoreConflict(f"injected conflict in store {self.url}")
        if fault is Fault.FAIL_BEFORE_APPLY:
            raise StoreError(f"injected failure before apply in store {self.url}")
        for key in writes:
            if self._table.last_commit(key) > start:
                raise StoreConflict(
                    f"key {key!r} was written by a concurrent commit in store {self.url}"
                )
        # Computed before anything is applied: a bad counter must not half-apply the commit.
        merged = {key: counter_plus(self.url, key, self._read(key, self._seq), d) for key, d in merges.items()}
        self._seq += 1
        seq = self._seq
        for key, value in writes.items():
            self._table.add(key, seq, value)
        for key, value in merged.items():
            self._table.add(key, seq, value)
        if fault is Fault.FAIL_AFTER_APPLY:
            raise StoreError(f"injected failure after apply in store {self.url}")

    def _release(self, start: int) -> None:
        """A transaction that began at ``start`` ended: forget it and prune."""
        self._pins.unpin(start)
        oldest = self._pins.oldest()
        self._table.prune(self._seq if oldest is None else oldest)


class MemoryTransaction(Transaction):
    """A snapshot-isolated transaction of a :class:`MemoryStore`.

    Writes are buffered here and applied at :meth:`commit`.  After commit or
    rollback every method but :meth:`rollback` raises :class:`StoreClosed`.
    """

    def __init__(self, store: MemoryStore, start: int) -> None:
        self._store = store
        self._start = start
        self._buffer = WriteBuffer()
        self._done = False

    def __del__(self) -> None:
        # Dropped without commit or rollback: stop pinning its snapshot.  Only
        # queue the release (an atomic append), as this may run at any point.
        if not getattr(self, "_done", True):
            self._store._pins.abandon(self._start)

    def _check_usable(self) -> None:
        if self._done:
            raise StoreClosed(f"transaction on store {self._store.url} already committed or rolled back")
        self._store._check_open()

    def _visible(self, key: bytes) -> bytes | None:
        return self._buffer.visible(key, self._store._read(key, self._start))

    async def get(self, key: bytes) -> bytes | None:
        """The value under ``key`` in this transaction's view, or ``None``.

        Raises:
            StoreClosed: the transaction ended or the store was closed.
        """
        self._check_usable()
        return self._visible(key)

    async def scan(
        self,
        prefix: bytes,
        *,
        start_after: bytes | None = None,
        end: bytes | None = None,
        limit: int | None = None,
    ) -> list[tuple[bytes, bytes]]:
        """Up to ``limit`` (key, value) pairs under ``prefix`` in this transaction's view, ascending.

        ``start_after`` and ``end`` are exclusive full keys.

        Raises:
            StoreClosed: the transaction ended or the store was closed.
        """
        self._check_usable()
        bounds = scan_bounds(prefix, start_after, end)
        if bounds is None or (limit is not None and limit <= 0):
            return []
        own = self._buffer.keys_in(bounds)
        committed = self._store._table.keys_from(bounds.start, bounds.start_inclusive, bounds.end)
        out: list[tuple[bytes, bytes]] = []
        previous: bytes | None = None
        for key in heapq.merge(committed, own):
            if key == previous:
                continue
            previous = key
            value = self._visible(key)
            if value is not None:
                out.append((key, value))
                if limit is not None and len(out) >= limit:
                    break
        return out

    async def put(self, key: bytes, value: bytes) -> None:
        """Buffer a write of ``value`` under ``key``.

        Raises:
            StoreClosed: the transaction ended or the store was closed.
        """
        self._check_usable()
        self._buffer.put(key, value)

    async def delete(self, key: bytes) -> None:
        """Buffer a delete of ``key`` (conflict-checked even when absent).

        Raises:
            StoreClosed: the transaction ended or the store was closed.
        """
        self._check_usable()
        self._buffer.delete(key)

    async def merge_counter(self, key: bytes, delta: int) -> None:
        """Buffer adding ``delta`` (signed 64-bit) to the counter under ``key``.

        Raises:
            InvalidArgument: ``delta`` is not a signed 64-bit int.
            StoreClosed: the transaction ended or the store was closed.
        """
        self._check_usable()
        self._buffer.merge(key, delta)

    async def commit(self, *, durable: bool = True) -> Durability:
        """Apply the buffered writes atomically (``durable`` makes no difference here).

        Returns :data:`~taquba_core.kv.DURABLE`: there is nothing to wait for.

        Yields to the event loop once first, as a real store's I/O would.

        Raises:
            StoreConflict: a key this transaction put or deleted was committed
                by another transaction after this one began; nothing applied.
            StoreClosed: the transaction ended or the store was closed.
            StoreError: an injected fault (see :class:`FaultPlan`).
        """
        self._check_usable()
        writes, merges = self._buffer.folded()
        self._finish()  # unusable from here on, even during the yield below
        try:
            await asyncio.sleep(0)
            if writes or merges:
                self._store._commit(self._start, writes, merges)
            else:
                self._store._check_open()
        finally:
            self._store._release(self._start)
        return DURABLE

    async def rollback(self) -> None:
        """Discard the buffered writes; a no-op when the transaction already ended."""
        if not self._done:
            self._finish()
            self._store._release(self._start)

    def _finish(self) -> None:
        self._done = True
        self._buffer.clear()
