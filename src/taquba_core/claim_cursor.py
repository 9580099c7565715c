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

Invariant (per range): every live key is above ``after``.

* ``written(keys)`` — called by the queue *before* every commit that puts
  keys in these ranges: lowers ``after`` to just below the lowest of them,
  so the key is never visible below the cursor (a reader that sees it, then
  claims, finds it).  The keys stay *in flight* until ``settled(keys)``,
  called once the commit attempt ended, whatever its outcome.  This covers
  every way a key lands at or behind a cursor: a higher-priority enqueue,
  promotion, a nack without backoff, an expired claim, a requeued dead job,
  enqueues whose commits finish out of id order, a short lease or backoff,
  a clock that went back.
* ``begin(prefix)`` / ``end(prefix, last)`` — bracket one scan that takes
  (deletes) every key it reads, under a lock so that scans of one range never
  overlap.  The scan reads ``after(prefix)`` once its snapshot is taken (so
  every key in the snapshot was written, and ``after`` lowered, before).
  ``end`` moves ``after`` to the last key the scan took, but not above a key
  that may have committed after the scan's snapshot, which the scan could
  not see: a key in flight when the scan began, or written while it ran.
  ``end(..., drained=True)`` says the scan found no further key; when no
  key can have committed unseen, the range is known to be empty and
  ``known_empty`` answers true until the next ``written`` in it, so a
  claimer polling an idle queue makes no transaction at all.

A cursor is only ever a hint that can be too low (a longer scan), never too
high: moving it up requires a scan that saw and took every key below.
"""

from __future__ import annotations

from collections.abc import Iterable

from .keys import CLAIMED, PENDING, SCHEDULED


class _Cursor:
    __slots__ = ("after", "empty", "floor", "in_flight", "scanning")

    def __init__(self) -> None:
        self.after: bytes | None = None  # scan start (exclusive); None: from the beginning
        self.floor: bytes | None = None  # lowest key the running scan may not have seen
        self.scanning = False
        self.in_flight: dict[bytes, int] = {}  # keys written, commit not ended: how many times
        self.empty = False  # no live key in the range (see ``end``)


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

    def _cursor(self, prefix: bytes) -> _Cursor:
        cursor = self._cursors.get(prefix)
        if cursor is None:
            cursor = self._cursors[prefix] = _Cursor()
        return cursor

    def begin(self, prefix: bytes) -> bytes | None:
        """A scan of ``prefix`` starts; returns ``after`` (read it again once the snapshot is taken)."""
        cursor = self._cursor(prefix)
        cursor.scanning = True
        cursor.floor = min(cursor.in_flight) if cursor.in_flight else None
        return cursor.after

    def end(self, prefix: bytes, last: bytes | None, drained: bool = False) -> None:
        """The scan committed, taking every key up to ``last`` (``None``: it took nothing or failed).

        ``drained``: the scan's snapshot held no key after the ones it took.
        """
        cursor = self._cursors[prefix]
        if drained and cursor.floor is None:
            cursor.empty = True  # nothing in flight when it began, nothing written since
        if last is not None:
            floor = cursor.floor
            cursor.after = last if floor is None or last < floor else floor
        cursor.scanning = False
        cursor.floor = None

    def written(self, keys: Iterable[bytes]) -> None:
        """``keys`` are about to be committed: lower the cursors below them; they are in flight."""
        for key in keys:
            prefix = range_of(key)
            if prefix is None:
                continue
            cursor = self._cursor(prefix)
            cursor.empty = False
            below = key[:-1]  # sorts before ``key`` and after every key below it
            if cursor.after is not None and below < cursor.after:
                cursor.after = below
            if cursor.scanning and (cursor.floor is None or below < cursor.floor):
                cursor.floor = below
            cursor.in_flight[below] = cursor.in_flight.get(below, 0) + 1

    def settled(self, keys: Iterable[bytes]) -> None:
        """The commit that wrote ``keys`` ended (applied, refused or failed): they are no longer in flight."""
        for key in keys:
            prefix = range_of(key)
            cursor = None if prefix is None else self._cursors.get(prefix)
            if cursor is None:
                continue
            below = key[:-1]
            left = cursor.in_flight.get(below, 0) - 1
            if left > 0:
                cursor.in_flight[below] = left
            else:
                cursor.in_flight.pop(below, None)

    def known_empty(self, prefix: bytes) -> bool:
        """Whether a scan found ``prefix`` empty and no key was written in it since."""
        cursor = self._cursors.get(prefix)
        return cursor is not None and cursor.empty

    def after(self, prefix: bytes) -> bytes | None:
        """The current scan start of ``prefix`` (for tests and benchmarks)."""
        cursor = self._cursors.get(prefix)
        return None if cursor is None else cursor.after


ClaimCursors = ScanCursors
"""The name the queue used when only claims had cursors."""
