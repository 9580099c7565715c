"""Scan cursors: where a claim, a promotion or a reaping scan may start.

A claim deletes the pending keys it takes; promotion deletes the scheduled
keys it moves, and reaping the expired claimed keys.  On SlateDB a deleted
key stays behind as a tombstone until compaction, so each of these spaces
grows a band of tombstones at its head, and a scan that started at the
beginning of the space would walk the whole band every time: claims would
slow down with the number of jobs a queue ever served, and a sweep moving a
large backlog in batches would be quadratic.  A cursor remembers, per scanned
range, a key below which no key is live, and the scan starts there.

The ranges, by the prefix a key starts with:

* ``pending:{queue}:`` — one per queue, used by claims;
* ``scheduled:`` — used by promotion;
* ``claimed:`` — used by reaping and by the recovery at open.

Invariant (per range): every live key is above ``after``, except keys whose
writing transaction has committed but not reported yet (see
:meth:`ScanCursors.written`); each such key is reported a moment later,
which lowers ``after`` below it.  A key that is not yet reported belongs to
a call that has not returned, so a scan that does not see it is ordered
before that call.

* ``written(keys)`` — called by the queue after every commit attempt that
  put keys in these ranges (including one that failed in an unknown state):
  lowers ``after`` to just below the lowest of them.  This covers every way
  a key lands at or behind a cursor: a higher-priority enqueue, promotion, a
  nack without backoff, an expired claim, a requeued dead job, enqueues
  whose commits finish out of id order, a short lease or backoff, a clock
  that went back.
* ``begin(prefix)`` / ``end(prefix, last)`` — bracket one scan that takes
  (deletes) every key it reads, under a lock so that scans of one range never
  overlap.  ``end`` moves ``after`` to the last key the scan took, but not
  above any key reported while the scan ran: such a key may have committed
  after the scan's snapshot was taken, so the scan could not see it.  A key
  reported after ``end`` lowers ``after`` itself.

A cursor is only ever a hint that can be too low (a longer scan), never too
high: moving it up requires a scan that saw and took every key below.
"""

from __future__ import annotations

from collections.abc import Iterable

from .keys import CLAIMED, PENDING, SCHEDULED


class _Cursor:
    __slots__ = ("after", "floor", "scanning")

    def __init__(self) -> None:
        self.after: bytes | None = None  # scan start (exclusive); None: from the beginning
        self.floor: bytes | None = None  # lowest report during the running scan
        self.scanning = False


def range_of(key: bytes) -> bytes | None:
    """The cursor range a key belongs to (see the module notes), or ``None``."""
    if key.startswith(PENDING):
        return key[: key.index(b":", len(PENDING)) + 1]  # queue names contain no ':'
    if key.startswith(CLAIMED):
        return CLAIMED
    if key.startswith(SCHEDULED):
        return SCHEDULED
    return None


class ScanCursors:
    """The scan cursors of one :class:`~taquba_core.queue.Queue`, by range prefix.

    Only valid while this process is the store's only writer (as the counter
    mirror is).
    """

    def __init__(self) -> None:
        self._cursors: dict[bytes, _Cursor] = {}

    def begin(self, prefix: bytes) -> bytes | None:
        """A scan of ``prefix`` starts: where it starts (exclusive), or ``None`` for the beginning."""
        cursor = self._cursors.get(prefix)
        if cursor is None:
            cursor = self._cursors[prefix] = _Cursor()
        cursor.scanning = True
        cursor.floor = None
        return cursor.after

    def end(self, prefix: bytes, last: bytes | None) -> None:
        """The scan committed, taking every key up to ``last`` (``None``: it took nothing or failed)."""
        cursor = self._cursors[prefix]
        if last is not None:
            floor = cursor.floor
            cursor.after = last if floor is None or last < floor else floor
        cursor.scanning = False
        cursor.floor = None

    def written(self, keys: Iterable[bytes]) -> None:
        """``keys`` were (or may have been) committed: lower the cursors below them."""
        for key in keys:
            prefix = range_of(key)
            cursor = None if prefix is None else self._cursors.get(prefix)
            if cursor is None:
                continue  # nothing has scanned this range yet: it starts from the beginning anyway
            below = key[:-1]  # sorts before ``key`` and after every key below it
            if cursor.after is not None and below < cursor.after:
                cursor.after = below
            if cursor.scanning and (cursor.floor is None or below < cursor.floor):
                cursor.floor = below

    def after(self, prefix: bytes) -> bytes | None:
        """The current scan start of ``prefix`` (for tests and benchmarks)."""
        cursor = self._cursors.get(prefix)
        return None if cursor is None else cursor.after


ClaimCursors = ScanCursors
"""The name the queue used when only claims had cursors."""
