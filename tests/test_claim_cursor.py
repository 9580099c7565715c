"""The per-queue claim cursor (taquba_core/claim_cursor.py) never skips a live pending key.

A claim scans ``pending:{queue}:`` from the cursor, past the band of keys
that earlier claims deleted.  Each way a pending key can land at or behind
the cursor is exercised here on every store kind: a requeued dead job, a
promoted scheduled job, a higher-priority enqueue, a nack without backoff,
an expired claim, and commits that finish out of id order, including one that
commits while a claim is between its snapshot and its commit.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any
from collections.abc import Awaitable, Callable

from queue_helpers import check_invariants, dump_store
from taquba_core import KVStore, ManualClock, Queue, QueueConfig, claim_cursor, keys, transitions
from taquba_core.kv import Durability, ForwardingStore, ForwardingTransaction, Transaction
from taquba_core.record import JobRecord, JobStatus

PREFIX = keys.pending_prefix("q")


def cursor_of(queue: Queue, name: str = "q") -> bytes | None:
    return queue._cursors.after(keys.pending_prefix(name))


async def head_of(queue: Queue, name: str = "q") -> str | None:
    """The id under the lowest pending key of ``name`` in the store (what a claim must take)."""
    prefix = keys.pending_prefix(name)
    pending = sorted(k for k in await dump_store(queue.store) if k.startswith(prefix))
    return keys.parse_job_key(pending[0]).job_id if pending else None


async def claim_id(queue: Queue, name: str = "q") -> str | None:
    job = await queue.claim(name)
    return None if job is None else job.id


async def drain(queue: Queue, n: int) -> list[str]:
    """Claim and ack ``n`` jobs one at a time; their ids."""
    ids = []
    for _ in range(n):
        job = await queue.claim("q")
        assert job is not None
        await queue.ack(job)
        ids.append(job.id)
    return ids


# -- the cursor moves past the deleted band ------------------------------------


async def test_cursor_follows_the_head(queue: Queue) -> None:
    ids = [await queue.enqueue("q", b"%d" % i) for i in range(20)]
    assert cursor_of(queue) is None
    assert await drain(queue, 15) == ids[:15]
    # The cursor sits on the last claimed key: everything at or below it is gone.
    assert cursor_of(queue) == keys.pending_key("q", 1000, ids[14])
    assert await drain(queue, 5) == ids[15:]
    assert await claim_id(queue) is None
    late = await queue.enqueue("q", b"late")
    assert await claim_id(queue) == late
    await check_invariants(queue.store)


async def test_cursor_is_per_queue(queue: Queue) -> None:
    a = [await queue.enqueue("a", b"%d" % i) for i in range(3)]
    b = [await queue.enqueue("b", b"%d" % i) for i in range(3)]
    assert [await claim_id(queue, "a") for _ in range(2)] == a[:2]
    assert await claim_id(queue, "b") == b[0]
    assert cursor_of(queue, "a") == keys.pending_key("a", 1000, a[1])
    assert cursor_of(queue, "b") == keys.pending_key("b", 1000, b[0])
    assert await claim_id(queue, "a") == a[2]
    assert [await claim_id(queue, "b") for _ in range(2)] == b[1:]


# -- keys that land at or behind the cursor ------------------------------------


async def test_requeued_dead_job_lands_behind_the_cursor(queue: Queue) -> None:
    first, second, third = [await queue.enqueue("q", b"%d" % i) for i in range(3)]
    job = await queue.claim("q")
    assert job is not None and job.id == first
    await queue.dead_letter(job, "boom")
    assert await drain(queue, 1) == [second]
    assert cursor_of(queue) == keys.pending_key("q", 1000, second)
    await queue.requeue_dead_job(first)  # pending again under its old (lower) id
    assert await head_of(queue) == first
    assert await claim_id(queue) == first
    assert await claim_id(queue) == third
    await check_invariants(queue.store)


async def test_promoted_job_lands_behind_the_cursor(queue: Queue, clock: ManualClock) -> None:
    delayed = (await queue.enqueue_with("q", b"later", delay=10)).id
    now = [await queue.enqueue("q", b"%d" % i) for i in range(3)]
    assert await drain(queue, 2) == now[:2]
    clock.advance(10_000)
    assert await queue.promote_now() == 1
    assert await head_of(queue) == delayed  # older id than now[2]
    assert await claim_id(queue) == delayed
    assert await claim_id(queue) == now[2]


async def test_higher_priority_enqueue_lands_behind_the_cursor(queue: Queue) -> None:
    normal = [await queue.enqueue("q", b"%d" % i) for i in range(4)]
    assert await drain(queue, 2) == normal[:2]
    before = cursor_of(queue)
    urgent = (await queue.enqueue_with("q", b"urgent", priority=1)).id
    key = keys.pending_key("q", 1, urgent)
    assert before is not None and key < before  # it landed behind the cursor...
    assert cursor_of(queue) < key  # type: ignore[operator]  # ...which moved below it
    assert await claim_id(queue) == urgent
    low = (await queue.enqueue_with("q", b"low", priority=5000)).id
    assert await claim_id(queue) == normal[2]
    assert await claim_id(queue) == normal[3]
    assert await claim_id(queue) == low


async def test_nack_without_backoff_lands_behind_the_cursor(make_queue: Callable[..., Awaitable[Queue]]) -> None:
    queue = await make_queue(config=QueueConfig(backoff_base=0, max_attempts=5))
    ids = [await queue.enqueue("q", b"%d" % i) for i in range(3)]
    job = await queue.claim("q")
    assert job is not None and job.id == ids[0]
    assert await drain(queue, 1) == [ids[1]]
    retried = await queue.nack(job, "again")
    assert retried.status is JobStatus.PENDING
    assert await claim_id(queue) == ids[0]
    assert await claim_id(queue) == ids[2]


async def test_expired_claim_lands_behind_the_cursor(queue: Queue, clock: ManualClock) -> None:
    ids = [await queue.enqueue("q", b"%d" % i) for i in range(3)]
    lost = await queue.claim("q", lease=1)
    assert lost is not None and lost.id == ids[0]
    assert await drain(queue, 1) == [ids[1]]
    clock.advance(5_000)
    assert await queue.reap_now() == 1
    assert await claim_id(queue) == ids[0]
    assert await claim_id(queue) == ids[2]


async def test_commit_out_of_id_order(queue: Queue) -> None:
    # The id of ``early`` is drawn first, but its insert commits only after
    # a later job was claimed past it.
    early = queue._new_job("q", b"early", {})
    later = [await queue.enqueue("q", b"%d" % i) for i in range(2)]
    assert await claim_id(queue) == later[0]
    await queue._run(lambda txn: transitions.insert(txn, early))
    assert await claim_id(queue) == early.id
    assert await claim_id(queue) == later[1]
    await check_invariants(queue.store)


# -- a key committed while a claim is in flight --------------------------------


class _PausingTransaction(ForwardingTransaction):
    def __init__(self, inner: Transaction, store: "PausingStore") -> None:
        super().__init__(inner)
        self.store = store

    async def scan(self, prefix: bytes, **kwargs: Any) -> list[tuple[bytes, bytes]]:
        rows = await self.inner.scan(prefix, **kwargs)
        if prefix == PREFIX and self.store.armed:
            self.store.armed = False
            self.store.scanned.set()
            await self.store.resume.wait()
        return rows


class PausingStore(ForwardingStore):
    """Wraps a store; when armed, the next scan of ``pending:q:`` waits for ``resume`` after reading."""

    def __init__(self, inner: KVStore) -> None:
        super().__init__(inner)
        self.armed = False
        self.scanned = asyncio.Event()
        self.resume = asyncio.Event()

    def wrap(self, txn: Transaction) -> Transaction:
        return _PausingTransaction(txn, self)


async def test_key_committed_during_a_claim_is_not_skipped(
    store_factory: Callable[[], Awaitable[KVStore]],
) -> None:
    store = PausingStore(await store_factory())
    queue = await Queue.open(store, clock=ManualClock(), background=False)
    try:
        early = queue._new_job("q", b"early", {})  # lowest id, committed late
        later = [await queue.enqueue("q", b"%d" % i) for i in range(3)]
        assert await claim_id(queue) == later[0]  # the cursor is now on later[0]
        store.armed = True
        claim = asyncio.create_task(queue.claim("q"))
        await store.scanned.wait()  # the claim has read its snapshot: later[1] is next
        await queue._run(lambda txn: transitions.insert(txn, early))  # lands below the cursor
        store.resume.set()
        job = await claim
        assert job is not None and job.id == later[1]
        # The claim must not have moved the cursor past ``early``.
        assert cursor_of(queue) is not None and cursor_of(queue) < keys.pending_key("q", 1000, early.id)  # type: ignore[operator]
        assert await claim_id(queue) == early.id
        assert await claim_id(queue) == later[2]
        assert await claim_id(queue) is None
        await check_invariants(store.inner)
    finally:
        await queue.close()


async def test_enqueue_committed_during_a_claim_above_the_cursor(
    store_factory: Callable[[], Awaitable[KVStore]],
) -> None:
    # The claim takes a later key than one committed while it ran (a
    # higher-priority enqueue): the cursor must stay below the new key.
    store = PausingStore(await store_factory())
    queue = await Queue.open(store, clock=ManualClock(), background=False)
    try:
        first = [await queue.enqueue("q", b"%d" % i) for i in range(3)]
        assert await claim_id(queue) == first[0]
        store.armed = True
        claim = asyncio.create_task(queue.claim_batch("q", 2))
        await store.scanned.wait()
        urgent = (await queue.enqueue_with("q", b"urgent", priority=1)).id
        store.resume.set()
        assert [j.id for j in await claim] == first[1:]
        assert await claim_id(queue) == urgent
        assert await claim_id(queue) is None
    finally:
        await queue.close()


# -- random operation sequences ------------------------------------------------


async def test_claims_always_take_the_head(make_queue: Callable[..., Awaitable[Queue]]) -> None:
    """Random enqueues, priorities, delays, nacks, dead letters, requeues, expiries and
    promotions: each claim takes the lowest pending key of the store."""
    for seed in range(4):
        rng = random.Random(seed)
        queue = await make_queue(config=QueueConfig(backoff_base=0, max_attempts=3, lease=5))
        clock = queue.clock
        assert isinstance(clock, ManualClock)
        held = []
        dead: list[str] = []
        for _ in range(300):
            op = rng.random()
            if op < 0.35:
                prio = rng.choice([1000, 1000, 1000, 10, 5000])
                delay = rng.choice([None, None, None, 2])
                await queue.enqueue_with("q", b"x", priority=prio, delay=delay)
            elif op < 0.65:
                expected = await head_of(queue)
                job = await queue.claim("q")
                assert (job.id if job else None) == expected
                if job is not None:
                    held.append(job)
            elif op < 0.8 and held:
                job = held.pop(rng.randrange(len(held)))
                kind = rng.random()
                try:
                    if kind < 0.5:
                        await queue.ack(job)
                    elif kind < 0.8:
                        await queue.nack(job, "retry")
                    else:
                        await queue.dead_letter(job, "dead")
                        dead.append(job.id)
                except Exception:  # noqa: BLE001 - the claim expired meanwhile
                    pass
            elif op < 0.85 and dead:
                try:
                    await queue.requeue_dead_job(dead.pop(rng.randrange(len(dead))))
                except Exception:  # noqa: BLE001 - already requeued
                    pass
            else:
                clock.advance(rng.choice([500, 2_000, 6_000]))
                await queue.promote_now()
                await queue.reap_now()
        await check_invariants(queue.store)


# -- the sweep cursors (scheduled:, claimed:) ------------------------------------


async def test_promotion_of_a_backlog_larger_than_a_batch(queue: Queue, clock: ManualClock) -> None:
    ids = await queue.enqueue_batch("q", [b"%d" % i for i in range(700)], delay=5)  # > 2 sweep batches
    clock.advance(6_000)
    assert await queue.promote_now() == 700
    assert queue._cursors.after(keys.SCHEDULED) is not None
    assert [j.id for j in await queue.claim_batch("q", 700)] == ids
    await check_invariants(queue.store)


async def test_scheduled_key_committed_behind_the_promotion_cursor(queue: Queue, clock: ManualClock) -> None:
    early = queue._new_job("q", b"early", {"delay": 5})  # run_at drawn now, committed later
    clock.advance(1)
    later = (await queue.enqueue_with("q", b"later", delay=5)).id
    clock.advance(6_000)
    assert await queue.promote_now() == 1  # moves ``later``; the cursor is past ``early``'s run_at
    await queue._run(lambda txn: transitions.insert(txn, early))
    assert await queue.promote_now() == 1
    assert [j.id for j in await queue.claim_batch("q", 2)] == [early.id, later]


async def test_clock_going_back_behind_the_promotion_cursor(queue: Queue, clock: ManualClock) -> None:
    first = (await queue.enqueue_with("q", b"first", delay=10)).id
    clock.advance(11_000)
    assert await queue.promote_now() == 1
    clock.advance(-10_000)  # the wall clock stepped back
    back = (await queue.enqueue_with("q", b"back", delay=1)).id  # run_at below the cursor
    clock.advance(2_000)
    assert await queue.promote_now() == 1
    assert [j.id for j in await queue.claim_batch("q", 5)] == [first, back]


async def test_nack_backoff_behind_the_promotion_cursor(make_queue: Callable[..., Awaitable[Queue]]) -> None:
    queue = await make_queue(config=QueueConfig(backoff_base=1, max_attempts=5))
    clock = queue.clock
    assert isinstance(clock, ManualClock)
    job_id = await queue.enqueue("q", b"x")
    job = await queue.claim("q")
    assert job is not None
    await queue.enqueue_with("q", b"far", delay=3)
    clock.advance(3_000)
    assert await queue.promote_now() == 1  # cursor at now
    clock.advance(-2_500)
    retried = await queue.nack(job, "again")  # run_at = now + 1 s, below the cursor
    assert retried.status is JobStatus.SCHEDULED
    clock.advance(1_000)
    assert await queue.promote_now() == 1
    claimed = await queue.claim_batch("q", 5)
    assert job_id in [j.id for j in claimed]


async def test_reaping_a_backlog_and_claims_behind_the_reaping_cursor(queue: Queue, clock: ManualClock) -> None:
    await queue.enqueue_batch("q", [b"%d" % i for i in range(600)])
    assert len(await queue.claim_batch("q", 600, lease=1)) == 600
    clock.advance(2_000)
    assert await queue.reap_now() == 600  # three batches, each after the previous one
    assert queue._cursors.after(keys.CLAIMED) is not None
    clock.advance(-60_000)  # the wall clock stepped back: new leases end below the cursor
    jobs = await queue.claim_batch("q", 3, lease=1)
    assert len(jobs) == 3
    clock.advance(2_000)
    assert await queue.reap_now() == 3
    assert (await queue.stats("q")).pending == 600
    await check_invariants(queue.store)


async def test_claim_committed_during_a_reap_is_not_skipped(
    store_factory: Callable[[], Awaitable[KVStore]],
) -> None:
    class PausingClaimedStore(PausingStore):
        async def begin(self) -> Transaction:
            return _PausingClaimed(await self.inner.begin(), self)

    class _PausingClaimed(_PausingTransaction):
        async def scan(self, prefix: bytes, **kwargs: object) -> list[tuple[bytes, bytes]]:
            rows = await self.inner.scan(prefix, **kwargs)  # type: ignore[arg-type]
            if prefix == keys.CLAIMED and self.store.armed:
                self.store.armed = False
                self.store.scanned.set()
                await self.store.resume.wait()
            return rows

    store = PausingClaimedStore(await store_factory())
    clock = ManualClock()
    queue = await Queue.open(store, clock=clock, background=False)
    try:
        await queue.enqueue_batch("q", [b"a", b"b", b"c"])
        a = await queue.claim("q", lease=1)
        clock.advance(500)
        b = await queue.claim("q", lease=1)
        assert a is not None and b is not None
        clock.advance(-300)  # the next lease will end between a's and b's
        clock.advance(2_000)
        store.armed = True
        reap = asyncio.create_task(queue.reap_now())
        await store.scanned.wait()  # the reap read its snapshot: a and b
        clock.advance(-2_000)
        c = await queue.claim("q", lease=1)  # its key lands between a's and b's, unseen by the reap
        assert c is not None
        clock.advance(2_000)
        store.resume.set()
        assert await reap == 2
        assert await queue.reap_now() == 1  # c is reaped, not skipped
        assert (await queue.stats("q")).claimed == 0
        await check_invariants(store.inner)
    finally:
        await queue.close()


async def test_a_key_visible_to_a_reader_is_never_skipped_by_the_next_claim(make_queue) -> None:
    # A watcher sees a nacked job back in pending (the commit is visible
    # before the nack call returns) and claims at once: the claim must find it.
    queue = await make_queue(config=QueueConfig(backoff_base=0))
    for _ in range(30):
        urgent = (await queue.enqueue_with("q", b"urgent", priority=0)).id
        job = await queue.claim("q")
        assert job is not None and job.id == urgent
        for _ in range(2):
            await queue.enqueue_with("q", b"filler", priority=1000)
        filler = await queue.claim("q")  # the cursor moves past priority 0
        assert filler is not None
        await queue.ack(filler)

        async def watcher() -> JobRecord | None:
            while (await queue.get_job(urgent)).status is not JobStatus.PENDING:
                await asyncio.sleep(0)
            return await queue.claim("q")

        watching = asyncio.create_task(watcher())
        await asyncio.sleep(0)
        await queue.nack(job, "retry")
        got = await watching
        assert got is not None and got.id == urgent
        for leftover in [got, await queue.claim("q")]:
            if leftover is not None:
                await queue.ack(leftover)


class _HoldingTransaction(_PausingTransaction):
    """Holds its commit (before it reaches the store) while the store's ``hold`` is set and it wrote ``hold_prefix``."""

    def __init__(self, inner: Transaction, store: "HoldingStore") -> None:
        super().__init__(inner, store)
        self.wrote_held = False

    async def put(self, key: bytes, value: bytes) -> None:
        if key.startswith(self.store.hold_prefix):
            self.wrote_held = True
        await self.inner.put(key, value)

    async def commit(self, *, durable: bool = True) -> Durability:
        if self.wrote_held and self.store.hold.is_set():
            self.store.holding.set()
            await self.store.release.wait()
        return await self.inner.commit(durable=durable)


