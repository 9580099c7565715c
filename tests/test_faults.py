"""Fault injection: failed commits, repeated conflicts, a clock that jumps backwards.

``MemoryStore.inject_faults`` (tests only, see ``FaultPlan``) makes the next
commits fail.  Guarantees checked here (documented in docs/testing.md):

* a commit that fails **before** applying: the call raises ``StoreError``
  (``is_permanent`` false), the raw store is byte-for-byte unchanged, and a
  retry of the same call succeeds once;
* a commit that fails **after** applying (the caller sees an error but the
  write landed): the call raises ``StoreError``; the invariants hold;
  ``stats()`` (an in-process mirror of the counters) shows the landed write;
  retrying never applies a settlement twice (the retry gets ``ClaimLost``),
  a retried ``enqueue_with`` with the same ``dedup_key`` returns the landed
  job (``created=False``) instead of a second one, a retried ``cancel`` or
  ``requeue_dead_job`` reports the job already moved; an enqueue retried
  *without* a dedup key is a new call and makes a second job;
* conflicts are retried by the queue with the same job id, so a call that
  returns after conflicts wrote exactly once; when they outlast the retries
  the call raises ``Contention`` and nothing was written;
* a clock that jumps backwards breaks neither FIFO order (ids stay
  monotonic), nor leases, schedules or retention.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model import check_dump, dump_store

from taquba_backends import MemoryStore
from taquba_backends.memory import FaultPlan
from taquba_core import (
    CancelOutcome,
    ClaimLost,
    Contention,
    JobNotFound,
    JobStatus,
    KVStore,
    ManualClock,
    Queue,
    QueueConfig,
    StoreError,
    TaqubaError,
    Transaction,
    keys,
)
from taquba_core import queue as queue_module
from taquba_core.kv import ForwardingStore, ForwardingTransaction, decode_counter
from taquba_core.transitions import METRICS

CONFIG = QueueConfig(max_attempts=3, lease=10, backoff_base=1, backoff_max=4)


async def open_queue(store: KVStore | None = None, **kwargs: Any) -> Queue:
    kwargs.setdefault("clock", ManualClock())
    kwargs.setdefault("config", CONFIG)
    return await Queue.open(store or MemoryStore(), background=False, **kwargs)


def store_of(queue: Queue) -> MemoryStore:
    assert isinstance(queue.store, MemoryStore)
    return queue.store


async def assert_consistent(queue: Queue) -> dict[bytes, bytes]:
    """The invariants hold on the raw store, and ``stats()``/``list_queues()`` equal the raw counters."""
    dump = await dump_store(queue.store)
    check_dump(dump)
    raw_queues = sorted({k[len(keys.STATS):].decode().rsplit(":", 1)[0] for k in dump if k.startswith(keys.STATS)})
    assert await queue.list_queues() == raw_queues
    for name in raw_queues:
        s = await queue.stats(name)
        raw = tuple(decode_counter(dump.get(keys.stats_key(name, m))) for m in METRICS)
        assert (s.pending, s.scheduled, s.claimed, s.done, s.dead) == raw, name
    return dump


def jobs_in(dump: dict[bytes, bytes]) -> int:
    return sum(1 for k in dump if k.startswith(keys.JOBINDEX))


# -- one scenario per operation ----------------------------------------------------
#
# ``prepare(queue)`` builds the state and returns the call to fault; ``retry``
# says what a retry of that call does once the first attempt landed.


async def _with_claim(queue: Queue, *, max_attempts: int | None = None) -> Any:
    await queue.enqueue_with("q", b"job", max_attempts=max_attempts)
    job = await queue.claim("q")
    assert job is not None
    return job


async def _with_dead(queue: Queue) -> str:
    job = await _with_claim(queue)
    await queue.dead_letter(job, "broken")
    return job.id


SCENARIOS: dict[str, Callable[[Queue], Awaitable[Callable[[], Awaitable[Any]]]]] = {}


def scenario(name: str):  # type: ignore[no-untyped-def]
    def register(prepare):  # type: ignore[no-untyped-def]
        SCENARIOS[name] = prepare
        return prepare

    return register


@scenario("enqueue")
async def _enqueue(queue: Queue):  # type: ignore[no-untyped-def]
    return lambda: queue.enqueue("q", b"x")


@scenario("enqueue_with_dedup")
async def _enqueue_dedup(queue: Queue):  # type: ignore[no-untyped-def]
    return lambda: queue.enqueue_with("q", b"x", dedup_key="once", kv_writes={b"k": b"v"})


@scenario("enqueue_batch")
async def _enqueue_batch(queue: Queue):  # type: ignore[no-untyped-def]
    return lambda: queue.enqueue_batch("q", [b"1", b"2", b"3"], delay=5)


@scenario("claim")
async def _claim(queue: Queue):  # type: ignore[no-untyped-def]
    await queue.enqueue_with("q", b"x", dedup_key="d")
    return lambda: queue.claim("q")


@scenario("ack")
async def _ack(queue: Queue):  # type: ignore[no-untyped-def]
    job = await _with_claim(queue)
    return lambda: queue.ack(job, kv_writes={b"result": b"42"})


@scenario("nack")
async def _nack(queue: Queue):  # type: ignore[no-untyped-def]
    job = await _with_claim(queue)
    return lambda: queue.nack(job, "boom")


@scenario("nack_to_dead")
async def _nack_dead(queue: Queue):  # type: ignore[no-untyped-def]
    job = await _with_claim(queue, max_attempts=1)
    return lambda: queue.nack(job, "boom")


@scenario("dead_letter")
async def _dead_letter(queue: Queue):  # type: ignore[no-untyped-def]
    job = await _with_claim(queue)
    return lambda: queue.dead_letter(job, "bad")


@scenario("renew_lease")
async def _renew(queue: Queue):  # type: ignore[no-untyped-def]
    job = await _with_claim(queue)
    queue.clock.advance(1000)  # type: ignore[attr-defined]
    return lambda: queue.renew_lease(job, 60)


@scenario("cancel")
async def _cancel(queue: Queue):  # type: ignore[no-untyped-def]
    job_id = await queue.enqueue_with("q", b"x", dedup_key="d")
    return lambda: queue.cancel(job_id.id)


@scenario("requeue_dead_job")
async def _requeue(queue: Queue):  # type: ignore[no-untyped-def]
    job_id = await _with_dead(queue)
    return lambda: queue.requeue_dead_job(job_id)


@scenario("promote_now")
async def _promote(queue: Queue):  # type: ignore[no-untyped-def]
    await queue.enqueue_with("q", b"x", delay=1)
    queue.clock.advance(1000)  # type: ignore[attr-defined]
    return queue.promote_now


@scenario("reap_now")
async def _reap(queue: Queue):  # type: ignore[no-untyped-def]
    await _with_claim(queue)
    queue.clock.advance(10_000)  # type: ignore[attr-defined]
    return queue.reap_now


@scenario("kv_put")
async def _kv_put(queue: Queue):  # type: ignore[no-untyped-def]
    return lambda: queue.kv_put(b"k", b"v")


@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_commit_failing_before_apply_changes_nothing(name: str) -> None:
    queue = await open_queue()
    async with queue:
        call = await SCENARIOS[name](queue)
        await queue.enqueue("other", b"busy")  # some unrelated state
        before = await assert_consistent(queue)
        store_of(queue).inject_faults(fail_before_apply=1)
        with pytest.raises(StoreError) as info:
            await call()
        assert not info.value.is_permanent and "before apply" in str(info.value)
        assert await assert_consistent(queue) == before
        await call()  # the retry succeeds, once
        after = await assert_consistent(queue)
        assert after != before or name in ("promote_now", "reap_now")


@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_commit_failing_after_apply_keeps_invariants_and_stats(name: str) -> None:
    """The write landed although the caller saw an error: the invariants hold,
    stats() shows the landed write, and a retry never applies anything twice."""
    queue = await open_queue()
    async with queue:
        call = await SCENARIOS[name](queue)
        before = await assert_consistent(queue)
        store_of(queue).inject_faults(fail_after_apply=1)
        with pytest.raises(StoreError) as info:
            await call()
        assert not info.value.is_permanent and "after apply" in str(info.value)
        landed = await assert_consistent(queue)
        assert landed != before, "the write should have landed"
        await retry_after_landing(name, queue, call, landed)
        await assert_consistent(queue)


async def retry_after_landing(
    name: str, queue: Queue, call: Callable[[], Awaitable[Any]], landed: dict[bytes, bytes]
) -> None:
    """What retrying the call does once its first attempt landed."""
    if name in ("ack", "nack", "nack_to_dead", "dead_letter"):
        with pytest.raises(ClaimLost):  # never settled twice
            await call()
        assert await dump_store(queue.store) == landed
    elif name == "enqueue_with_dedup":
        result = await call()  # the dedup key makes the retry idempotent while the job waits
        assert not result.created and jobs_in(await dump_store(queue.store)) == 1
        assert await dump_store(queue.store) == landed
    elif name == "enqueue":
        await call()  # no dedup key: a new call, a second job (documented)
        assert jobs_in(await dump_store(queue.store)) == 2
    elif name == "enqueue_batch":
        await call()
        assert jobs_in(await dump_store(queue.store)) == 6
    elif name == "cancel":
        assert await call() is CancelOutcome.NOT_FOUND
        assert await dump_store(queue.store) == landed
    elif name == "requeue_dead_job":
        with pytest.raises(JobNotFound):
            await call()
        assert await dump_store(queue.store) == landed
    elif name == "claim":
        # The claim landed but its caller never got the record: the job is
        # invisible until its lease expires, then the reaper re-queues it
        # with the attempt counted.  Nothing is lost.
        assert await call() is None
        queue.clock.advance(CONFIG.lease_ms)  # type: ignore[attr-defined]
        assert await queue.reap_now() == 1
        job = await queue.claim("q")
        assert job is not None and job.attempts == 2 and job.last_error == "lease expired"
    elif name == "renew_lease":
        # The lease moved although the caller saw an error; its record still
        # names the old lease.  The claim is found by its claim id, so the
        # caller keeps it: renew again, then ack.
        job = await queue.claim("q")
        assert job is None
        await call()
        (held,) = [j for j in await _claimed(queue)]
        assert held.lease_expires_at == queue.clock.now_ms() + 60_000  # type: ignore[attr-defined]
    elif name in ("promote_now", "reap_now", "kv_put"):
        await call()  # idempotent: nothing left to move / the same value
        assert await dump_store(queue.store) == landed
    else:  # pragma: no cover
        raise AssertionError(name)


async def _claimed(queue: Queue) -> list[Any]:
    jobs, _ = await queue.list_jobs("q", JobStatus.CLAIMED)
    return jobs


async def test_renewal_that_landed_but_failed_keeps_the_claim_usable() -> None:
    """After an ambiguous renewal the caller's record names the old lease: ack still finds the claim."""
    queue = await open_queue()
    async with queue:
        job = await _with_claim(queue)
        old_lease = job.lease_expires_at
        queue.clock.advance(1000)  # type: ignore[attr-defined]
        store_of(queue).inject_faults(fail_after_apply=1)
        with pytest.raises(StoreError):
            await queue.renew_lease(job, 60)
        assert job.lease_expires_at == old_lease  # the caller's copy did not learn the new lease
        await queue.ack(job)
        s = await queue.stats("q")
        assert (s.claimed, s.done) == (0, 1)
        await assert_consistent(queue)


