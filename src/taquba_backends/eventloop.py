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
import importlib.util
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a new event loop and return its result.

    The loop is uvloop's when uvloop is importable (see :func:`uses_uvloop`),
    else asyncio's; the ``taquba`` command line runs this way.  Exceptions
    of ``main`` propagate unchanged.
    """
    if uses_uvloop():
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


def uses_uvloop() -> bool:
    """Whether :func:`run` uses uvloop in this environment (it is importable)."""
    return importlib.util.find_spec("uvloop") is not None
