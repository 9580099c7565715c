"""Transaction-level group commit (taquba_core/combine.py): concurrent enqueues and acks
share transactions, with the results of running them one at a time."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from queue_helpers import check_invariants, dump_store, space_keys
from taquba_backends import MemoryStore
from taquba_core import ClaimLost, KVStore, ManualClock, Queue, StoreError, keys
from taquba_core.kv import Durability, ForwardingStore, ForwardingTransaction, Transaction


class _CountingTransaction(ForwardingTransaction):
    def __init__(self, inner: Transaction, store: "CountingStore") -> None:
        super().__init__(inner)
        self.store = store

    async def commit(self, *, durable: bool = True) -> Durability:
        self.store.commits += 1
        return await self.inner.commit(durable=durable)


class CountingStore(ForwardingStore):
    """Wraps a store and counts commits."""

    def __init__(self, inner: KVStore) -> None:
        super().__init__(inner)
        self.commits = 0

    def wrap(self, txn: Transaction) -> Transaction:
        return _CountingTransaction(txn, self)


async def open_counting(store_factory: Callable[[], Awaitable[KVStore]]) -> tuple[Queue, CountingStore]:
    store = CountingStore(await store_factory())
    return await Queue.open(store, clock=ManualClock(), background=False), store


async def test_concurrent_enqueues_share_commits(store_factory: Callable[[], Awaitable[KVStore]]) -> None:
    queue, store = await open_counting(store_factory)
    try:
        before = store.commits
        ids = await asyncio.gather(*(queue.enqueue("q", b"%d" % i) for i in range(200)))
        assert len(set(ids)) == 200
        assert store.commits - before < 20  # one transaction per group, not per call
        assert (await queue.stats("q")).pending == 200
        # FIFO: claims follow the order the calls were made in.
        claimed = [job.id for job in await queue.claim_batch("q", 200)]
        assert claimed == ids
        await check_invariants(store.inner)
    finally:
        await queue.close()


async def test_concurrent_acks_share_commits(store_factory: Callable[[], Awaitable[KVStore]]) -> None:
    queue, store = await open_counting(store_factory)
    try:
        await queue.enqueue_batch("q", [b"%d" % i for i in range(100)])
        jobs = await queue.claim_batch("q", 100)
        before = store.commits
        await asyncio.gather(*(queue.ack(job) for job in jobs))
        assert store.commits - before < 10
        stats = await queue.stats("q")
        assert (stats.pending, stats.claimed, stats.done) == (0, 0, 100)
        await check_invariants(store.inner)
    finally:
        await queue.close()


async def test_a_failing_member_is_left_out(queue: Queue) -> None:
    """A member that raises gets its error and writes nothing; the others commit."""
    jobs = await queue.claim_batch("q", 1) or []
    assert jobs == []
    await queue.enqueue_batch("q", [b"a", b"b", b"c"])
    a, b, c = await queue.claim_batch("q", 3)
    outcomes = await asyncio.gather(
        queue.ack(a), queue.ack(a), queue.ack(b), queue.enqueue("q", b"d"), queue.ack(c), return_exceptions=True
    )
    assert outcomes[0] is None and isinstance(outcomes[1], ClaimLost)
    assert outcomes[2] is None and isinstance(outcomes[3], str) and outcomes[4] is None
    stats = await queue.stats("q")
    assert (stats.pending, stats.claimed, stats.done) == (1, 0, 3)
    await check_invariants(queue.store)


async def test_dedup_inside_one_group(queue: Queue) -> None:
    results = await asyncio.gather(*(queue.enqueue_with("q", b"%d" % i, dedup_key="k") for i in range(50)))
    created = [r for r in results if r.created]
    assert len(created) == 1
    assert {r.id for r in results} == {created[0].id}
    assert (await queue.stats("q")).pending == 1
    await check_invariants(queue.store)


async def test_conflicts_retry_the_group() -> None:
    store = MemoryStore()
    queue = await Queue.open(store, clock=ManualClock(), background=False)
    try:
        store.inject_faults(conflicts=3)
        ids = await asyncio.gather(*(queue.enqueue("q", b"%d" % i) for i in range(30)))
        assert len(set(ids)) == 30
        assert (await queue.stats("q")).pending == 30
        await check_invariants(store)
    finally:
        await queue.close()


async def test_a_failed_commit_fails_every_member_and_writes_nothing() -> None:
    store = MemoryStore()
    queue = await Queue.open(store, clock=ManualClock(), background=False)
    try:
        store.inject_faults(fail_before_apply=1)
        outcomes = await asyncio.gather(*(queue.enqueue("q", b"%d" % i) for i in range(10)), return_exceptions=True)
        assert all(isinstance(o, StoreError) for o in outcomes)
        assert space_keys(await dump_store(store), keys.PENDING) == []
        # The queue keeps working afterwards.
        assert isinstance(await queue.enqueue("q", b"after"), str)
        assert (await queue.stats("q")).pending == 1
        await check_invariants(store)
    finally:
        await queue.close()


async def test_a_caller_cancelled_before_its_group_writes_nothing() -> None:
    store = MemoryStore()
    queue = await Queue.open(store, clock=ManualClock(), background=False)
    try:
        blocker = asyncio.Event()
        started = asyncio.Event()

        async def slow(txn: Transaction) -> None:
            started.set()
            await blocker.wait()

        first = asyncio.create_task(queue._combiner.run(slow))  # occupies the combiner
        await started.wait()
        doomed = asyncio.create_task(queue.enqueue("q", b"doomed"))
        kept = asyncio.create_task(queue.enqueue("q", b"kept"))
        await asyncio.sleep(0)
        doomed.cancel()
        blocker.set()
        await first
        kept_id = await kept
        with pytest.raises(asyncio.CancelledError):
            await doomed
        pending = space_keys(await dump_store(store), keys.PENDING)
        assert [keys.parse_job_key(k).job_id for k in pending] == [kept_id]
    finally:
        await queue.close()


class _HeldDurability(Durability):
    """Durable once ``released`` is set."""

    def __init__(self, released: asyncio.Event) -> None:
        self.released = released

    async def wait(self) -> None:
        await self.released.wait()


async def test_the_next_group_commits_while_the_last_one_waits_for_durability() -> None:
    from taquba_core.combine import Combiner

    released = asyncio.Event()
    committed: list[list[object]] = []

    async def transact(steps: Callable[[Transaction], Awaitable[list[object]]]) -> tuple[list[object], Durability]:
        results = await steps(None)  # type: ignore[arg-type]  # the steps below take no transaction
        committed.append(results)
        return results, _HeldDurability(released)

    async def wait_durable(durability: Durability) -> None:
        await durability.wait()

    async def value(v: int) -> int:
        return v

    combiner = Combiner(transact, wait_durable)
    first = asyncio.ensure_future(combiner.run(lambda txn: value(1)))
    while committed != [[1]]:
        await asyncio.sleep(0)
    second = asyncio.ensure_future(combiner.run(lambda txn: value(2)))
    for _ in range(100):
        await asyncio.sleep(0)
    assert committed == [[1], [2]]  # not held up by the first group's wait
    assert not first.done() and not second.done()
    released.set()
    assert (await first, await second) == (1, 2)
