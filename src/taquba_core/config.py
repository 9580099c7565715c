"""Per-queue configuration and priority constants."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import InvalidArgument

PRIORITY_HIGH = 100
PRIORITY_NORMAL = 1000
PRIORITY_LOW = 10000


INT64_MAX = 2**63 - 1


def check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    """Return ``value`` when it is an int in ``minimum``..2^63-1, else raise :class:`InvalidArgument` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= INT64_MAX:
        raise InvalidArgument(f"{name} must be an int from {minimum} to {INT64_MAX}, got {value!r}")
    return value


MAX_DURATION_S = 1e12
"""Longest duration accepted, in seconds: far below the 20-digit time keys' range."""


def seconds_to_ms(name: str, seconds: object, *, allow_zero: bool = True) -> int:
    """Convert a duration in seconds (int or float) to integer milliseconds.

    Raises:
        InvalidArgument: for non-numbers, NaN, infinities, negative values,
        values above ``MAX_DURATION_S`` (about 31,000 years) and, when
        ``allow_zero`` is false, values that round to 0 ms; the message names
        ``name`` and the value.
    """
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise InvalidArgument(f"{name} must be a number of seconds, got {seconds!r}")
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_DURATION_S:
        low = "0" if allow_zero else "0.001"
        raise InvalidArgument(f"{name} must be a finite number of seconds in {low}..{MAX_DURATION_S:.0e}, got {seconds!r}")
    ms = int(round(seconds * 1000))
    if ms == 0 and not allow_zero:
        raise InvalidArgument(f"{name} must be at least 0.001 seconds (1 ms), got {seconds!r}")
    return ms


@dataclass(frozen=True)
class QueueConfig:
    """Settings of one queue.  Durations are in seconds (floats allowed).

    Attributes:
        max_attempts: claims a job may have before it is dead-lettered (>= 1).
        lease: how long a claim lasts before the reaper re-queues it.
        priority: default priority of new jobs (lower is claimed first).
        backoff_base / backoff_max: a nacked job waits
            ``min(backoff_base * 2**(attempts-1), backoff_max)`` before it is
            pending again; a zero base re-queues at once (reference: taquba
            0.5.0 ``retry_backoff_base``/``retry_backoff_max``).
        keep_done_jobs: ``None`` (default) deletes a job's record at ``ack``
            (the ``done`` counter still counts it); a number keeps done
            records that many seconds, then the retention sweep removes them.
        dead_retention: seconds a dead-lettered record is kept (default 7
            days); ``None`` keeps dead letters forever.
    """

    max_attempts: int = 3
    lease: float = 30.0
    priority: int = PRIORITY_NORMAL
    backoff_base: float = 1.0
    backoff_max: float = 300.0
    keep_done_jobs: float | None = None
    dead_retention: float | None = 7 * 24 * 3600.0

    def __post_init__(self) -> None:
        from .keys import check_priority

        check_positive_int("max_attempts", self.max_attempts)
        seconds_to_ms("lease", self.lease, allow_zero=False)
        check_priority(self.priority)
        seconds_to_ms("backoff_base", self.backoff_base)
        seconds_to_ms("backoff_max", self.backoff_max)
        if self.keep_done_jobs is not None:
            seconds_to_ms("keep_done_jobs", self.keep_done_jobs)
        if self.dead_retention is not None:
            seconds_to_ms("dead_retention", self.dead_retention)

    @property
    def lease_ms(self) -> int:
        return seconds_to_ms("lease", self.lease)

    def backoff_ms(self, attempts: int) -> int:
        """Delay in ms before retry number ``attempts`` (1-based)."""
        base = seconds_to_ms("backoff_base", self.backoff_base)
        if base == 0:
            return 0
        cap = seconds_to_ms("backoff_max", self.backoff_max)
        return min(base * 2 ** min(max(attempts - 1, 0), 62), cap)