# -- conflicts -----------------------------------------------------------------------


async def test_conflicts_are_retried_and_write_exactly_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queue_module, "MAX_CONFLICT_RETRIES", 6)
    queue = await open_queue()
    async with queue:
        store = store_of(queue)
        store.inject_faults(conflicts=5)
        job_id = await queue.enqueue("q", b"x")
        store.inject_faults(conflicts=5)
        ids = await queue.enqueue_batch("q", [b"1", b"2"])
        dump = await assert_consistent(queue)
        assert jobs_in(dump) == 3
        store.inject_faults(conflicts=5)
        job = await queue.claim("q")
        assert job is not None and job.id == job_id and job.attempts == 1
        store.inject_faults(conflicts=5)
        await queue.ack(job)
        store.inject_faults(conflicts=5)
        assert await queue.cancel(ids[0]) is CancelOutcome.REMOVED
        s = await queue.stats("q")
        assert (s.pending, s.claimed, s.done) == (1, 0, 1)
        await assert_consistent(queue)


async def test_conflicts_outlasting_the_retries_raise_contention_and_write_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(queue_module, "MAX_CONFLICT_RETRIES", 6)
    queue = await open_queue()
    async with queue:
        store = store_of(queue)
        await queue.enqueue("q", b"first")
        job = await queue.claim("q")
        before = await assert_consistent(queue)
        for call in (
            lambda: queue.enqueue("q", b"x"),
            lambda: queue.enqueue_with("q", b"x", dedup_key="d"),
            lambda: queue.ack(job),
            lambda: queue.nack(job, "e"),
            lambda: queue.kv_put(b"k", b"v"),
        ):
            store.inject_faults(conflicts=6)
            with pytest.raises(Contention) as info:
                await call()
            assert not info.value.is_permanent and "conflict" in str(info.value)
            assert await assert_consistent(queue) == before
        store.inject_faults()
        await queue.ack(job)  # the claim survived every failed attempt
        await assert_consistent(queue)


