"""The 0.5.0 API surface: dedup, batches, cancel, completion waits, dead letters,
listings, retention, the caller KV namespace and the error hierarchy.

Every test runs against MemoryStore and SlateDB ``memory://`` through the
store-parametrised fixtures.  Basics already covered by ``test_queue.py``
(dedup basics, batch order, kv get/put/scan paging, single-queue retention)
are not repeated here.  The concurrency cases run real concurrent tasks.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
from dataclasses import dataclass

import pytest
from queue_helpers import check_invariants, close_with_a_cancelled_first_try, dump_store, space_keys

import taquba_core.errors as errors_module
from taquba_core import (
    MAX_KV_VALUE_SIZE,
    CancelOutcome,
    CancelRequested,
    ClaimLost,
    InvalidArgument,
    JobNotFound,
    JobStatus,
    KvValueTooLarge,
    ManualClock,
    PermanentFailure,
    Queue,
    QueueConfig,
    StoreClosed,
    TaqubaError,
    WaitStatus,
    keys,
    run_worker_concurrent,
)
from taquba_backends import MemoryStore
from taquba_core.kv import ForwardingStore, KVStore

SWEEP_BATCH = 256


async def counts(queue: Queue, name: str = "q") -> tuple[int, int, int, int, int]:
    s = await queue.stats(name)
    return (s.pending, s.scheduled, s.claimed, s.done, s.dead)


async def make_dead(queue: Queue, name: str = "q", payload: bytes = b"x", **options) -> str:
    """Enqueue one job on ``name`` and dead-letter it; returns its id."""
    res = await queue.enqueue_with(name, payload, max_attempts=1, **options)
    job = await queue.claim(name)
    assert job is not None and job.id == res.id
    await queue.nack(job, "boom")
    return res.id


async def parked(task: asyncio.Task, rounds: int = 20) -> None:
    """Let ``task`` run until it parks (a few loop turns); fails if it already finished."""
    for _ in range(rounds):
        await asyncio.sleep(0)
    assert not task.done(), task


# -- dedup ---------------------------------------------------------------------


async def test_dedup_key_released_when_cancelled(queue: Queue) -> None:
    for options in ({}, {"delay": 30}):
        first = await queue.enqueue_with("q", b"1", dedup_key="k", **options)
        assert (await queue.enqueue_with("q", b"2", dedup_key="k")).id == first.id
        assert await queue.cancel(first.id) is CancelOutcome.REMOVED
        again = await queue.enqueue_with("q", b"3", dedup_key="k", **options)
        assert again.created and again.id != first.id
        assert await queue.cancel(again.id) is CancelOutcome.REMOVED
        await check_invariants(queue.store)
    assert await counts(queue) == (0, 0, 0, 0, 0)
    assert not space_keys(await dump_store(queue.store), keys.DEDUP)


async def test_dedup_race_with_claims_and_cancels(queue: Queue) -> None:
    """Enqueues with one key race claims and cancels: one holder at most, nothing lost."""
    created: list[str] = []
    acked: list[str] = []
    cancelled: list[str] = []

    async def enqueuer(i: int) -> None:
        res = await queue.enqueue_with("q", b"%d" % i, dedup_key="one")
        if res.created:
            created.append(res.id)

    async def claimer() -> None:
        job = await queue.claim("q")
        if job is not None:
            await queue.ack(job)
            acked.append(job.id)

    async def canceller() -> None:
        if created:
            victim = created[-1]
            if await queue.cancel(victim) is CancelOutcome.REMOVED:
                cancelled.append(victim)

    for wave in range(8):
        racers = [enqueuer(10 * wave + i) for i in range(10)]
        racers.insert(wave % 10, claimer() if wave % 2 else canceller())
        await asyncio.gather(*racers)
    dump = await check_invariants(queue.store)
    pending = [keys.parse_job_key(k).job_id for k in space_keys(dump, keys.PENDING)]
    assert len(pending) <= 1
    assert sorted(created) == sorted(pending + acked + cancelled)  # each created job is in exactly one place
    assert len(created) > 1  # the key was released and taken again
    assert (await queue.stats("q")).done == len(acked)


# -- batches and headers ---------------------------------------------------------


async def test_enqueue_batch_empty_and_scheduled(queue: Queue, clock: ManualClock) -> None:
    assert await queue.enqueue_batch("q", []) == []
    ids = await queue.enqueue_batch("q", [b"a", b"b", b"c"], delay=10)
    assert await counts(queue) == (0, 3, 0, 0, 0)
    clock.advance(10_000)
    assert await queue.promote_now() == 3
    assert [j.id for j in await queue.claim_batch("q", 10)] == ids


async def test_headers_returned_on_every_read(make_queue) -> None:
    queue = await make_queue(config=QueueConfig(keep_done_jobs=60, max_attempts=1))
    h = {"tenant": "acme", "trace": "✓"}
    single = await queue.enqueue_with("q", b"s", headers=h)
    batch = await queue.enqueue_batch("q", [b"b1", b"b2"], headers=h)
    sched = await queue.enqueue_with("q", b"later", headers=h, delay=60)
    assert (await queue.get_job(single.id)).headers == h
    assert (await queue.get_job(sched.id)).headers == h
    for status in ("Pending", "Scheduled"):
        page, _ = await queue.list_jobs("q", status)
        assert page and all(j.headers == h for j in page)
    claimed = await queue.claim_batch("q", 3)
    assert [j.id for j in claimed] == [single.id, *batch]
    assert all(j.headers == h for j in claimed)
    page, _ = await queue.list_jobs("q", JobStatus.CLAIMED)
    assert [j.headers for j in page] == [h] * 3
    await queue.ack(claimed[0])
    await queue.nack(claimed[1], "e")
    outcome = await queue.wait_for_completion(single.id, 1)
    assert outcome.record.headers == h
    page, _ = await queue.list_jobs("q", JobStatus.DONE)
    assert [j.headers for j in page] == [h]
    assert [j.headers for j in await queue.dead_jobs("q")] == [h]
    assert (await queue.requeue_dead_job(batch[0])).headers == h


# -- cancel --------------------------------------------------------------------


async def test_cancel_pending_and_scheduled_removes(queue: Queue) -> None:
    pending = await queue.enqueue("q", b"p")
    scheduled = (await queue.enqueue_with("q", b"s", delay=60)).id
    keep = await queue.enqueue("q", b"keep")
    assert await queue.cancel(pending) is CancelOutcome.REMOVED
    assert await queue.cancel(scheduled) is CancelOutcome.REMOVED
    assert await queue.get_job(pending) is None and await queue.get_job(scheduled) is None
    assert await counts(queue) == (1, 0, 0, 0, 0)
    assert await queue.cancel(pending) is CancelOutcome.NOT_FOUND
    assert (await queue.claim("q")).id == keep
    await check_invariants(queue.store)


async def test_cancel_claimed_requests_and_fires_the_signal(queue: Queue) -> None:
    job_id = await queue.enqueue("q", b"x")
    job = await queue.claim("q")
    assert job.cancellation is not None and not job.cancellation.is_set()
    before = await counts(queue)
    assert await queue.cancel(job_id) is CancelOutcome.REQUESTED
    assert job.cancellation.is_set()
    stored = await queue.get_job(job_id)
    assert stored.status is JobStatus.CLAIMED and stored.cancel_requested
    assert await counts(queue) == before
    assert await queue.cancel(job_id) is CancelOutcome.REQUESTED  # idempotent
    await queue.ack(job)  # the handler may still finish
    assert await counts(queue) == (0, 0, 0, 1, 0)
    await check_invariants(queue.store)


async def test_cancel_done_dead_or_unknown_is_not_found(make_queue) -> None:
    queue = await make_queue(config=QueueConfig(keep_done_jobs=60))
    done = await queue.enqueue("q", b"d")
    await queue.ack(await queue.claim("q"))
    dead = await make_dead(queue)
    dropped = await make_queue()
    gone = await dropped.enqueue("q", b"x")
    await dropped.ack(await dropped.claim("q"))
    before = await dump_store(queue.store)
    for job_id in (done, dead, "01ARZ3NDEKTSV4RRFFQ69G5FAV"):
        assert await queue.cancel(job_id) is CancelOutcome.NOT_FOUND
    assert await dropped.cancel(gone) is CancelOutcome.NOT_FOUND
    assert await dump_store(queue.store) == before


async def test_reclaim_after_reap_starts_with_the_signal_set(queue: Queue, clock: ManualClock) -> None:
    job_id = await queue.enqueue("q", b"x")
    first = await queue.claim("q", lease=5)
    await queue.cancel(job_id)
    clock.advance(5_000)
    assert await queue.reap_now() == 1
    assert (await queue.get_job(job_id)).cancel_requested
    second = await queue.claim("q")
    assert second.id == job_id and second.attempts == 2
    assert second.cancellation is not None and second.cancellation.is_set()
    assert first.cancellation.is_set()
    with pytest.raises(ClaimLost):
        await queue.ack(first)
    await check_invariants(queue.store)


async def test_reclaim_after_recovery_starts_with_the_signal_set(tmp_path) -> None:
    from taquba_backends import open_store

    url = f"file://{tmp_path}/store"
    q1 = await Queue.open(await open_store(url), clock=ManualClock(), background=False)
    job_id = await q1.enqueue("q", b"x")
    await q1.claim("q")
    await q1.cancel(job_id)
    await q1.close()
    q2 = await Queue.open(await open_store(url), clock=ManualClock(), background=False)
    async with q2:
        job = await q2.claim("q")
        assert job.id == job_id and job.cancel_requested and job.cancellation.is_set()


@pytest.mark.parametrize("settle", ["nack", "dead_letter"])
async def test_cancel_request_survives_nack_and_dead_letter(make_queue, settle: str) -> None:
    queue = await make_queue(config=QueueConfig(backoff_base=0, max_attempts=3))
    job_id = await queue.enqueue("q", b"x")
    job = await queue.claim("q")
    await queue.cancel(job_id)
    assert not job.cancel_requested  # the caller's copy predates the request
    if settle == "nack":
        new = await queue.nack(job, "stopped")
        assert new.status is JobStatus.PENDING and new.cancel_requested
        again = await queue.claim("q")
        assert again.cancel_requested and again.cancellation.is_set()
    else:
        new = await queue.dead_letter(job, "stopped")
        assert new.status is JobStatus.DEAD and new.cancel_requested
    assert (await queue.get_job(job_id)).cancel_requested
    await check_invariants(queue.store)


async def test_renew_after_cancel_request_raises_cancel_requested(queue: Queue, clock: ManualClock) -> None:
    job_id = await queue.enqueue("q", b"x")
    job = await queue.claim("q", lease=10)
    clock.advance(1_000)
    await queue.renew_lease(job, 10)
    await queue.cancel(job_id)
    before = await dump_store(queue.store)
    expires = job.lease_expires_at
    clock.advance(1_000)
    with pytest.raises(CancelRequested) as info:
        await queue.renew_lease(job, 10)
    assert isinstance(info.value, TaqubaError) and info.value.is_permanent
    assert job.lease_expires_at == expires
    assert await dump_store(queue.store) == before
    await queue.ack(job)  # the claim is still settleable until its lease ends


async def test_cancel_racing_a_claim(queue: Queue) -> None:
    outcomes = set()
    for i in range(30):
        job_id = await queue.enqueue("q", b"%d" % i)
        if i % 2:
            outcome, job = await asyncio.gather(queue.cancel(job_id), queue.claim("q"))
        else:
            job, outcome = await asyncio.gather(queue.claim("q"), queue.cancel(job_id))
        outcomes.add(outcome)
        if outcome is CancelOutcome.REMOVED:
            assert job is None and await queue.get_job(job_id) is None
        else:
            assert outcome is CancelOutcome.REQUESTED
            assert job.id == job_id and job.cancellation.is_set()
            assert (await queue.get_job(job_id)).cancel_requested
            await queue.ack(job)
        await check_invariants(queue.store)
    assert outcomes == {CancelOutcome.REMOVED, CancelOutcome.REQUESTED}  # both orders of the race happened
    s = await queue.stats("q")
    assert (s.pending, s.scheduled, s.claimed, s.dead) == (0, 0, 0, 0)


async def test_worker_handler_sees_cancellation_and_renewal_stops_quietly(
    queue: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="taquba")
    job_id = await queue.enqueue("q", b"long")
    started, stop = asyncio.Event(), asyncio.Event()
    seen: list[bool] = []

    async def handler(job):
        started.set()
        await asyncio.wait_for(job.cancellation.wait(), 5)
        seen.append(job.cancellation.is_set())
        await asyncio.sleep(0.25)  # the lease keeper tries to renew after the request
        raise PermanentFailure("cancelled")

    worker = asyncio.create_task(
        run_worker_concurrent(queue, "q", handler, concurrency=1, poll_interval=0.05, shutdown=stop, lease=0.09)
    )
    await asyncio.wait_for(started.wait(), 5)
    assert await queue.cancel(job_id) is CancelOutcome.REQUESTED
    outcome = await queue.wait_for_completion(job_id, 5)
    stop.set()
    stats = await asyncio.wait_for(worker, 5)
    assert seen == [True]
    assert outcome.status is WaitStatus.COMPLETED
    assert outcome.record.status is JobStatus.DEAD and outcome.record.cancel_requested
    assert (stats.dead_lettered, stats.claims_lost, stats.errors) == (1, 0, [])
    worker_logs = [r for r in caplog.records if r.name.startswith("taquba.worker")]
    assert any("cancel" in r.getMessage() for r in worker_logs)
    warnings = [r.getMessage() for r in worker_logs if r.levelno >= logging.WARNING]
    assert [m for m in warnings if "dead-lettered" not in m] == [], warnings  # the renewal stops quietly


# -- wait_for_completion ---------------------------------------------------------


async def test_wait_outcomes(make_queue) -> None:
    kept = await make_queue(config=QueueConfig(keep_done_jobs=60))
    queue = await make_queue()
    assert (await queue.wait_for_completion("01ARZ3NDEKTSV4RRFFQ69G5FAV", 0.01)).status is WaitStatus.NOT_FOUND

    waiting = await queue.enqueue("q", b"w")
    timed = await queue.wait_for_completion(waiting, 0.02)
    assert (timed.status, timed.record) == (WaitStatus.TIMED_OUT, None)

    dead = await make_dead(queue, "d")
    out = await queue.wait_for_completion(dead, 0)
    assert out.status is WaitStatus.COMPLETED and out.record.status is JobStatus.DEAD and out.record.id == dead

    done_kept = await kept.enqueue("q", b"k")
    await kept.ack(await kept.claim("q"))
    out = await kept.wait_for_completion(done_kept, 0)
    assert out.status is WaitStatus.COMPLETED and out.record.status is JobStatus.DONE

    job = await queue.claim("q")
    waiter = asyncio.create_task(queue.wait_for_completion(waiting, 5))
    await parked(waiter)
    await queue.ack(job)
    out = await waiter
    assert (out.status, out.record) == (WaitStatus.COMPLETED, None)
    # acked and not kept: unknown at a later call
    assert (await queue.wait_for_completion(waiting, 0)).status is WaitStatus.NOT_FOUND


@pytest.mark.parametrize("transition", ["ack", "nack_last", "dead_letter", "reap_last", "cancel"])
async def test_every_terminal_transition_wakes_all_waiters(make_queue, transition: str) -> None:
    queue = await make_queue(config=QueueConfig(max_attempts=1, keep_done_jobs=60))
    job_id = await queue.enqueue("q", b"x")
    job = None if transition == "cancel" else await queue.claim("q", lease=5)
    waiters = [asyncio.create_task(queue.wait_for_completion(job_id, 30)) for _ in range(5)]
    await parked(waiters[-1])
    loop = asyncio.get_running_loop()
    start = loop.time()
    if transition == "ack":
        await queue.ack(job)
    elif transition == "nack_last":
        await queue.nack(job, "e")
    elif transition == "dead_letter":
        await queue.dead_letter(job, "e")
    elif transition == "reap_last":
        queue.clock.advance(5_000)
        assert await queue.reap_now() == 1
    else:
        assert await queue.cancel(job_id) is CancelOutcome.REMOVED
    results = await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert loop.time() - start < 2  # woken by notification, not by the 30 s timeout
    assert all(r.status is WaitStatus.COMPLETED for r in results)
    records = {None if r.record is None else r.record.status for r in results}
    want = {"ack": JobStatus.DONE, "cancel": None}.get(transition, JobStatus.DEAD)
    assert records == {want}


async def test_waiters_racing_the_terminal_transition(make_queue) -> None:
    queue = await make_queue(config=QueueConfig(keep_done_jobs=600, max_attempts=1))
    for i in range(25):
        job_id = await queue.enqueue("q", b"%d" % i)
        job = await queue.claim("q")
        before = [asyncio.create_task(queue.wait_for_completion(job_id, 10)) for _ in range(3)]
        settle = asyncio.create_task(queue.ack(job) if i % 2 else queue.dead_letter(job, "e"))
        after = [asyncio.create_task(queue.wait_for_completion(job_id, 10)) for _ in range(3)]
        outcomes = await asyncio.wait_for(asyncio.gather(*before, *after), 5)
        await settle
        want = JobStatus.DONE if i % 2 else JobStatus.DEAD
        assert all(o.status is WaitStatus.COMPLETED and o.record.status is want for o in outcomes)


# -- dead letters ----------------------------------------------------------------


async def test_dead_jobs_pages_in_id_order_with_a_seeking_cursor(queue: Queue) -> None:
    ids = [await make_dead(queue) for _ in range(7)]
    other = await make_dead(queue, "q2")
    assert [j.id for j in await queue.dead_jobs("q", limit=100)] == ids
    pages, after = [], None
    while True:
        page = await queue.dead_jobs("q", after, limit=3)
        if not page:
            break
        pages.append([j.id for j in page])
        after = page[-1].id
    assert pages == [ids[:3], ids[3:6], ids[6:]]
    # the cursor is exclusive and seeks: it need not be a dead id of this queue
    assert [j.id for j in await queue.dead_jobs("q", ids[2])] == ids[3:]
    assert [j.id for j in await queue.dead_jobs("q", ids[2] + "0")] == ids[3:]
    assert [j.id for j in await queue.dead_jobs("q", other)] == [i for i in ids if i > other]
    assert [j.id for j in await queue.dead_jobs("q2")] == [other]
    assert await queue.dead_jobs("empty") == []


async def test_requeue_dead_job_resets_budget_and_keeps_enqueued_at(queue: Queue, clock: ManualClock) -> None:
    job_id = (await queue.enqueue_with("q", b"x", max_attempts=2, priority=7)).id
    enqueued_at = clock.now_ms()
    clock.advance(1_000)
    job = await queue.claim("q")
    await queue.cancel(job_id)
    await queue.dead_letter(job, "permanent")
    dead = await queue.get_job(job_id)
    assert dead.failed_at and dead.last_error and dead.cancel_requested
    clock.advance(1_000)
    fresh = await queue.requeue_dead_job(job_id)
    assert fresh.status is JobStatus.PENDING and fresh.attempts == 0 and fresh.max_attempts == 2
    assert (fresh.last_error, fresh.failed_at, fresh.cancel_requested) == (None, None, False)
    assert fresh.enqueued_at == enqueued_at and fresh.priority == 7
    assert await queue.get_job(job_id) == fresh
    assert await counts(queue) == (1, 0, 0, 0, 0)
    again = await queue.claim("q")
    assert again.id == job_id and again.attempts == 1 and not again.cancellation.is_set()
    await check_invariants(queue.store)


async def test_requeue_of_a_job_no_longer_dead_is_job_not_found(make_queue) -> None:
    queue = await make_queue(config=QueueConfig(dead_retention=10))
    pending = await queue.enqueue("waiting", b"p")
    dead = await make_dead(queue)
    swept = await make_dead(queue)
    await queue.requeue_dead_job(dead)
    queue.clock.advance(10_000)
    await queue.reap_now()
    before, stats_before = await dump_store(queue.store), await counts(queue)
    for job_id in (pending, dead, swept, "01ARZ3NDEKTSV4RRFFQ69G5FAV"):
        with pytest.raises(JobNotFound) as info:
            await queue.requeue_dead_job(job_id)
        assert info.value.is_permanent
    assert await dump_store(queue.store) == before
    assert await counts(queue) == stats_before == (1, 0, 0, 0, 0)
    await check_invariants(queue.store)


async def test_requeue_racing_the_dead_sweep(make_queue) -> None:
    queue = await make_queue(config=QueueConfig(dead_retention=10))
    ids = [await make_dead(queue) for _ in range(10)]
    queue.clock.advance(10_000)

    async def requeue(job_id: str) -> bool:
        try:
            await queue.requeue_dead_job(job_id)
            return True
        except JobNotFound:
            return False

    results = await asyncio.gather(*(requeue(i) for i in ids[:5]), queue.reap_now(), *(requeue(i) for i in ids[5:]))
    requeued = sum(r for r in results if isinstance(r, bool))
    assert await counts(queue) == (requeued, 0, 0, 0, 0)
    await check_invariants(queue.store)


# -- listings ------------------------------------------------------------------


async def _page_all(queue: Queue, name: str, status, limit: int) -> list[str]:
    out, cursor = [], None
    while True:
        page, cursor = await queue.list_jobs(name, status, cursor, limit)
        assert len(page) <= limit
        out.extend(j.id for j in page)
        if cursor is None:
            return out


async def test_list_jobs_in_each_space_order(make_queue) -> None:
    queue = await make_queue(config=QueueConfig(keep_done_jobs=3600, max_attempts=1))
    clock = queue.clock
    # the other queue interleaves in every time-first space
    pend = [(await queue.enqueue_with("q", b"p%d" % i, priority=p)).id for i, p in enumerate([5, 1, 5, 3])]
    await queue.enqueue("other", b"o")
    pending_order = [pend[1], pend[3], pend[0], pend[2]]
    sched = [(await queue.enqueue_with("q", b"s", delay=d)).id for d in (30, 10, 20)]
    await queue.enqueue_with("other", b"s", delay=15)
    sched_order = [sched[1], sched[2], sched[0]]
    assert await _page_all(queue, "q", JobStatus.PENDING, 3) == pending_order
    assert await _page_all(queue, "q", "Scheduled", 2) == sched_order

    claims = []
    for lease in (50, 20, 40, 30):
        job = await queue.claim("q", lease=lease)
        claims.append((lease, job))
    other = await queue.claim("other", lease=25)
    by_expiry = [j.id for _, j in sorted(claims, key=lambda c: c[0])]
    assert await _page_all(queue, "q", JobStatus.CLAIMED, 3) == by_expiry
    assert await _page_all(queue, "other", JobStatus.CLAIMED, 3) == [other.id]

    # ack in the order 3, 1, 0 with time passing: done lists by completion time
    for index in (3, 1, 0):
        clock.advance(1_000)
        await queue.ack(claims[index][1])
        if index == 1:
            await queue.ack(other)
    done_order = [claims[i][1].id for i in (3, 1, 0)]
    await queue.nack(claims[2][1], "e")
    assert await _page_all(queue, "q", JobStatus.DONE, 2) == done_order
    assert await _page_all(queue, "q", JobStatus.DONE, 100) == done_order
    assert await _page_all(queue, "q", JobStatus.DEAD, 1) == [claims[2][1].id]
    assert await _page_all(queue, "nobody", JobStatus.DONE, 5) == []
    assert set(await queue.list_queues()) == {"q", "other"}
    for bad in ("bogus", "finished"):  # names are case-insensitive, so "done" is valid
        with pytest.raises(InvalidArgument):
            await queue.list_jobs("q", bad)
    with pytest.raises(InvalidArgument):
        await queue.list_jobs("q", JobStatus.PENDING, "not-hex")


async def test_list_jobs_skips_many_rows_of_other_queues(queue: Queue) -> None:
    await queue.enqueue_batch("noise", [b"n"] * 300, delay=10)  # sorts before "q" at the same run_at
    for delay in (10, 11, 12):
        await queue.enqueue_with("q", b"q", delay=delay)
    await queue.enqueue_batch("noise", [b"n"] * 300, delay=11)
    page, cursor = await queue.list_jobs("q", JobStatus.SCHEDULED, limit=2)
    assert len(page) == 2 and cursor is not None
    rest, cursor = await queue.list_jobs("q", JobStatus.SCHEDULED, cursor, limit=2)
    assert len(rest) == 1 and cursor is None
    assert all(j.queue == "q" for j in page + rest)


# -- retention -------------------------------------------------------------------


async def test_done_sweep_progresses_across_queues_with_different_retention(make_queue) -> None:
    """Rows kept longer by one queue do not stall the sweep of another (more than a sweep batch)."""
    queue = await make_queue(
        queues={"long": QueueConfig(keep_done_jobs=3600), "short": QueueConfig(keep_done_jobs=10)},
    )
    await queue.enqueue_batch("long", [b"l"] * (SWEEP_BATCH + 44))
    await asyncio.gather(*(queue.ack(job) for job in await queue.claim_batch("long", 1000)))
    queue.clock.advance(1)
    short_ids = [await queue.enqueue("short", b"s") for _ in range(5)]
    for job in await queue.claim_batch("short", 10):
        await queue.ack(job)
    queue.clock.advance(10_000)
    await queue.reap_now()
    for job_id in short_ids:
        assert await queue.get_job(job_id) is None
    assert (await counts(queue, "short"))[3] == 5
    assert len(await _page_all(queue, "long", JobStatus.DONE, 1000)) == SWEEP_BATCH + 44
    await check_invariants(queue.store)


async def test_done_sweep_stops_at_the_first_unexpired_record(make_queue) -> None:
    queue = await make_queue(config=QueueConfig(keep_done_jobs=10))
    old = await queue.enqueue("q", b"old")
    await queue.ack(await queue.claim("q"))
    queue.clock.advance(5_000)
    young = await queue.enqueue("q", b"young")
    await queue.ack(await queue.claim("q"))
    queue.clock.advance(5_000)
    await queue.reap_now()
    assert await queue.get_job(old) is None
    assert (await queue.get_job(young)).status is JobStatus.DONE
    assert (await queue.stats("q")).done == 2
    queue.clock.advance(5_000)
    await queue.reap_now()
    assert await queue.get_job(young) is None
    assert (await queue.stats("q")).done == 2


async def test_dead_sweep_visits_the_whole_set_and_the_counter_follows(make_queue) -> None:
    queue = await make_queue(
        config=QueueConfig(dead_retention=60, max_attempts=1),
        queues={"forever": QueueConfig(dead_retention=None, max_attempts=1)},
    )
    n = 2 * SWEEP_BATCH + 10
    await queue.enqueue_batch("q", [b"%d" % i for i in range(n)])
    await asyncio.gather(*(queue.dead_letter(job, "e") for job in await queue.claim_batch("q", n)))
    kept = await make_dead(queue, "forever")
    queue.clock.advance(30_000)
    young = await make_dead(queue)
    queue.clock.advance(30_000)
    for _ in range(4):  # a bounded number of ticks visits the whole set
        await queue.reap_now()
    assert (await counts(queue))[4] == 1
    assert [j.id for j in await queue.dead_jobs("q")] == [young]
    assert [j.id for j in await queue.dead_jobs("forever")] == [kept]
    queue.clock.advance(30_000)
    for _ in range(2):
        await queue.reap_now()
    assert await counts(queue) == (0, 0, 0, 0, 0)
    assert (await counts(queue, "forever"))[4] == 1
    await check_invariants(queue.store)


async def test_settle_racing_the_reaper(make_queue) -> None:
    queue = await make_queue(config=QueueConfig(max_attempts=5))
    settled = reaped = 0
    for i in range(30):
        job_id = await queue.enqueue("q", b"%d" % i)
        job = await queue.claim("q", lease=1)
        queue.clock.advance(1_000)

        async def settle(job=job, i=i) -> bool:
            try:
                if i % 2:
                    await queue.ack(job)
                else:
                    await queue.nack(job, "e")
                return True
            except ClaimLost:
                return False

        if i % 4 < 2:
            won, moved = await asyncio.gather(settle(), queue.reap_now())
        else:
            moved, won = await asyncio.gather(queue.reap_now(), settle())
        assert won != bool(moved)  # exactly one of them moved the claim
        settled += won
        reaped += moved
        await check_invariants(queue.store)
        if not won:
            assert (await queue.get_job(job_id)).status is JobStatus.PENDING
            await queue.cancel(job_id)
        elif i % 2 == 0:
            await queue.cancel(job_id)
    assert settled + reaped == 30
    assert settled and reaped  # both orders of the race happened
    s = await queue.stats("q")
    assert (s.pending, s.scheduled, s.claimed, s.dead) == (0, 0, 0, 0)


# -- caller KV namespace ---------------------------------------------------------


async def test_enqueue_with_kv_commits_together(queue: Queue) -> None:
    res = await queue.enqueue_with_kv("q", b"x", {b"a": b"1", b"b": None}, dedup_key="k", priority=3)
    assert res.created and (await queue.get_job(res.id)).priority == 3
    assert await queue.kv_get(b"a") == b"1"
    await queue.kv_put(b"b", b"old")
    hit = await queue.enqueue_with_kv("q", b"y", {b"a": b"2", b"b": None}, dedup_key="k")
    assert hit.id == res.id and not hit.created
    assert (await queue.kv_get(b"a"), await queue.kv_get(b"b")) == (b"1", b"old")
    before = await dump_store(queue.store)
    too_big = b"v" * (MAX_KV_VALUE_SIZE + 1)
    with pytest.raises(KvValueTooLarge, match=str(MAX_KV_VALUE_SIZE + 1)):
        await queue.enqueue_with_kv("q", b"z", {b"ok": b"1", b"big": too_big})
    with pytest.raises(KvValueTooLarge, match=str(MAX_KV_VALUE_SIZE + 1)):
        await queue.kv_put(b"big", too_big)
    assert await dump_store(queue.store) == before
    await queue.kv_put(b"max", b"v" * MAX_KV_VALUE_SIZE)
    assert len(await queue.kv_get(b"max")) == MAX_KV_VALUE_SIZE


async def test_kv_scan_cursor_resumes_strictly_after(queue: Queue) -> None:
    for k in (b"a", b"a\x00", b"a\xff", b"b"):
        await queue.kv_put(k, k)
    page, cursor = await queue.kv_scan(b"a", limit=2)
    assert [k for k, _ in page] == [b"a", b"a\x00"] and cursor == b"a\x00"
    page, cursor = await queue.kv_scan(b"a", cursor, limit=2)
    assert [k for k, _ in page] == [b"a\xff"] and cursor is None
    page, _ = await queue.kv_scan(b"", b"a\x00", limit=10)
    assert [k for k, _ in page] == [b"a\xff", b"b"]


@pytest.mark.parametrize(
    "key",
    [b"", b"pending:", b"jobindex:", b"stats:q:pending", b"dedup:q:k", b"../pending:", b"\x00", b"\xff\xff", b"usr:"],
)
async def test_caller_keys_never_reach_internal_keys(queue: Queue, key: bytes) -> None:
    res = await queue.enqueue_with("q", b"x", dedup_key="k")
    internal = {k: v for k, v in (await dump_store(queue.store)).items() if not k.startswith(keys.USER)}
    assert await queue.kv_get(key) is None
    assert await queue.kv_get(key + res.id.encode()) is None
    page, cursor = await queue.kv_scan(key, limit=1000)
    assert (page, cursor) == ([], None)
    page, _ = await queue.kv_scan(b"", key, limit=1000)
    assert page == []
    await queue.kv_put(key, b"mine")
    await queue.kv_put(key + res.id.encode(), b"mine")
    await queue.kv_delete(key + b"pending:q:")
    await queue.kv_write({key + b"x": b"1", key + b"jobindex:" + res.id.encode(): None})
    dump = await dump_store(queue.store)
    assert {k: v for k, v in dump.items() if not k.startswith(keys.USER)} == internal
    assert await queue.kv_get(key) == b"mine"
    everything, _ = await queue.kv_scan(limit=1000)
    assert sorted(k for k, _ in everything) == sorted({key, key + res.id.encode(), key + b"x"})


# -- errors ----------------------------------------------------------------------


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_subclasses(sub))
    return out


def test_every_error_says_whether_retrying_can_help() -> None:
    classes = [TaqubaError, *_subclasses(TaqubaError)]
    public = {c for c in classes if c.__module__ == errors_module.__name__}
    assert len(public) >= 14
    transient = {"StoreError", "StoreConflict", "Contention"}
    permanent = {
        "InvalidArgument", "InvalidQueueName", "InvalidStoreUrl", "KvValueTooLarge", "JobNotFound",
        "ClaimLost", "CancelRequested", "CorruptRecord", "StoreFenced", "StoreClosed",
    }  # fmt: skip
    for cls in public:
        assert isinstance(cls.is_permanent, bool), cls
        if cls.__name__ in transient:
            assert not cls.is_permanent, cls
        elif cls.__name__ in permanent:
            assert cls.is_permanent, cls
        doc = cls.__doc__ or ""
        assert re.search(r"retry", doc, re.IGNORECASE), f"{cls.__name__} does not document retrying"
        if cls is not TaqubaError:
            word = "Permanent" if cls.is_permanent else "Transient"
            assert word in doc, f"{cls.__name__}: is_permanent={cls.is_permanent} but its doc does not say {word}"


async def test_list_jobs_takes_a_status_name_in_any_case(queue) -> None:
    job = await queue.enqueue("q", b"x")
    for status in ("pending", "Pending", "PENDING", JobStatus.PENDING):
        page, _ = await queue.list_jobs("q", status)
        assert [j.id for j in page] == [job]
    with pytest.raises(InvalidArgument, match="expected one of pending, scheduled"):
        await queue.list_jobs("q", "waiting")


async def test_worker_counts_exhausted_retries_as_dead_letters(make_queue) -> None:
    queue = await make_queue(config=QueueConfig(max_attempts=2, backoff_base=0))
    job = await queue.enqueue("w", b"x")
    stop = asyncio.Event()

    async def fail(record: JobRecord) -> None:
        if record.attempts == 2:
            stop.set()
        raise ValueError("boom")

    stats = await run_worker_concurrent(queue, "w", fail, concurrency=1, poll_interval=0.05, shutdown=stop)
    assert (stats.nacked, stats.dead_lettered) == (1, 1)
    assert (await queue.get_job(job)).status is JobStatus.DEAD


async def test_wait_for_completion_times_out_when_the_queue_closes(make_queue) -> None:
    queue = await make_queue()
    job = await queue.enqueue("q", b"x")
    waiting = asyncio.create_task(queue.wait_for_completion(job, 30))
    await asyncio.sleep(0)
    await queue.close()
    assert (await waiting).status is WaitStatus.TIMED_OUT


async def test_cancel_racing_a_settlement_leaves_no_signal_behind(queue) -> None:
    for trial in range(40):
        job_id = await queue.enqueue("q", b"x")
        job = await queue.claim("q")

        async def settle() -> None:
            for _ in range(trial % 4):
                await asyncio.sleep(0)
            await queue.dead_letter(job, "boom")

        await asyncio.gather(queue.cancel(job_id), settle())
        assert job_id not in queue._cancel_signals
        await queue.requeue_dead_job(job_id)
        again = await queue.claim("q")
        assert again.cancellation.is_set() == again.cancel_requested
        await queue.ack(again)


async def test_a_store_belongs_to_one_open_queue(store_factory) -> None:  # type: ignore[no-untyped-def]
    # A second queue writing the same store object would not see the first
    # one's pending keys in its claim cursor (it would report the queue empty).
    store = await store_factory()
    first = await Queue.open(store, background=False)
    try:
        with pytest.raises(InvalidArgument, match="already belongs to an open Queue"):
            await Queue.open(store, background=False)
        job_id = await first.enqueue("q", b"x")
        job = await first.claim("q")
        assert job is not None and job.id == job_id
    finally:
        await first.close()



async def test_async_with_closes_the_queue_and_refuses_a_closed_one() -> None:
    async with await Queue.open(MemoryStore(), background=False) as queue:
        await queue.enqueue("q", b"x")
    assert queue.closed
    with pytest.raises(StoreClosed, match="closed"):
        async with queue:
            pass


async def test_a_store_is_released_by_a_cancelled_close_and_by_a_dropped_queue() -> None:
    store = MemoryStore()
    queue = await Queue.open(store)  # with its background tasks
    await close_with_a_cancelled_first_try(queue)
    with pytest.raises(StoreClosed):
        await store.begin()  # closed, not left open and owned
    other = MemoryStore()
    dropped = await Queue.open(other, background=False)
    del dropped
    gc.collect()
    again = await Queue.open(other, background=False)  # nobody owns it any more
    await again.close()


@dataclass(eq=True)
class _EqualityStore(ForwardingStore):
    """A store class with ``__eq__`` (so unhashable)."""

    inner: KVStore


async def test_an_unhashable_store_opens() -> None:
    queue = await Queue.open(_EqualityStore(MemoryStore()), background=False)
    assert await queue.enqueue("q", b"x")
    await queue.close()


async def test_a_claim_on_a_closed_queue_raises_even_when_the_queue_is_known_empty(queue: Queue) -> None:
    job = await queue.enqueue("q", b"x")
    assert (await queue.claim("q")).id == job  # drained: known to be empty
    await queue.close()
    with pytest.raises(StoreClosed):
        await queue.claim("q")


async def test_the_worker_logs_each_ack_at_info(queue: Queue, caplog: pytest.LogCaptureFixture) -> None:
    # ``taquba -v worker`` shows every attempt: failures as warnings, acks at INFO.
    caplog.set_level(logging.INFO, logger="taquba")
    job_id = await queue.enqueue("q", b"x")
    stop = asyncio.Event()

    async def handler(job):
        stop.set()

    await run_worker_concurrent(queue, "q", handler, concurrency=1, poll_interval=0.05, shutdown=stop)
    acks = [r.getMessage() for r in caplog.records if r.name == "taquba.worker" and r.levelno == logging.INFO]
    assert acks == [f"job {job_id} of 'q' acked (attempt 1/3)"]


async def test_stats_of_a_closed_queue_raise_as_every_read_does(queue: Queue) -> None:
    await queue.enqueue("q", b"x")
    assert (await queue.stats("q")).pending == 1  # counters cached in process
    await queue.close()
    with pytest.raises(StoreClosed):
        await queue.stats("q")
    with pytest.raises(StoreClosed):
        await queue.list_queues()


@pytest.mark.parametrize("url", ["inmemory://", "memory://"])
async def test_closing_during_background_sweeps_logs_no_error(url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A sweep that finds its queue closing stops quietly: a shutdown is not a failure."""
    from taquba_backends import open_store

    caplog.set_level(logging.WARNING, logger="taquba")
    for i in range(40):
        queue = await Queue.open(await open_store(url), promote_interval=0.001, reap_interval=0.001)
        await queue.enqueue_with("q", b"x", delay=0.001)
        for _ in range(i % 7):
            await asyncio.sleep(0.0005)
        await queue.close()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
