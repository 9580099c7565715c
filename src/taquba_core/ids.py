"""Monotonic ULID job ids.

Ids strictly increase within a process, also inside one millisecond, so that
FIFO order among jobs of equal priority is enqueue order.
"""

from __future__ import annotations

import os
import threading

from ulid import ULID

_RANDOM_MAX = (1 << 80) - 1


class MonotonicUlid:
    """Generates ULID strings that strictly increase, even within one millisecond.

    Within one millisecond the 80-bit random part is incremented; when the
    clock goes backwards the previous timestamp is kept.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_rand = 0

    def new(self, now_ms: int) -> str:
        """Return a new 26-character ULID string for time ``now_ms`` (milliseconds)."""
        with self._lock:
            if now_ms > self._last_ms:
                self._last_ms = now_ms
                # Leave headroom so increments within a millisecond never overflow.
                self._last_rand = int.from_bytes(os.urandom(10), "big") >> 1
            else:
                self._last_rand += 1
                if self._last_rand > _RANDOM_MAX:
                    self._last_ms += 1
                    self._last_rand = 0
            value = (self._last_ms << 80) | self._last_rand
        return str(ULID.from_int(value))


_GENERATOR = MonotonicUlid()


def new_job_id(now_ms: int) -> str:
    """A new job id from the process-wide monotonic generator."""
    return _GENERATOR.new(now_ms)