async def test_targeted_faults_hit_only_matching_commits() -> None:
    """FaultPlan.matches picks commits by the keys they write: fail the acks, not the enqueues."""
    queue = await open_queue()
    async with queue:
        store = store_of(queue)
        store.inject_faults(FaultPlan(fail_before_apply=2, matches=lambda ks: any(k.startswith(keys.USER) for k in ks)))
        await queue.enqueue("q", b"a")
        job = await queue.claim("q")
        with pytest.raises(StoreError):
            await queue.ack(job, kv_writes={b"result": b"1"})
        with pytest.raises(StoreError):
            await queue.kv_put(b"k", b"v")
        await queue.ack(job, kv_writes={b"result": b"1"})
        assert await queue.kv_get(b"result") == b"1"
        await assert_consistent(queue)


# -- the counter mirror under concurrency --------------------------------------------


class VisibleBeforeDurable(ForwardingStore):
    """A MemoryStore whose durable commits become visible before they return.

    Like SlateDB, where a commit is applied to the memtable and then waits for
    its WAL write: other tasks run, and see the write, in between.
    """

    def __init__(self, inner: MemoryStore, durability_wait: float = 0.02) -> None:
        super().__init__(inner)
        self.wait = durability_wait

    def wrap(self, txn: Transaction) -> Transaction:
        return _SlowDurableTxn(txn, self.wait)


