"""Turn the ``scan(prefix, start_after=, end=)`` arguments into one key range.

Both adapters scan a single contiguous range of keys; this module computes it
once so that they agree on every edge case.
"""

from __future__ import annotations

from dataclasses import dataclass


def prefix_end(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key that starts with ``prefix``.

    ``None`` when no such key exists (``prefix`` is empty or all ``0xff``).
    """
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


@dataclass(frozen=True, slots=True)
class KeyBounds:
    """A non-empty key range: from ``start`` (inclusive or not) up to ``end`` (exclusive).

    ``end`` is ``None`` when the range is unbounded above.
    """

    start: bytes
    start_inclusive: bool
    end: bytes | None


def scan_bounds(prefix: bytes, start_after: bytes | None, end: bytes | None) -> KeyBounds | None:
    """The range of keys that start with ``prefix``, are above ``start_after`` and below ``end``.

    Returns ``None`` when that range is empty.
    """
    start, start_inclusive = prefix, True
    if start_after is not None and start_after >= prefix:
        start, start_inclusive = start_after, False
    upper = prefix_end(prefix)
    if end is not None and (upper is None or end < upper):
        upper = end
    if upper is not None and start >= upper:
        return None
    return KeyBounds(start, start_inclusive, upper)
