"""Run a coroutine up to its first suspension at once, and the rest when awaited."""

from __future__ import annotations

from collections.abc import Coroutine, Generator
from typing import Any, Generic, TypeVar

T = TypeVar("T")

_RUNNING = object()


class Started(Generic[T]):
    """``coro`` run now until it first waits; awaiting this object runs the rest.

    Used where the order in which two FFI calls *start* matters but their
    ends may overlap: SlateDB queues a write batch during the first poll of
    ``Db.write``, so a flush requested after ``Started(db.write(batch))``
    follows that batch in SlateDB's writer queue.  Await it exactly once,
    from a task of the loop that started it.  An exception raised before the
    first suspension propagates from the constructor.
    """

    __slots__ = ("_coro", "_waiting", "_result")

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        self._coro = coro
        self._result: Any = _RUNNING
        try:
            self._waiting = coro.send(None)
        except StopIteration as stop:
            self._result = stop.value

    def done(self) -> bool:
        """Whether the coroutine finished without suspending (awaiting then returns at once)."""
        return self._result is not _RUNNING

    def close(self) -> None:
        """Abandon the rest of the coroutine (it gets ``GeneratorExit``), instead of awaiting it."""
        if self._result is _RUNNING:
            self._coro.close()

    def __await__(self) -> Generator[Any, Any, T]:
        if self._result is not _RUNNING:
            return self._result
        coro, waiting = self._coro, self._waiting
        while True:
            try:
                value = yield waiting
            except BaseException as exc:  # cancellation or close: pass it into the coroutine
                try:
                    waiting = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
                continue
            try:
                waiting = coro.send(value)
            except StopIteration as stop:
                return stop.value