class _SlowDurableTxn(ForwardingTransaction):
    def __init__(self, inner: Transaction, wait: float) -> None:
        super().__init__(inner)
        self.wait = wait

    async def commit(self, *, durable: bool = True) -> Any:
        result = await self.inner.commit(durable=durable)
        if durable:
            await asyncio.sleep(self.wait)  # visible, not yet durable
        return result


async def test_stats_stay_exact_when_a_failure_reloads_counters_during_another_commit() -> None:
    """A failed commit makes the queue re-read the counters; a commit that was visible but
    still waiting for durability at that moment must not be counted twice."""
    inner = MemoryStore()
    queue = await open_queue(VisibleBeforeDurable(inner))
    async with queue:
        await queue.enqueue_batch("q", [b"1", b"2"])
        jobs = await queue.claim_batch("q", 2)
        nacking = asyncio.create_task(queue.nack(jobs[0], "slow"))  # visible, then waits 20 ms
        await asyncio.sleep(0.005)
        inner.inject_faults(fail_before_apply=1)
        with pytest.raises(StoreError):
            await queue.kv_put(b"k", b"v")  # invalidates the counter mirror
        await queue.stats("q")  # re-reads the counters while the nack is in flight
        await nacking
        s = await queue.stats("q")
        assert (s.pending, s.scheduled, s.claimed) == (0, 1, 1)
        await assert_consistent(queue)


# -- a clock that jumps backwards ---------------------------------------------------


