"""Transaction-level group commit: the steps of concurrent callers share one transaction.

Every transaction costs a fixed number of store calls (begin, one merge per
counter, the conflict bookkeeping, commit, the wait for durability), on
SlateDB each a call across the FFI boundary.  When many callers enqueue or
acknowledge at once, :class:`Combiner` runs their steps one after the other
in a single transaction: one begin, one merge per counter key, one commit and
one WAL wait for the whole group, while each caller still gets its own result
once the group is durable.

Semantics are those of running the steps one at a time in arrival order:

* a step sees the writes of the steps before it (a second enqueue with the
  same dedup key finds the first);
* a step that raises gets its exception, and nothing of it is written: the
  group's transaction is rolled back and re-run without it;
* a conflict retries the whole group (as :meth:`Queue._run` retries one
  step); any other failure of the commit, or of the wait for durability,
  goes to every member of the group;
* a caller cancelled before its group started is left out.

One group is built and committed at a time; its wait for durability runs in
the background, so the next group is prepared while the WAL flush of the
previous one is under way, and it fills with the callers that arrived
meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from .kv import DURABLE, Durability, Transaction

Step = Callable[[Transaction], Awaitable[Any]]
Transact = Callable[[Step], Awaitable[tuple[Any, Durability]]]
WaitDurable = Callable[[Durability], Awaitable[None]]

MAX_GROUP = 256
"""Most steps in one transaction."""


class _Synced(Durability):
    """The durability of a write-less commit: everything it could read is durable."""

    __slots__ = ("_sync",)

    def __init__(self, sync: Callable[[], Awaitable[None]]) -> None:
        self._sync = sync

    async def wait(self) -> None:
        await self._sync()


class _MemberFailed(Exception):
    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(index)
        self.index = index
        self.error = error


_Pending = tuple[list[tuple[Step, "asyncio.Future[Any]"]], list[Any], Durability]
"""A committed group, its results and the durability its members wait for."""


class Combiner:
    """Runs the steps given to :meth:`run` in shared transactions.

    ``transact(step)`` runs one step in a transaction with conflict retries
    and commits it without waiting for durability, returning ``(result,
    durability)``; ``wait_durable(durability)`` waits for it.
    """

    def __init__(
        self,
        transact: Transact,
        wait_durable: WaitDurable,
        sync: Callable[[], Awaitable[None]] | None = None,
        max_group: int = MAX_GROUP,
    ) -> None:
        self._transact = transact
        self._wait_durable = wait_durable
        self._sync = sync
        self._max_group = max_group
        self._waiting: list[tuple[Step, asyncio.Future[Any]]] = []
        self._draining = False
        self._background: set[asyncio.Task[None]] = set()

    async def run(self, step: Step) -> Any:
        """Run ``step`` in a shared transaction; return its result once the transaction is durable."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._waiting.append((step, fut))
        if not self._draining:
            self._draining = True
            self._spawn(self._drain())
        return await fut

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _drain(self) -> None:
        last: _Pending | None = None  # the last group, when nobody came after it
        try:
            while self._waiting:
                group = self._waiting[: self._max_group]
                del self._waiting[: self._max_group]
                group = [(step, fut) for step, fut in group if not fut.done()]
                if group:
                    pending = await self._commit(group)
                    if pending is not None and self._waiting:
                        self._spawn(self._finish(*pending))
                    elif pending is not None:
                        last = pending
        finally:
            self._draining = False
            if self._waiting:  # a failure above left callers behind: serve them
                self._draining = True
                self._spawn(self._drain())
        if last is not None:
            # Nobody is waiting to be drained: this task waits for the
            # durability itself (a caller arriving now starts a new drain).
            await self._finish(*last)

    async def _commit(self, group: list[tuple[Step, asyncio.Future[Any]]]) -> _Pending | None:
        """Commit ``group``'s steps; what is left to do once the commit is durable, if anything."""
        while group:
            members = [step for step, _ in group]

            async def steps(txn: Transaction, members: list[Step] = members) -> list[Any]:
                results = []
                for index, member in enumerate(members):
                    try:
                        results.append(await member(txn))
                    except Exception as exc:
                        raise _MemberFailed(index, exc) from None
                return results

            try:
                results, durability = await self._transact(steps)
            except _MemberFailed as failed:
                _, fut = group.pop(failed.index)
                _settle(fut, error=failed.error)
                continue
            except BaseException as exc:
                for _, fut in group:
                    _settle(fut, error=exc)
                if not isinstance(exc, Exception):
                    raise
                return None
            if durability is DURABLE and self._sync is not None:
                # Nothing was written (every member was a dedup hit), so the
                # commit has no durability of its own, but what the members
                # read may be a commit still on its way: wait for that.
                durability = _Synced(self._sync)
            if durability is DURABLE:
                _deliver(group, results)
                return None
            return group, results, durability
        return None

    async def _finish(
        self, group: list[tuple[Step, asyncio.Future[Any]]], results: list[Any], durability: Durability
    ) -> None:
        try:
            await self._wait_durable(durability)
        except BaseException as exc:
            for _, fut in group:
                _settle(fut, error=exc)
            if not isinstance(exc, Exception):
                raise
            return
        _deliver(group, results)


def _deliver(group: list[tuple[Step, asyncio.Future[Any]]], results: list[Any]) -> None:
    for (_, fut), result in zip(group, results):
        if not fut.done():
            fut.set_result(result)


def _settle(fut: asyncio.Future[Any], *, error: BaseException) -> None:
    if fut.done():
        return
    if isinstance(error, asyncio.CancelledError):
        fut.cancel()
    else:
        fut.set_exception(error)
