"""In-process wake-ups: waiters park on a topic until notified or timed out."""

from __future__ import annotations

import asyncio
from collections import defaultdict


class Notifier:
    """Topic-keyed wake-ups without polling.

    Register before checking the condition, then wait, so a notification
    that lands between the check and the wait is not lost.
    """

    def __init__(self) -> None:
        self._waiters: defaultdict[str, set[asyncio.Future[bool]]] = defaultdict(set)

    def register(self, topic: str) -> asyncio.Future[bool]:
        """A future that completes (with ``True``) at the next :meth:`notify` of ``topic``."""
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters[topic].add(fut)
        return fut

    def discard(self, topic: str, fut: asyncio.Future[bool]) -> None:
        waiters = self._waiters.get(topic)
        if waiters is not None:
            waiters.discard(fut)
            if not waiters:
                del self._waiters[topic]

    def notify(self, topic: str) -> None:
        """Wake every waiter of ``topic``."""
        for fut in self._waiters.pop(topic, ()):
            if not fut.done():
                fut.set_result(True)

    def notify_all(self) -> None:
        """Wake every waiter of every topic (used at close)."""
        for topic in list(self._waiters):
            self.notify(topic)

    async def wait(self, topic: str, fut: asyncio.Future[bool], timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for ``fut`` (one waiter's own); True when it was notified."""
        # A timer instead of asyncio.wait_for: no extra task or future per wait.
        timer = asyncio.get_running_loop().call_later(timeout, _expire, fut)
        try:
            return await fut
        finally:
            timer.cancel()
            self.discard(topic, fut)


def _expire(fut: asyncio.Future[bool]) -> None:
    if not fut.done():
        fut.set_result(False)