async def test_clock_jumping_backwards_keeps_fifo_leases_schedules_and_retention() -> None:
    clock = ManualClock()
    queue = await open_queue(clock=clock, queues={"keep": QueueConfig(keep_done_jobs=60, dead_retention=60)})
    async with queue:
        first = await queue.enqueue("q", b"first")
        clock.advance(-60_000)
        second = await queue.enqueue("q", b"second")
        assert second > first  # ids stay monotonic, so FIFO follows enqueue order
        job = await queue.claim("q", lease=10)
        assert job is not None and job.id == first
        clock.advance(-3_600_000)
        assert await queue.reap_now() == 0  # the lease is further away, not expired
        assert await queue.renew_lease(job, 1) == clock.now_ms() + 1000  # may move the lease earlier
        await queue.ack(job)
        sched = await queue.enqueue_with("q", b"later", delay=5)
        clock.advance(-10_000)
        assert await queue.promote_now() == 0
        clock.advance(14_999)
        assert await queue.promote_now() == 0
        clock.advance(1)
        assert await queue.promote_now() == 1
        assert (await queue.get_job(sched.id)).status is JobStatus.PENDING

        await queue.enqueue("keep", b"kept")
        kept = await queue.claim("keep")
        await queue.ack(kept)
        doomed = await queue.enqueue_with("keep", b"doomed", max_attempts=1)
        await queue.nack(await queue.claim("keep"), "dead")
        clock.advance(-100_000)
        await queue.reap_now()  # nothing is old enough when time went back
        assert (await queue.get_job(kept.id)).status is JobStatus.DONE
        assert (await queue.get_job(doomed.id)).status is JobStatus.DEAD
        clock.advance(160_000)
        await queue.reap_now()
        assert await queue.get_job(kept.id) is None and await queue.get_job(doomed.id) is None
        await assert_consistent(queue)


# -- random operations under random faults -------------------------------------------

FAULTS = st.sampled_from([None, None, "conflicts", "fail_before_apply", "fail_after_apply"])
CALLS = st.sampled_from(
    ["enqueue", "enqueue_dedup", "batch", "claim", "ack", "nack", "dead_letter", "renew", "cancel", "requeue",
     "promote", "reap", "advance", "advance_back", "kv", "reopen"]
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)
@given(steps=st.lists(st.tuples(CALLS, FAULTS, st.integers(0, 15)), min_size=5, max_size=40))
def test_random_operations_under_random_faults_keep_the_invariants(steps: list[tuple[str, str | None, int]]) -> None:
    """Whatever fails, every error is typed, the invariants hold, and stats() equals the raw counters."""
    asyncio.run(_run_faulty(steps))


async def _run_faulty(steps: list[tuple[str, str | None, int]]) -> None:
    clock = ManualClock()
    store = MemoryStore()
    queue = await open_queue(store, clock=clock, queues={"k": QueueConfig(keep_done_jobs=5, backoff_base=0)})
    claims: list[Any] = []
    ids: list[str] = []
    try:
        for call, fault, n in steps:
            if fault is not None:
                store.inject_faults(**{fault: 1 + n % 3})
            name = "q" if n % 2 else "k"
            try:
                if call == "enqueue":
                    ids.append(await queue.enqueue(name, str(n).encode()))
                elif call == "enqueue_dedup":
                    ids.append((await queue.enqueue_with(name, b"d", dedup_key=f"d{n % 2}", delay=n % 3)).id)
                elif call == "batch":
                    ids.extend(await queue.enqueue_batch(name, [b"b"] * (n % 4), kv_writes={b"b": b"%d" % n}))
                elif call == "claim":
                    claims.extend(await queue.claim_batch(name, 1 + n % 3, lease=1 + n % 5))
                elif call in ("ack", "nack", "dead_letter", "renew") and claims:
                    job = claims[n % len(claims)]
                    if call == "ack":
                        await queue.ack(job, kv_writes={b"r": b"%d" % n})
                    elif call == "nack":
                        await queue.nack(job, "e")
                    elif call == "dead_letter":
                        await queue.dead_letter(job, "d")
                    else:
                        await queue.renew_lease(job, 1 + n)
                elif call == "cancel" and ids:
                    await queue.cancel(ids[n % len(ids)])
                elif call == "requeue" and ids:
                    await queue.requeue_dead_job(ids[n % len(ids)])
                elif call == "promote":
                    await queue.promote_now()
                elif call == "reap":
                    await queue.reap_now()
                elif call == "advance":
                    clock.advance(500 * n)
                elif call == "advance_back":
                    clock.advance(-300 * n)
                elif call == "kv":
                    await queue.kv_write({b"k%d" % (n % 3): None if n % 4 == 0 else b"v"})
                elif call == "reopen":
                    store.inject_faults()
                    await queue.close()
                    store = store.reopen()
                    queue = await open_queue(store, clock=clock, queues={"k": QueueConfig(keep_done_jobs=5, backoff_base=0)})
            except TaqubaError as exc:
                assert type(exc).__name__ in ("StoreError", "Contention", "ClaimLost", "JobNotFound", "CancelRequested"), exc
            store.inject_faults()
            await assert_consistent(queue)
    finally:
        await queue.close()