class HoldingStore(PausingStore):
    def __init__(self, inner: KVStore, hold_prefix: bytes) -> None:
        super().__init__(inner)
        self.hold_prefix = hold_prefix
        self.hold = asyncio.Event()
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    def wrap(self, txn: Transaction) -> Transaction:
        return _HoldingTransaction(txn, self)


async def test_a_key_committed_after_a_claims_snapshot_is_not_skipped(
    store_factory: Callable[[], Awaitable[KVStore]],
) -> None:
    """A writer that has announced its key but commits after a claim's snapshot:
    the claim must not move the cursor past the key."""
    store = HoldingStore(await store_factory(), keys.pending_key("q", 0, ""))
    queue = await Queue.open(store, clock=ManualClock(), background=False)
    try:
        normal = [await queue.enqueue("q", b"%d" % i) for i in range(3)]
        assert await claim_id(queue) == normal[0]
        store.hold.set()
        urgent = asyncio.create_task(queue.enqueue_with("q", b"urgent", priority=0))
        await store.holding.wait()  # announced, not committed
        store.hold.clear()
        assert await claim_id(queue) == normal[1]  # its snapshot cannot see the urgent job
        store.release.set()
        urgent_id = (await urgent).id
        assert await claim_id(queue) == urgent_id
        assert await claim_id(queue) == normal[2]
    finally:
        await queue.close()


