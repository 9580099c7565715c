"""A transaction's own puts, deletes and counter merges, laid over what it reads.

Both adapters buffer a transaction's writes in Python until commit; this
module keeps the rules of that buffer in one place so that they agree:

* a put or delete replaces the key's earlier put, delete or merges;
* merges after a put or delete add to it; merges on a key not written are
  summed into one delta;
* a read of a key sees the committed value with the buffer laid on top.
"""

from __future__ import annotations

import struct

from taquba_core.errors import CorruptRecord, InvalidArgument
from taquba_core.kv import COUNTER, add_counter

from ._keyrange import KeyBounds

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


def check_delta(delta: int) -> int:
    """Return ``delta`` when it is a signed 64-bit integer.

    Raises:
        InvalidArgument: ``delta`` is not an ``int`` or out of range.
    """
    if not isinstance(delta, int) or isinstance(delta, bool) or not INT64_MIN <= delta <= INT64_MAX:
        raise InvalidArgument(f"counter delta must be a signed 64-bit int, got {delta!r}")
    return delta


def counter_plus(url: str, key: bytes, value: bytes | None, delta: int) -> bytes:
    """The counter ``value`` (absent = 0) plus ``delta``, encoded.

    Raises:
        CorruptRecord: ``value`` is not an 8-byte counter, or the sum leaves
            the signed 64-bit range.
    """
    try:
        return add_counter(value, COUNTER.pack(delta))
    except struct.error as exc:
        where = f" of store {url}" if url else ""
        raise CorruptRecord(f"key {key!r}{where} holds {value!r:.60}, not a counter (+{delta})") from exc


def check_key(key: bytes) -> bytes:
    """Return ``key`` when it can be written (non-empty).

    Raises:
        InvalidArgument: ``key`` is empty.
    """
    if not key:
        raise InvalidArgument("keys must not be empty")
    return key


class WriteBuffer:
    """The buffered writes of one transaction.

    ``writes`` maps a key to its new value (``None``: deleted);
    ``merges`` maps a key to the counter delta added after its last put or
    delete (or since the transaction began, when it was not written).
    """

    __slots__ = ("writes", "merges")

    def __init__(self) -> None:
        self.writes: dict[bytes, bytes | None] = {}
        self.merges: dict[bytes, int] = {}

    def put(self, key: bytes, value: bytes) -> None:
        self.writes[check_key(key)] = bytes(value)
        self.merges.pop(key, None)

    def delete(self, key: bytes) -> None:
        self.writes[check_key(key)] = None
        self.merges.pop(key, None)

    def merge(self, key: bytes, delta: int) -> None:
        """Add ``delta``; raises :class:`InvalidArgument` for an empty key or a delta that is not int64."""
        self.merges[check_key(key)] = self.merges.get(key, 0) + check_delta(delta)

    def __bool__(self) -> bool:
        return bool(self.writes or self.merges)

    def holds(self, key: bytes) -> bool:
        """Whether this buffer changes what a read of ``key`` returns."""
        return key in self.writes or key in self.merges

    def visible(self, key: bytes, committed: bytes | None) -> bytes | None:
        """What a read of ``key`` returns when the committed value is ``committed``.

        Raises:
            CorruptRecord: ``key`` was merged but does not hold a counter.
        """
        base = self.writes[key] if key in self.writes else committed
        if key in self.merges:
            return counter_plus("", key, base, self.merges[key])
        return base

    def keys_in(self, bounds: KeyBounds) -> list[bytes]:
        """The buffered keys inside ``bounds``, ascending."""
        low, inclusive, high = bounds.start, bounds.start_inclusive, bounds.end
        return sorted(
            k
            for k in (*self.writes, *(m for m in self.merges if m not in self.writes))
            if (k >= low if inclusive else k > low) and (high is None or k < high)
        )

    def folded(self) -> tuple[dict[bytes, bytes | None], dict[bytes, int]]:
        """``(writes, merges)`` to apply: merges on written keys folded into
        their values, and the deltas of the keys only merged."""
        writes = {
            key: counter_plus("", key, value, self.merges[key]) if key in self.merges else value
            for key, value in self.writes.items()
        }
        return writes, {key: d for key, d in self.merges.items() if key not in self.writes}

    def clear(self) -> None:
        self.writes.clear()
        self.merges.clear()
