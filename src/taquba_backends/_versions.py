"""Multi-version bookkeeping shared by the in-process stores' snapshot isolation.

:class:`VersionTable` keeps, per key, the committed versions as
``(commit_seq, value)`` pairs, oldest first (a ``None`` value is a
tombstone), with the keys in a sorted list for range scans.
:class:`Pins` counts the open transactions by the commit number they pin, so
that versions nobody can see any more are pruned.

:class:`~taquba_backends.memory.MemoryStore` holds all its data in one table;
:class:`~taquba_backends.slatedb_store.SlateDBStore` holds the commits that
SlateDB may not show every open transaction yet.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections import deque
from collections.abc import Callable, Iterator
from operator import itemgetter

from ._readcache import MISS, Miss

Version = tuple[int, bytes | None]
"""One committed version of a key: ``(commit_seq, value)``; ``None`` is a tombstone."""
_version_seq = itemgetter(0)


class VersionTable:
    """Committed versions of keys, readable as of any commit number still held.

    With ``keep_base`` (a store's only copy of its data) pruning keeps, per
    key, the version visible at the horizon; without it (a layer over
    another copy) it drops every version at or below the horizon, handing
    the newest one dropped to ``on_drop``.
    """

    __slots__ = ("_keys", "_versions", "_garbage", "_keep_base")

    def __init__(self, *, keep_base: bool) -> None:
        self._keys: list[bytes] = []
        self._versions: dict[bytes, list[Version]] = {}
        # (seq, key): from commit ``seq`` on, ``key`` has a version to prune.
        self._garbage: deque[tuple[int, bytes]] = deque()
        self._keep_base = keep_base

    def __len__(self) -> int:
        return len(self._keys)

    def footprint(self) -> tuple[int, int]:
        """``(keys, versions)`` held now, tombstones included."""
        return len(self._keys), sum(len(v) for v in self._versions.values())

    def keys(self) -> list[bytes]:
        """The keys held, ascending (the table's own list: do not modify)."""
        return self._keys

    def read(self, key: bytes, seq: int) -> bytes | None | Miss:
        """The value of ``key`` as of commit ``seq``; :data:`MISS` when no version held is that old."""
        versions = self._versions.get(key)
        if not versions:
            return MISS
        i = bisect_right(versions, seq, key=_version_seq)
        return versions[i - 1][1] if i else MISS

    def last_commit(self, key: bytes) -> int:
        """The seq of the newest version of ``key``; -1 when none is held."""
        versions = self._versions.get(key)
        return versions[-1][0] if versions else -1

    def keys_from(self, start: bytes, inclusive: bool, end: bytes | None) -> Iterator[bytes]:
        """Held keys from ``start`` up to ``end`` (exclusive), ascending.

        Must be consumed without awaiting in between: the list may change.
        """
        keys = self._keys
        i = bisect_left(keys, start) if inclusive else bisect_right(keys, start)
        while i < len(keys) and (end is None or keys[i] < end):
            yield keys[i]
            i += 1

    def add(self, key: bytes, seq: int, value: bytes | None) -> None:
        """Record ``value`` (``None``: a delete) as the version of ``key`` committed as ``seq``."""
        versions = self._versions.get(key)
        if versions is None:
            versions = self._versions[key] = []
            insort(self._keys, key)
        versions.append((seq, value))
        if not self._keep_base or len(versions) > 1 or value is None:
            self._garbage.append((seq, key))

    def prune(self, horizon: int, on_drop: Callable[[bytes, bytes | None], None] | None = None) -> None:
        """Drop the versions that no reader at ``horizon`` or later needs (see the class notes)."""
        garbage = self._garbage
        while garbage and garbage[0][0] <= horizon:
            _, key = garbage.popleft()
            versions = self._versions.get(key)
            if not versions:
                continue
            below = bisect_right(versions, horizon, key=_version_seq)
            if self._keep_base:
                if below > 1:
                    del versions[: below - 1]
                drop_key = len(versions) == 1 and versions[0][1] is None and versions[0][0] <= horizon
            else:
                if below and on_drop is not None:
                    on_drop(key, versions[below - 1][1])
                del versions[:below]
                drop_key = not versions
            if drop_key:
                del self._versions[key]
                del self._keys[bisect_left(self._keys, key)]


class Pins:
    """Open transactions counted by the commit number each pins.

    ``oldest()`` is the smallest number pinned, or ``None``.  A transaction
    dropped without ending is released through :meth:`abandon`, which only
    appends (safe to call from ``__del__`` at any point); the release takes
    effect at the next :meth:`pin` or :meth:`unpin`.
    """

    __slots__ = ("_counts", "_abandoned")

    def __init__(self) -> None:
        self._counts: dict[int, int] = {}
        self._abandoned: list[int] = []

    def __len__(self) -> int:
        """The distinct numbers pinned."""
        return len(self._counts)

    def pin(self, seq: int) -> None:
        self._release_abandoned()
        self._counts[seq] = self._counts.get(seq, 0) + 1

    def unpin(self, seq: int) -> None:
        self._forget(seq)
        self._release_abandoned()

    def abandon(self, seq: int) -> None:
        self._abandoned.append(seq)

    def oldest(self) -> int | None:
        """The smallest number pinned (a scan of the distinct numbers: open transactions are few)."""
        return min(self._counts) if self._counts else None

    def _forget(self, seq: int) -> None:
        self._counts[seq] -= 1
        if self._counts[seq] == 0:
            del self._counts[seq]

    def _release_abandoned(self) -> None:
        while self._abandoned:
            self._forget(self._abandoned.pop())