# -- a queue whose live keys are known ---------------------------------------------------


class _ScanCountingTransaction(ForwardingTransaction):
    def __init__(self, inner: Transaction, store: "CountingStore") -> None:
        super().__init__(inner)
        self.store = store

    async def scan(self, prefix: bytes, **kwargs: Any) -> list[tuple[bytes, bytes]]:
        if prefix == PREFIX:
            self.store.scans += 1
        return await self.inner.scan(prefix, **kwargs)


class CountingStore(ForwardingStore):
    """Wraps a store and counts the transactions begun on it and their scans of ``pending:q:``."""

    def __init__(self, inner: KVStore) -> None:
        super().__init__(inner)
        self.begun = 0
        self.scans = 0

    def wrap(self, txn: Transaction) -> Transaction:
        self.begun += 1
        return _ScanCountingTransaction(txn, self)


async def test_claims_on_a_queue_found_empty_make_no_transaction_until_a_key_lands(
    store_factory: Callable[[], Awaitable[KVStore]],
) -> None:
    store = CountingStore(await store_factory())
    clock = ManualClock()
    queue = await Queue.open(store, clock=clock, background=False,
                             config=QueueConfig(backoff_base=0, max_attempts=3, lease=5))
    try:
        assert await claim_id(queue) is None  # scans, finds nothing
        begun = store.begun
        assert [await claim_id(queue) for _ in range(5)] == [None] * 5
        assert store.begun == begun  # known empty: no transaction
        # Each way a pending key lands makes the next claim look again.
        job_id = await queue.enqueue("q", b"new")
        job = await queue.claim("q")
        assert job is not None and job.id == job_id and await claim_id(queue) is None
        await queue.ack(job)
        delayed = (await queue.enqueue_with("q", b"later", delay=1)).id
        assert await claim_id(queue) is None
        clock.advance(1_000)
        await queue.promote_now()
        job = await queue.claim("q")
        assert job is not None and job.id == delayed and await claim_id(queue) is None
        await queue.nack(job, "again")  # no backoff: straight back to pending
        job = await queue.claim("q")
        assert job is not None and job.id == delayed and await claim_id(queue) is None
        clock.advance(10_000)
        await queue.reap_now()  # the lease expired: pending again
        assert await claim_id(queue) == delayed
        await check_invariants(store.inner)
    finally:
        await queue.close()


