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
* ``begin(prefix)`` / ``end(prefix, last, ...)`` — bracket one scan that
  takes (deletes) every key it reads, under a lock so that scans of one range
  never overlap.  The scan reads ``after(prefix)`` once its snapshot is taken
  (so every key in the snapshot was written, and ``after`` lowered, before).
  ``end`` moves ``after`` to the last key the scan took, but not above a key
  that may have committed after the scan's snapshot, which the scan could
  not see: a key in flight when the scan began, or written while it ran.

Known keys (claims only).  On SlateDB a scan costs a seek in every sorted run
that overlaps it, even when the memtable alone holds the queue's few live
keys; on a shallow queue that seek is most of a claim.  So when a claim's
scan drains a queue (``end(..., drained=True)``: its snapshot held no key
after the ones it took), the cursor starts to keep ``known``: a superset of
the queue's live pending keys, namely every key in flight when that scan
began or written since.  While ``known`` is kept, every ``written`` key joins
it, and a claim reads ``candidates()`` with point reads instead of a scan
when there are only a few (``known_empty``: none, so no transaction at all);
with more it scans from the cursor as before.  Either way every candidate up
to the last key the claim took is gone from its snapshot (taken, or absent).
A key leaves ``known`` only when a claim took it or found it absent *and* no
write of it was in flight when that claim began or happened since (a later
write adds it back).  A key deleted by anything else (a cancel, a purge) or
whose commit failed stays until a claim finds it absent.  Past ``MAX_KNOWN``
keys the set is dropped and claims scan again until one drains the queue.

A cursor is only ever a hint that can be too low (a longer scan), never too
high: moving it up requires a scan that saw and took every key below.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .keys import CLAIMED, PENDING, SCHEDULED


MAX_KNOWN = 64
"""Most keys a cursor keeps in ``known`` (a shallow queue's; a deeper one scans)."""


class _Cursor:
    __slots__ = ("after", "floor", "in_flight", "known", "scanning", "seen")

    def __init__(self) -> None:
        self.after: bytes | None = None  # scan start (exclusive); None: from the beginning
        self.floor: bytes | None = None  # lowest key the running scan may not have seen
        self.scanning = False
        self.in_flight: dict[bytes, int] = {}  # keys written, commit not ended: how many times
        self.known: set[bytes] | None = None  # superset of the live keys, when kept
        self.seen: set[bytes] | None = None  # in flight at begin or written since (None: too many)

    def note(self, key: bytes) -> None:
        """``key`` is written while a scan runs: it may commit unseen by that scan."""
        below = key[:-1]  # sorts before ``key`` and after every key below it
        if self.floor is None or below < self.floor:
            self.floor = below
        if self.seen is not None:
            self.seen.add(key)
            if len(self.seen) > MAX_KNOWN:
                self.seen = None


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
        cursor.floor = None
        cursor.seen = set()
        for key in cursor.in_flight:
            cursor.note(key)
        return cursor.after

    def candidates(self, prefix: bytes) -> list[bytes] | None:
        """The keys that may be live in ``prefix``, in order, or ``None`` when not known (scan instead)."""
        cursor = self._cursors.get(prefix)
        if cursor is None or cursor.known is None:
            return None
        return sorted(cursor.known)

    def end(
        self,
        prefix: bytes,
        last: bytes | None,
        drained: bool = False,
        read: Sequence[bytes] | None = None,
    ) -> None:
        """The scan committed, taking every key up to ``last`` (``None``: it took nothing or failed).

        ``drained``: the scan's snapshot held no live key but the ones it
        took (only after a successful commit).  ``read``: the candidates
        (``candidates()``) of the attempt that committed, whether it read
        them one by one or scanned.
        """
        cursor = self._cursors[prefix]
        seen = cursor.seen  # None: too many to tell; then ``known`` only keeps growing
        if seen is not None and drained:
            cursor.known = seen  # any key live now was in flight at begin or written since
        elif seen is not None and cursor.known is not None and read and last is not None:
            # Every candidate read up to the last one taken is gone (taken, absent or quarantined).
            cursor.known.difference_update(key for key in read if key <= last and key not in seen)
        if last is not None:
            floor = cursor.floor
            cursor.after = last if floor is None or last < floor else floor
        cursor.scanning = False
        cursor.floor = None
        cursor.seen = None

    def written(self, keys: Iterable[bytes]) -> None:
        """``keys`` are about to be committed: lower the cursors below them; they are in flight."""
        for key in keys:
            prefix = range_of(key)
            if prefix is None:
                continue
            cursor = self._cursor(prefix)
            below = key[:-1]  # sorts before ``key`` and after every key below it
            if cursor.after is not None and below < cursor.after:
                cursor.after = below
            if cursor.scanning:
                cursor.note(key)
            if cursor.known is not None:
                cursor.known.add(key)
                if len(cursor.known) > MAX_KNOWN:
                    cursor.known = None
            cursor.in_flight[key] = cursor.in_flight.get(key, 0) + 1

    def settled(self, keys: Iterable[bytes]) -> None:
        """The commit that wrote ``keys`` ended (applied, refused or failed): they are no longer in flight."""
        for key in keys:
            prefix = range_of(key)
            cursor = None if prefix is None else self._cursors.get(prefix)
            if cursor is None:
                continue
            left = cursor.in_flight.get(key, 0) - 1
            if left > 0:
                cursor.in_flight[key] = left
            else:
                cursor.in_flight.pop(key, None)

    def known_empty(self, prefix: bytes) -> bool:
        """Whether ``prefix`` is known to hold no live key (see the module notes)."""
        cursor = self._cursors.get(prefix)
        return cursor is not None and cursor.known is not None and not cursor.known

    def after(self, prefix: bytes) -> bytes | None:
        """The current scan start of ``prefix`` (for tests and benchmarks)."""
        cursor = self._cursors.get(prefix)
        return None if cursor is None else cursor.after


ClaimCursors = ScanCursors
"""The name the queue used when only claims had cursors."""
