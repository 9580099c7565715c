"""Injectable clocks.  All times are integer milliseconds since the Unix epoch."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Anything with ``now_ms() -> int`` (milliseconds since the Unix epoch)."""

    def now_ms(self) -> int: ...


class SystemClock:
    """The wall clock (``time.time()``) in integer milliseconds."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class ManualClock:
    """A clock that moves only when told to; for tests.

    ``start_ms`` is the initial time in milliseconds since the epoch.
    """

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self._now = start_ms

    def now_ms(self) -> int:
        return self._now

    def advance(self, ms: int) -> int:
        """Move the clock by ``ms`` milliseconds (negative moves it back); returns the new time."""
        self._now += ms
        return self._now

    def set(self, now_ms: int) -> None:
        """Set the clock to ``now_ms`` milliseconds since the epoch."""
        self._now = now_ms