async def counting_queue(store_factory: Callable[[], Awaitable[KVStore]]) -> tuple[Queue, CountingStore]:
    store = CountingStore(await store_factory())
    queue = await Queue.open(store, clock=ManualClock(), background=False,
                             config=QueueConfig(backoff_base=0, max_attempts=3, lease=5))
    return queue, store


async def test_claims_on_a_drained_queue_read_known_keys_in_claim_order(
    store_factory: Callable[[], Awaitable[KVStore]],
) -> None:
    queue, store = await counting_queue(store_factory)
    try:
        first = await queue.enqueue("q", b"first")
        assert await claim_id(queue) == first  # scans; one row: drained
        scans = store.scans
        low = (await queue.enqueue_with("q", b"low", priority=2000)).id
        normal = await queue.enqueue("q", b"normal")
        urgent = (await queue.enqueue_with("q", b"urgent", priority=1)).id
        assert [job.id for job in await queue.claim_batch("q", 2)] == [urgent, normal]
        job = await queue.claim("q")
        assert job is not None and job.id == low
        await queue.nack(job, "again")  # back to pending under the same key
        assert await claim_id(queue) == low
        assert await claim_id(queue) is None
        assert store.scans == scans  # all read as known keys
        await check_invariants(store.inner)
    finally:
        await queue.close()


