"""Running a taquba program on the fastest event loop at hand.

At low concurrency a taquba process spends much of its time in the event
loop itself: the futures, callbacks and cross-thread wake-ups of every
enqueue, claim, ack and SlateDB call.  uvloop (installed with taquba on
Linux and macOS) runs that machinery in C; measured with
benchmarks/bench_throughput.py on file://, it gave 8-16% more jobs/s at
concurrency 1 and ~9% at 16, and was within noise at 256.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a new event loop and return its result.

    The loop is uvloop's when uvloop is importable, else asyncio's; the
    ``taquba`` command line runs this way.  Exceptions of ``main``
    propagate unchanged.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def uses_uvloop() -> bool:
    """Whether :func:`run` would use uvloop in this environment."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True