async def test_a_known_key_removed_by_a_cancel_is_dropped(store_factory: Callable[[], Awaitable[KVStore]]) -> None:
    queue, store = await counting_queue(store_factory)
    try:
        assert await claim_id(queue) is None
        gone = await queue.enqueue("q", b"cancelled")
        kept = await queue.enqueue("q", b"kept")
        assert (await queue.cancel(gone)).name == "REMOVED"
        assert await claim_id(queue) == kept  # reads the cancelled key, finds it absent
        assert await claim_id(queue) is None
        begun = store.begun
        assert await claim_id(queue) is None
        assert store.begun == begun  # both keys left the known set: no transaction
    finally:
        await queue.close()


async def test_a_key_in_flight_when_a_claim_reads_it_stays_known(
    store_factory: Callable[[], Awaitable[KVStore]],
) -> None:
    """An enqueue announced before a claim but committed after its snapshot:
    the claim reads the key as absent and must keep it for the next claim."""
    store = HoldingStore(await store_factory(), PREFIX)
    queue = await Queue.open(store, clock=ManualClock(), background=False)
    try:
        assert await claim_id(queue) is None  # drained: the known set is kept (empty)
        store.hold.set()
        late = asyncio.create_task(queue.enqueue("q", b"late"))
        await store.holding.wait()  # announced (known), not committed
        store.hold.clear()
        assert await claim_id(queue) is None  # its snapshot cannot see the job
        store.release.set()
        late_id = await late
        assert await claim_id(queue) == late_id
        assert await claim_id(queue) is None
    finally:
        await queue.close()


def test_a_key_written_while_a_claim_ran_stays_known() -> None:
    """A key a claim took (or read as absent) is written again while the claim ran
    (a nack putting the job back under the same key): it stays a candidate."""
    cursors = claim_cursor.ScanCursors()
    a, b, c = PREFIX + b"a", PREFIX + b"b", PREFIX + b"c"
    cursors.begin(PREFIX)
    cursors.end(PREFIX, None, drained=True)
    assert cursors.known_empty(PREFIX)
    cursors.written([a, b, c])
    cursors.settled([a, b, c])
    read = cursors.candidates(PREFIX)
    assert read == [a, b, c]
    cursors.begin(PREFIX)
    cursors.written([a])  # while the claim runs
    cursors.end(PREFIX, b, drained=False, read=read)  # took a and b (not c)
    assert cursors.candidates(PREFIX) == [a, c]
    cursors.settled([a])
    cursors.begin(PREFIX)
    cursors.end(PREFIX, c, drained=False, read=[a, c])  # a found absent, c taken, another row beyond
    assert cursors.candidates(PREFIX) == []


async def test_concurrent_operations_never_strand_a_pending_job(
    store_factory: Callable[[], Awaitable[KVStore]],
) -> None:
    """Enqueues, claims, nacks, cancels and acks racing each other on a shallow
    queue: afterwards claims find every job left pending, in order."""
    for seed in range(3):
        rng = random.Random(seed)
        queue = await Queue.open(await store_factory(), clock=ManualClock(), background=False,
                                 config=QueueConfig(backoff_base=0, max_attempts=1000))
        try:
            async def actor(steps: int, rng: random.Random) -> None:
                for _ in range(steps):
                    op = rng.random()
                    if op < 0.35:
                        await queue.enqueue_with("q", b"x", priority=rng.choice([1, 1000, 1000]))
                    elif op < 0.45:
                        job_id = await queue.enqueue("q", b"x")
                        await queue.cancel(job_id)
                    else:
                        job = await queue.claim("q")
                        if job is not None:
                            await asyncio.sleep(0)
                            await (queue.nack(job, "again") if rng.random() < 0.4 else queue.ack(job))

            await asyncio.gather(*(actor(60, random.Random(rng.random())) for _ in range(6)))
            left = []
            while (expected := await head_of(queue)) is not None:
                job = await queue.claim("q")
                assert job is not None and job.id == expected
                left.append(job)
            assert await queue.claim("q") is None
            for job in left:
                await queue.ack(job)
            await check_invariants(queue.store)
        finally:
            await queue.close()


async def test_more_keys_than_kept_make_claims_scan_again(store_factory: Callable[[], Awaitable[KVStore]]) -> None:
    queue, store = await counting_queue(store_factory)
    try:
        assert await claim_id(queue) is None
        ids = await queue.enqueue_batch("q", [b"%d" % i for i in range(claim_cursor.MAX_KNOWN + 5)])
        scans = store.scans
        assert await drain(queue, len(ids)) == ids
        assert store.scans > scans  # too many to keep: scanned
        assert await claim_id(queue) is None  # drained again: keys known from here on
        scans = store.scans
        late = await queue.enqueue("q", b"late")
        assert await claim_id(queue) == late
        assert store.scans == scans
    finally:
        await queue.close()


async def test_many_known_keys_are_scanned_and_still_leave_the_set(
    store_factory: Callable[[], Awaitable[KVStore]],
) -> None:
    queue, store = await counting_queue(store_factory)
    try:
        assert await claim_id(queue) is None
        ids = await queue.enqueue_batch("q", [b"%d" % i for i in range(transitions.POINT_READS_MAX + 4)])
        scans = store.scans
        assert [job.id for job in await queue.claim_batch("q", 3)] == ids[:3]
        assert store.scans == scans + 1  # more candidates than point reads: one scan
        assert await drain(queue, len(ids) - 3) == ids[3:]
        assert await claim_id(queue) is None
        begun = store.begun
        assert await claim_id(queue) is None
        assert store.begun == begun  # every key left the known set
    finally:
        await queue.close()
