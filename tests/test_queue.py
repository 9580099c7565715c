"""Queue behaviour, run against every store kind through the ``queue`` fixture."""

from __future__ import annotations

import asyncio
import random
from datetime import datetime, timedelta, timezone

import pytest

from queue_helpers import check_invariants, dump_store, space_keys
from taquba_backends import open_store
from taquba_core import (
    AckWith,
    ClaimLost,
    InvalidArgument,
    InvalidQueueName,
    JobStatus,
    KvValueTooLarge,
    ManualClock,
    PermanentFailure,
    Queue,
    QueueConfig,
    run_worker,
    run_worker_concurrent,
)
from taquba_core import keys

ZERO_BACKOFF = QueueConfig(backoff_base=0)


def ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


async def stats_tuple(queue: Queue, name: str) -> tuple[int, int, int, int, int]:
    s = await queue.stats(name)
    return (s.pending, s.scheduled, s.claimed, s.done, s.dead)


# -- lifecycle -----------------------------------------------------------------


async def test_enqueue_claim_ack_lifecycle(queue: Queue, clock: ManualClock) -> None:
    assert await stats_tuple(queue, "q") == (0, 0, 0, 0, 0)
    job_id = await queue.enqueue("q", b"hello")
    assert await stats_tuple(queue, "q") == (1, 0, 0, 0, 0)

    pending = await queue.get_job(job_id)
    assert pending is not None
    assert pending.status is JobStatus.PENDING
    assert pending.payload == b"hello" and pending.queue == "q" and pending.attempts == 0
    assert pending.enqueued_at == clock.now_ms()

    clock.advance(5)
    job = await queue.claim("q", lease=10)
    assert job is not None and job.id == job_id
    assert job.status is JobStatus.CLAIMED
    assert job.attempts == 1
    assert job.claimed_at == clock.now_ms()
    assert job.lease_expires_at == clock.now_ms() + 10_000
    assert await stats_tuple(queue, "q") == (0, 0, 1, 0, 0)
    assert await queue.claim("q") is None

    await queue.ack(job)
    assert await stats_tuple(queue, "q") == (0, 0, 0, 1, 0)
    assert await queue.get_job(job_id) is None  # done jobs are not kept by default
    dump = await check_invariants(queue.store)
    assert not space_keys(dump, keys.JOBINDEX)


async def test_keep_done_jobs_keeps_record_until_retention(make_queue) -> None:
    queue = await make_queue(config=QueueConfig(keep_done_jobs=60))
    clock = queue.clock
    job_id = await queue.enqueue("q", b"x")
    job = await queue.claim("q")
    await queue.ack(job)
    done = await queue.get_job(job_id)
    assert done is not None and done.status is JobStatus.DONE and done.completed_at == clock.now_ms()
    await check_invariants(queue.store)
    clock.advance(59_000)
    await queue.reap_now()
    assert await queue.get_job(job_id) is not None
    clock.advance(1_000)
    await queue.reap_now()
    assert await queue.get_job(job_id) is None
    assert (await queue.stats("q")).done == 1
    await check_invariants(queue.store)


# -- ordering ------------------------------------------------------------------


async def test_priority_then_fifo(queue: Queue) -> None:
    plan = [(5, b"a"), (1, b"b"), (5, b"c"), (0, b"d"), (1, b"e"), (2**32 - 1, b"f"), (0, b"g")]
    for prio, payload in plan:
        await queue.enqueue_with("q", payload, priority=prio)
    expected = [p for _, p in sorted(enumerate(plan), key=lambda t: (t[1][0], t[0]))]
    got = []
    while (job := await queue.claim("q")) is not None:
        got.append(job)
    assert [j.payload for j in got] == [p for _, p in expected]


async def test_fifo_within_one_millisecond(queue: Queue) -> None:
    # The manual clock never moves: all 300 jobs share one millisecond.
    rng = random.Random(7)
    prios = [rng.choice([10, 20, 30]) for _ in range(300)]
    for i, prio in enumerate(prios):
        await queue.enqueue_with("q", b"%d" % i, priority=prio)
    expected = sorted(range(300), key=lambda i: (prios[i], i))
    got = [int(j.payload) for j in await queue.claim_batch("q", 1000)]
    assert got == expected


async def test_queues_are_isolated_and_prefix_safe(queue: Queue) -> None:
    names = ["a", "ab", "a b", "a!", "b"]
    for name in names:
        await queue.enqueue(name, name.encode())
    with pytest.raises(InvalidQueueName):
        await queue.enqueue("a:b", b"x")
    for name in names:
        assert await stats_tuple(queue, name) == (1, 0, 0, 0, 0)
    for name in names:
        jobs = await queue.claim_batch(name, 10)
        assert [j.payload for j in jobs] == [name.encode()]
        assert await queue.claim(name) is None
    assert await queue.list_queues() == sorted(names)


async def test_isolation_of_dead_and_time_spaces(queue: Queue, clock: ManualClock) -> None:
    # Same operations on "a" and "ab": nothing of one shows up in the other.
    for name in ["a", "ab"]:
        await queue.enqueue_with(name, name.encode(), max_attempts=1)
        await queue.enqueue_with(name, name.encode(), delay=5)
        job = await queue.claim(name)
        await queue.nack(job, "x")
    clock.advance(5_000)
    assert await queue.promote_now() == 2
    a = await queue.claim_batch("a", 10)
    assert [j.queue for j in a] == ["a"]
    assert await stats_tuple(queue, "a") == (0, 0, 1, 0, 1)
    assert await stats_tuple(queue, "ab") == (1, 0, 0, 0, 1)
    await check_invariants(queue.store)


# -- scheduling ---------------------------------------------------------------


async def test_delay_schedules_until_promoted(queue: Queue, clock: ManualClock) -> None:
    start = clock.now_ms()
    res = await queue.enqueue_with("q", b"later", delay=10)
    job = await queue.get_job(res.id)
    assert job.status is JobStatus.SCHEDULED and job.run_at == start + 10_000
    assert await stats_tuple(queue, "q") == (0, 1, 0, 0, 0)
    assert await queue.claim("q") is None
    assert await queue.promote_now() == 0
    clock.advance(9_999)
    assert await queue.promote_now() == 0
    assert await queue.claim("q") is None
    clock.advance(1)
    assert await queue.promote_now() == 1
    assert await stats_tuple(queue, "q") == (1, 0, 0, 0, 0)
    claimed = await queue.claim("q")
    assert claimed is not None and claimed.id == res.id and claimed.run_at is None
    await check_invariants(queue.store)


async def test_run_at_datetime(queue: Queue, clock: ManualClock) -> None:
    now = datetime.fromtimestamp(clock.now_ms() / 1000, tz=timezone.utc)
    later = now + timedelta(seconds=3)
    other_tz = (now + timedelta(seconds=6)).astimezone(timezone(timedelta(hours=5)))
    r1 = await queue.enqueue_with("q", b"1", run_at=later)
    r2 = await queue.enqueue_with("q", b"2", run_at=other_tz)
    r3 = await queue.enqueue_with("q", b"3", run_at=now - timedelta(seconds=1))  # past: pending at once
    r4 = await queue.enqueue_with("q", b"4", delay=0)  # zero delay: pending at once
    assert (await queue.get_job(r1.id)).run_at == ms(later)
    assert (await queue.get_job(r2.id)).run_at == ms(other_tz)
    assert (await queue.get_job(r3.id)).status is JobStatus.PENDING
    assert (await queue.get_job(r4.id)).status is JobStatus.PENDING
    assert [j.payload for j in await queue.claim_batch("q", 10)] == [b"3", b"4"]
    clock.set(ms(later))
    assert await queue.promote_now() == 1
    clock.set(ms(other_tz))
    assert await queue.promote_now() == 1
    assert [j.payload for j in await queue.claim_batch("q", 10)] == [b"1", b"2"]


async def test_promotion_keeps_priority_order(queue: Queue, clock: ManualClock) -> None:
    await queue.enqueue_with("q", b"low", priority=9, delay=1)
    await queue.enqueue_with("q", b"high", priority=1, delay=2)
    await queue.enqueue_with("q", b"mid", priority=5)
    clock.advance(2_000)
    assert await queue.promote_now() == 2
    assert [j.payload for j in await queue.claim_batch("q", 10)] == [b"high", b"mid", b"low"]


async def test_promote_more_than_one_sweep_batch(queue: Queue, clock: ManualClock) -> None:
    from taquba_core.queue import SWEEP_BATCH

    n = SWEEP_BATCH * 2 + 3
    await queue.enqueue_batch("q", [b"%d" % i for i in range(n)], delay=1)
    clock.advance(1_000)
    assert await queue.promote_now() == n
    assert (await queue.stats("q")).pending == n
    await check_invariants(queue.store)


# -- nack and backoff ----------------------------------------------------------


async def test_nack_backoff_doubles_up_to_max(make_queue) -> None:
    queue = await make_queue(config=QueueConfig(backoff_base=2, backoff_max=5, max_attempts=5))
    clock = queue.clock
    job_id = await queue.enqueue("q", b"x")
    for attempt, expected_delay in [(1, 2_000), (2, 4_000), (3, 5_000), (4, 5_000)]:
        job = await queue.claim("q")
        assert job is not None and job.id == job_id and job.attempts == attempt
        now = clock.now_ms()
        new = await queue.nack(job, f"boom {attempt}")
        assert new.status is JobStatus.SCHEDULED
        assert new.run_at == now + expected_delay
        assert new.last_error == f"boom {attempt}"
        stored = await queue.get_job(job_id)
        assert stored.status is JobStatus.SCHEDULED and stored.run_at == new.run_at
        assert await stats_tuple(queue, "q") == (0, 1, 0, 0, 0)
        clock.advance(expected_delay - 1)
        assert await queue.promote_now() == 0
        assert await queue.claim("q") is None
        clock.advance(1)
        assert await queue.promote_now() == 1
    job = await queue.claim("q")
    assert job.attempts == 5
    dead = await queue.nack(job, "last")
    assert dead.status is JobStatus.DEAD and dead.last_error == "last" and dead.attempts == 5
    assert await stats_tuple(queue, "q") == (0, 0, 0, 0, 1)
    await check_invariants(queue.store)


async def test_nack_with_zero_backoff_goes_straight_to_pending(make_queue) -> None:
    queue = await make_queue(config=ZERO_BACKOFF)
    job_id = await queue.enqueue("q", b"x")
    job = await queue.claim("q")
    new = await queue.nack(job, "oops")
    assert new.status is JobStatus.PENDING and new.run_at is None and new.last_error == "oops"
    assert await stats_tuple(queue, "q") == (1, 0, 0, 0, 0)
    again = await queue.claim("q")
    assert again.id == job_id and again.attempts == 2 and again.last_error == "oops"


async def test_per_queue_config_overrides_default(make_queue) -> None:
    queue = await make_queue(config=QueueConfig(backoff_base=10), queues={"fast": ZERO_BACKOFF})
    await queue.enqueue("fast", b"x")
    await queue.enqueue("slow", b"y")
    assert (await queue.nack(await queue.claim("fast"), "e")).status is JobStatus.PENDING
    assert (await queue.nack(await queue.claim("slow"), "e")).status is JobStatus.SCHEDULED


async def test_nack_at_max_attempts_is_dead(queue: Queue, clock: ManualClock) -> None:
    res = await queue.enqueue_with("q", b"x", max_attempts=1)
    job = await queue.claim("q")
    dead = await queue.nack(job, "fatal error")
    assert dead.status is JobStatus.DEAD
    assert dead.last_error == "fatal error" and dead.failed_at == clock.now_ms() and dead.attempts == 1
    stored = await queue.get_job(res.id)
    assert stored.status is JobStatus.DEAD and stored.last_error == "fatal error"
    assert await stats_tuple(queue, "q") == (0, 0, 0, 0, 1)
    assert await queue.claim("q") is None
    await check_invariants(queue.store)


async def test_error_text_that_utf8_cannot_store_is_escaped(queue: Queue) -> None:
    # e.g. an OSError naming a file whose name was decoded with surrogateescape
    res = await queue.enqueue_with("q", b"x", max_attempts=2)
    retried = await queue.nack(await queue.claim("q"), "cannot open b'\udcff'")
    assert retried.last_error == "cannot open b'\\udcff'"
    queue.clock.advance(3_600_000)
    await queue.promote_now()
    dead = await queue.dead_letter(await queue.claim("q"), "\ud800")
    assert dead.last_error == "\\ud800"
    assert (await queue.get_job(res.id)).last_error == "\\ud800"
    await check_invariants(queue.store)


async def test_dead_letter_consumes_no_extra_attempt(queue: Queue) -> None:
    res = await queue.enqueue_with("q", b"x", max_attempts=3)
    job = await queue.claim("q")
    dead = await queue.dead_letter(job, "permanent")
    assert dead.status is JobStatus.DEAD and dead.attempts == 1 and dead.last_error == "permanent"
    assert (await queue.get_job(res.id)).attempts == 1
    assert await stats_tuple(queue, "q") == (0, 0, 0, 0, 1)
    await check_invariants(queue.store)


# -- leases and ClaimLost ------------------------------------------------------


async def test_renew_lease_updates_job_in_place(queue: Queue, clock: ManualClock) -> None:
    await queue.enqueue("q", b"x")
    job = await queue.claim("q", lease=10)
    original = job.lease_expires_at
    clock.advance(5_000)
    new_expiry = await queue.renew_lease(job, 20)
    assert new_expiry == clock.now_ms() + 20_000
    assert job.lease_expires_at == new_expiry and new_expiry > original
    clock.advance(15_000)  # past the original lease, inside the renewed one
    assert await queue.reap_now() == 0
    assert (await queue.get_job(job.id)).lease_expires_at == new_expiry
    await queue.ack(job)
    assert await stats_tuple(queue, "q") == (0, 0, 0, 1, 0)
    await check_invariants(queue.store)


async def _assert_all_settlements_lost(queue: Queue, job) -> None:
    before_dump = await dump_store(queue.store)
    before_stats = await stats_tuple(queue, job.queue)
    with pytest.raises(ClaimLost):
        await queue.ack(job, kv_writes={b"side-effect": b"1"})
    with pytest.raises(ClaimLost):
        await queue.nack(job, "e")
    with pytest.raises(ClaimLost):
        await queue.dead_letter(job, "e")
    with pytest.raises(ClaimLost):
        await queue.renew_lease(job, 5)
    assert await dump_store(queue.store) == before_dump
    assert await stats_tuple(queue, job.queue) == before_stats
    assert await queue.kv_get(b"side-effect") is None


async def test_ack_after_reap_is_claim_lost_and_changes_nothing(queue: Queue, clock: ManualClock) -> None:
    await queue.enqueue("q", b"x")
    job = await queue.claim("q", lease=1)
    clock.advance(1_001)
    assert await queue.reap_now() == 1
    await _assert_all_settlements_lost(queue, job)
    assert await stats_tuple(queue, "q") == (1, 0, 0, 0, 0)


async def test_ack_twice_is_claim_lost(queue: Queue) -> None:
    await queue.enqueue("q", b"x")
    job = await queue.claim("q")
    await queue.ack(job)
    await _assert_all_settlements_lost(queue, job)
    assert await stats_tuple(queue, "q") == (0, 0, 0, 1, 0)


async def test_stale_copy_after_reclaim_is_claim_lost(queue: Queue, clock: ManualClock) -> None:
    await queue.enqueue("q", b"x")
    first = await queue.claim("q", lease=1)
    clock.advance(2_000)
    await queue.reap_now()
    second = await queue.claim("q", lease=1)
    assert second.id == first.id and second.attempts == 2
    await _assert_all_settlements_lost(queue, first)
    await queue.ack(second)
    assert await stats_tuple(queue, "q") == (0, 0, 0, 1, 0)


async def test_stale_copy_with_identical_lease_expiry_is_claim_lost(make_queue) -> None:
    # The re-claim ends at the very same millisecond, so its key is the stale
    # copy's key: only the attempt number tells them apart.
    queue = await make_queue(config=ZERO_BACKOFF)
    clock = queue.clock
    await queue.enqueue("q", b"x")
    first = await queue.claim("q", lease=30)
    await queue.nack(first, "retry")
    clock.advance(10_000)
    second = await queue.claim("q", lease=20)
    assert second.lease_expires_at == first.lease_expires_at and second.attempts == 2
    await _assert_all_settlements_lost(queue, first)
    await queue.ack(second)


async def test_settling_a_never_claimed_record_is_claim_lost(queue: Queue) -> None:
    res = await queue.enqueue_with("q", b"x")
    pending = await queue.get_job(res.id)
    await _assert_all_settlements_lost(queue, pending)


async def test_reaper_requeues_expired_claim(queue: Queue, clock: ManualClock) -> None:
    await queue.enqueue("q", b"x")
    job = await queue.claim("q", lease=5)
    clock.advance(4_999)
    assert await queue.reap_now() == 0
    assert await stats_tuple(queue, "q") == (0, 0, 1, 0, 0)
    clock.advance(2)
    assert await queue.reap_now() == 1
    assert await stats_tuple(queue, "q") == (1, 0, 0, 0, 0)
    requeued = await queue.get_job(job.id)
    assert requeued.status is JobStatus.PENDING and requeued.attempts == 1
    assert requeued.lease_expires_at is None and "lease" in requeued.last_error
    again = await queue.claim("q")
    assert again.id == job.id and again.attempts == 2
    await check_invariants(queue.store)


async def test_reaper_dead_letters_at_max_attempts(queue: Queue, clock: ManualClock) -> None:
    res = await queue.enqueue_with("q", b"x", max_attempts=1)
    await queue.claim("q", lease=5)
    clock.advance(6_000)
    assert await queue.reap_now() == 1
    dead = await queue.get_job(res.id)
    assert dead.status is JobStatus.DEAD and dead.attempts == 1 and dead.last_error
    assert await stats_tuple(queue, "q") == (0, 0, 0, 0, 1)
    await check_invariants(queue.store)


async def test_dead_letters_removed_after_retention(make_queue) -> None:
    queue = await make_queue(config=QueueConfig(dead_retention=60))
    res = await queue.enqueue_with("q", b"x", max_attempts=1)
    await queue.nack(await queue.claim("q"), "e")
    queue.clock.advance(59_999)
    await queue.reap_now()
    assert (await queue.get_job(res.id)).status is JobStatus.DEAD
    queue.clock.advance(1)
    await queue.reap_now()
    assert await queue.get_job(res.id) is None
    assert (await queue.stats("q")).dead == 0
    await check_invariants(queue.store)


async def test_recovery_at_open_requeues_claims(tmp_path) -> None:
    url = f"file://{tmp_path}"
    clock = ManualClock()
    queue = await Queue.open(await open_store(url), clock=clock, background=False)
    retry = await queue.enqueue_with("q", b"retry", max_attempts=2)
    last = await queue.enqueue_with("q", b"last", max_attempts=1)
    untouched = await queue.enqueue_with("q", b"untouched")
    claimed = await queue.claim_batch("q", 2, lease=3600)
    assert {j.id for j in claimed} == {retry.id, last.id}
    await queue.close()

    queue = await Queue.open(await open_store(url), clock=clock, background=False)
    try:
        job = await queue.get_job(retry.id)
        assert job.status is JobStatus.PENDING and job.attempts == 1 and job.last_error
        dead = await queue.get_job(last.id)
        assert dead.status is JobStatus.DEAD and dead.attempts == 1
        assert (await queue.get_job(untouched.id)).status is JobStatus.PENDING
        assert await stats_tuple(queue, "q") == (2, 0, 0, 0, 1)
        await check_invariants(queue.store)
        assert [j.payload for j in await queue.claim_batch("q", 10)] == [b"retry", b"untouched"]
    finally:
        await queue.close()


# -- claim_with_wait -----------------------------------------------------------


async def test_claim_with_wait_returns_at_once_when_a_job_exists(queue: Queue) -> None:
    await queue.enqueue("q", b"x")
    loop = asyncio.get_running_loop()
    start = loop.time()
    job = await queue.claim_with_wait("q", max_wait=30)
    assert job is not None and job.payload == b"x"
    assert loop.time() - start < 15


async def _started_waiter(queue: Queue, name: str, max_wait: float = 30):
    task = asyncio.create_task(queue.claim_with_wait(name, max_wait=max_wait))
    for _ in range(20):  # let it reach its wait: several event-loop turns
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)
    assert not task.done()
    return task


async def test_claim_with_wait_is_woken_by_enqueue(queue: Queue) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    task = await _started_waiter(queue, "q")
    job_id = await queue.enqueue("q", b"x")
    job = await asyncio.wait_for(task, 20)
    assert job is not None and job.id == job_id
    assert loop.time() - start < 15


async def test_claim_with_wait_ignores_other_queues(queue: Queue) -> None:
    task = await _started_waiter(queue, "q", max_wait=0.3)
    await queue.enqueue("other", b"x")
    assert await asyncio.wait_for(task, 20) is None
    assert (await queue.stats("other")).pending == 1


async def test_claim_with_wait_is_woken_by_promotion_and_retry(make_queue) -> None:
    queue = await make_queue(config=ZERO_BACKOFF)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await queue.enqueue_with("q", b"x", delay=1)
    task = await _started_waiter(queue, "q")
    queue.clock.advance(1_000)
    await queue.promote_now()
    job = await asyncio.wait_for(task, 20)
    assert job is not None and job.payload == b"x"
    task = await _started_waiter(queue, "q")
    await queue.nack(job, "again")
    job2 = await asyncio.wait_for(task, 20)
    assert job2 is not None and job2.attempts == 2
    assert loop.time() - start < 15


async def test_claim_with_wait_times_out_with_none(queue: Queue) -> None:
    assert await queue.claim_with_wait("q", max_wait=0.05) is None
    assert await queue.claim_with_wait("q", max_wait=0) is None


async def test_claim_with_wait_returns_none_when_queue_closes(queue: Queue) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    task = await _started_waiter(queue, "q")
    await queue.close()
    assert await asyncio.wait_for(task, 20) is None
    assert loop.time() - start < 15


# -- batches -------------------------------------------------------------------


async def test_claim_batch(queue: Queue, clock: ManualClock) -> None:
    ids = [await queue.enqueue("q", b"%d" % i) for i in range(5)]
    first = await queue.claim_batch("q", 3, lease=7)
    assert [j.id for j in first] == ids[:3]
    assert all(j.attempts == 1 and j.lease_expires_at == clock.now_ms() + 7_000 for j in first)
    rest = await queue.claim_batch("q", 10)
    assert [j.id for j in rest] == ids[3:]
    assert await queue.claim_batch("q", 10) == []
    assert await stats_tuple(queue, "q") == (0, 0, 5, 0, 0)
    for job in first + rest:
        await queue.ack(job)
    assert await stats_tuple(queue, "q") == (0, 0, 0, 5, 0)
    await check_invariants(queue.store)


async def test_enqueue_batch_ids_ascend_and_claim_in_input_order(queue: Queue) -> None:
    payloads = [b"%03d" % i for i in range(150)]
    random.Random(3).shuffle(payloads)
    ids = await queue.enqueue_batch("q", payloads, kv_writes={b"marker": b"1"})
    assert len(ids) == len(set(ids)) == 150
    assert ids == sorted(ids)
    assert await queue.kv_get(b"marker") == b"1"
    claimed = await queue.claim_batch("q", 1000)
    assert [j.payload for j in claimed] == payloads
    assert [j.id for j in claimed] == ids


async def test_enqueue_batch_options(queue: Queue) -> None:
    await queue.enqueue("q", b"normal")
    await queue.enqueue_batch("q", [b"h1", b"h2"], priority=1, headers={"k": "v"}, max_attempts=7)
    jobs = await queue.claim_batch("q", 10)
    assert [j.payload for j in jobs] == [b"h1", b"h2", b"normal"]
    assert jobs[0].headers == {"k": "v"} and jobs[0].max_attempts == 7


async def test_enqueue_batch_is_all_or_nothing(queue: Queue) -> None:
    await queue.enqueue("q", b"existing")
    before = await dump_store(queue.store)
    with pytest.raises(InvalidArgument, match="'bad'"):
        await queue.enqueue_batch("q", [b"a", "bad", b"c"], kv_writes={b"marker": b"1"})
    with pytest.raises(KvValueTooLarge):
        await queue.enqueue_batch("q", [b"a", b"b"], kv_writes={b"marker": b"x" * (256 * 1024 + 1)})
    with pytest.raises(InvalidArgument):
        await queue.enqueue_batch("q", [b"a"], dedup_key="k")
    assert await dump_store(queue.store) == before
    assert await stats_tuple(queue, "q") == (1, 0, 0, 0, 0)


# -- reads ---------------------------------------------------------------------


async def test_get_job(queue: Queue, clock: ManualClock) -> None:
    assert await queue.get_job("01ARZ3NDEKTSV4RRFFQ69G5FAV") is None
    res = await queue.enqueue_with("q", b"p", priority=3, max_attempts=4)
    job = await queue.get_job(res.id)
    assert (job.id, job.queue, job.payload, job.priority, job.max_attempts) == (res.id, "q", b"p", 3, 4)
    assert job.status is JobStatus.PENDING and job.enqueued_at == clock.now_ms()
    with pytest.raises(InvalidArgument):
        await queue.get_job(123)  # type: ignore[arg-type]


async def test_stats_and_list_queues(queue: Queue, clock: ManualClock) -> None:
    assert await queue.list_queues() == []
    await queue.enqueue("emails", b"1")
    await queue.enqueue("emails", b"2")
    await queue.enqueue_with("emails", b"3", delay=5)
    await queue.enqueue_with("reports", b"4", max_attempts=1)
    await queue.ack(await queue.claim("emails"))
    await queue.claim("emails")
    await queue.nack(await queue.claim("reports"), "e")
    assert await queue.list_queues() == ["emails", "reports"]
    s = await queue.stats("emails")
    assert (s.queue, s.pending, s.scheduled, s.claimed, s.done, s.dead) == ("emails", 0, 1, 1, 1, 0)
    assert await stats_tuple(queue, "reports") == (0, 0, 0, 0, 1)
    assert await stats_tuple(queue, "never-used") == (0, 0, 0, 0, 0)
    await check_invariants(queue.store)


# -- caller KV namespace -------------------------------------------------------


async def test_kv_get_put_delete(queue: Queue) -> None:
    assert await queue.kv_get(b"k") is None
    await queue.kv_put(b"k", b"v1")
    assert await queue.kv_get(b"k") == b"v1"
    await queue.kv_put(b"k", b"v2")
    assert await queue.kv_get(b"k") == b"v2"
    await queue.kv_put(b"", b"empty key")
    await queue.kv_put(b"\x00\xff", b"")
    assert await queue.kv_get(b"") == b"empty key"
    assert await queue.kv_get(b"\x00\xff") == b""
    await queue.kv_delete(b"k")
    await queue.kv_delete(b"never-there")
    assert await queue.kv_get(b"k") is None


async def test_kv_is_separate_from_queue_keys(queue: Queue) -> None:
    await queue.enqueue("q", b"x")
    page, cursor = await queue.kv_scan()
    assert page == [] and cursor is None
    assert await queue.kv_get(b"pending:") is None
    await queue.kv_put(b"pending:q:0000001000:x", b"user data")
    assert await queue.claim_batch("q", 10) != []
    assert await queue.claim("q") is None
    assert await queue.kv_get(b"pending:q:0000001000:x") == b"user data"


async def test_kv_scan_paging(queue: Queue) -> None:
    want = {b"p/%02d" % i: b"v%d" % i for i in range(25)}
    for key, value in want.items():
        await queue.kv_put(key, value)
    await queue.kv_put(b"o/before", b"x")
    await queue.kv_put(b"q/after", b"x")
    await queue.kv_put(b"p\xff", b"not under p/")

    pages = []
    cursor = None
    while True:
        page, cursor = await queue.kv_scan(b"p/", cursor, limit=10)
        pages.append(page)
        if cursor is None:
            break
    assert [len(p) for p in pages] == [10, 10, 5]
    assert [kv for p in pages for kv in p] == sorted(want.items())

    everything, cursor = await queue.kv_scan(limit=1000)
    assert cursor is None
    assert [k for k, _ in everything] == sorted([*want, b"o/before", b"q/after", b"p\xff"])
    with pytest.raises(InvalidArgument):
        await queue.kv_scan(b"", limit=0)


# -- headers and dedup ---------------------------------------------------------


async def test_headers_round_trip(queue: Queue) -> None:
    headers = {"trace-id": "abc", "unicode": "héllo ✓", "empty": ""}
    res = await queue.enqueue_with("q", b"x", headers=headers)
    assert (await queue.get_job(res.id)).headers == headers
    job = await queue.claim("q")
    assert job.headers == headers
    plain = await queue.enqueue("q", b"y")
    assert (await queue.get_job(plain)).headers == {}
    with pytest.raises(InvalidArgument):
        await queue.enqueue_with("q", b"x", headers={"k": 1})  # type: ignore[dict-item]


async def test_dedup_key(queue: Queue, clock: ManualClock) -> None:
    first = await queue.enqueue_with("q", b"1", dedup_key="k")
    assert first.created
    second = await queue.enqueue_with("q", b"2", dedup_key="k", kv_writes={b"side": b"1"})
    assert second.id == first.id and not second.created
    assert await queue.kv_get(b"side") is None  # no writes on a dedup hit
    other_queue = await queue.enqueue_with("r", b"3", dedup_key="k")
    assert other_queue.created and other_queue.id != first.id
    assert await stats_tuple(queue, "q") == (1, 0, 0, 0, 0)
    await check_invariants(queue.store)

    job = await queue.claim("q")
    assert job.id == first.id and job.payload == b"1"
    third = await queue.enqueue_with("q", b"4", dedup_key="k")
    assert third.created and third.id != first.id
    # the first job's later retry must not release the new holder's key
    await queue.nack(job, "e")
    again = await queue.enqueue_with("q", b"5", dedup_key="k")
    assert again.id == third.id and not again.created
    await check_invariants(queue.store)


async def test_dedup_key_held_by_scheduled_job(queue: Queue, clock: ManualClock) -> None:
    first = await queue.enqueue_with("q", b"1", dedup_key="k", delay=10)
    second = await queue.enqueue_with("q", b"2", dedup_key="k")
    assert second.id == first.id and not second.created
    clock.advance(10_000)
    await queue.promote_now()
    assert (await queue.enqueue_with("q", b"3", dedup_key="k")).id == first.id
    await queue.claim("q")
    assert (await queue.enqueue_with("q", b"4", dedup_key="k")).created
    await check_invariants(queue.store)


async def test_concurrent_enqueues_with_one_dedup_key_create_one_job(queue: Queue) -> None:
    results = await asyncio.gather(*(queue.enqueue_with("q", b"%d" % i, dedup_key="once") for i in range(100)))
    assert len({r.id for r in results}) == 1
    assert sum(r.created for r in results) == 1
    assert await stats_tuple(queue, "q") == (1, 0, 0, 0, 0)
    dump = await check_invariants(queue.store)
    assert len(space_keys(dump, keys.PENDING)) == 1


async def test_concurrent_enqueues_and_claims_lose_nothing(queue: Queue) -> None:
    n = 200
    claimed = []

    async def claimer() -> None:
        while len(claimed) < n:
            job = await queue.claim_with_wait("q", max_wait=0.05)
            if job is not None:
                claimed.append(job)

    workers = [asyncio.create_task(claimer()) for _ in range(4)]
    await asyncio.gather(*(queue.enqueue("q", b"%d" % i) for i in range(n)))
    await asyncio.wait_for(asyncio.gather(*workers), 30)
    assert sorted(int(j.payload) for j in claimed) == list(range(n))
    assert await stats_tuple(queue, "q") == (0, 0, n, 0, 0)
    await check_invariants(queue.store)


# -- worker loops --------------------------------------------------------------


async def _run_until(worker_coro, done: asyncio.Event, shutdown: asyncio.Event, timeout: float = 20):
    task = asyncio.create_task(worker_coro)
    await asyncio.wait_for(done.wait(), timeout)
    shutdown.set()
    return await asyncio.wait_for(task, timeout)


async def test_worker_acks_nacks_and_dead_letters(make_queue) -> None:
    queue = await make_queue(config=QueueConfig(backoff_base=0, max_attempts=2))
    ok = await queue.enqueue("q", b"ok")
    fail = await queue.enqueue("q", b"fail")
    perm = await queue.enqueue("q", b"perm")
    calls: list[bytes] = []
    shutdown, all_called = asyncio.Event(), asyncio.Event()

    async def handler(job):
        calls.append(job.payload)
        if len(calls) == 4:  # ok, fail twice, perm
            all_called.set()
        if job.payload == b"fail":
            raise ValueError(f"attempt {job.attempts} failed")
        if job.payload == b"perm":
            raise PermanentFailure("cannot ever work")
        return "result"

    stats = await _run_until(
        run_worker_concurrent(queue, "q", handler, concurrency=3, poll_interval=0.05, shutdown=shutdown),
        all_called,
        shutdown,
    )
    assert sorted(calls) == [b"fail", b"fail", b"ok", b"perm"]
    assert (stats.acked, stats.nacked, stats.dead_lettered, stats.claims_lost) == (1, 1, 2, 0)  # the exhausted retry counts as a dead letter
    assert await stats_tuple(queue, "q") == (0, 0, 0, 1, 2)
    assert await queue.get_job(ok) is None
    failed = await queue.get_job(fail)
    assert failed.status is JobStatus.DEAD and failed.attempts == 2
    assert "ValueError" in failed.last_error and "attempt 2 failed" in failed.last_error
    permanent = await queue.get_job(perm)
    assert permanent.status is JobStatus.DEAD and permanent.attempts == 1
    assert "cannot ever work" in permanent.last_error
    await check_invariants(queue.store)


async def test_worker_settles_handler_errors_with_unencodable_text(make_queue) -> None:
    queue = await make_queue(config=QueueConfig(max_attempts=1))
    res = await queue.enqueue_with("q", b"x")
    shutdown, called = asyncio.Event(), asyncio.Event()

    async def handler(job):
        called.set()
        raise OSError("no such file: " + b"caf\xe9".decode("utf-8", "surrogateescape"))

    stats = await _run_until(
        run_worker(queue, "q", handler, poll_interval=0.05, shutdown=shutdown), called, shutdown
    )
    assert (stats.dead_lettered, stats.errors) == (1, [])  # max_attempts=1: the nack dead-letters
    dead = await queue.get_job(res.id)
    assert dead.status is JobStatus.DEAD and "OSError" in dead.last_error and "\\udce9" in dead.last_error


async def test_worker_shutdown_settles_in_flight_jobs_and_claims_no_more(queue: Queue) -> None:
    for i in range(5):
        await queue.enqueue("q", b"%d" % i)
    release, three_started, shutdown = asyncio.Event(), asyncio.Event(), asyncio.Event()
    started: list[bytes] = []

    async def handler(job):
        started.append(job.payload)
        if len(started) == 3:
            three_started.set()
        await release.wait()

    task = asyncio.create_task(run_worker_concurrent(queue, "q", handler, concurrency=3, shutdown=shutdown))
    await asyncio.wait_for(three_started.wait(), 20)
    shutdown.set()
    for _ in range(20):
        await asyncio.sleep(0)
    assert not task.done()  # still waiting for the in-flight handlers
    release.set()
    stats = await asyncio.wait_for(task, 20)
    assert stats.acked == 3 and len(started) == 3
    assert await stats_tuple(queue, "q") == (2, 0, 0, 3, 0)
    await check_invariants(queue.store)


async def test_idle_worker_stops_promptly_on_shutdown(queue: Queue) -> None:
    shutdown = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def handler(job):
        return None

    task = asyncio.create_task(run_worker_concurrent(queue, "q", handler, poll_interval=30, shutdown=shutdown))
    for _ in range(20):
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)
    start = loop.time()
    shutdown.set()
    stats = await asyncio.wait_for(task, 40)
    assert stats.processed == 0
    assert loop.time() - start < 15  # woken by the shutdown, not by the 30 s poll interval


async def test_worker_returns_when_queue_closes(queue: Queue) -> None:
    async def handler(job):
        return None

    task = asyncio.create_task(run_worker(queue, "q", handler, poll_interval=30))
    for _ in range(20):
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)
    await queue.close()
    stats = await asyncio.wait_for(task, 40)
    assert stats.processed == 0


async def test_worker_with_sync_handler_and_ack_with(queue: Queue) -> None:
    ids = await queue.enqueue_batch("q", [b"a", b"b", b"c"])
    shutdown, finished = asyncio.Event(), asyncio.Event()
    seen: list[str] = []

    def handler(job):  # plain function: runs in a thread
        seen.append(job.id)
        if len(seen) == 3:
            loop.call_soon_threadsafe(finished.set)
        return AckWith(kv_writes={b"result/" + job.payload: job.payload.upper(), b"gone": None})

    loop = asyncio.get_running_loop()
    await queue.kv_put(b"gone", b"x")
    stats = await _run_until(
        run_worker(queue, "q", handler, poll_interval=0.05, shutdown=shutdown), finished, shutdown
    )
    assert stats.acked == 3 and sorted(seen) == sorted(ids)
    for p in (b"a", b"b", b"c"):
        assert await queue.kv_get(b"result/" + p) == p.upper()
    assert await queue.kv_get(b"gone") is None
    assert await stats_tuple(queue, "q") == (0, 0, 0, 3, 0)


async def test_ack_with_kv_writes_is_atomic_with_the_ack(queue: Queue, clock: ManualClock) -> None:
    await queue.enqueue("q", b"x")
    job = await queue.claim("q", lease=1)
    clock.advance(2_000)
    await queue.reap_now()
    with pytest.raises(ClaimLost):
        await queue.ack(job, kv_writes={b"result": b"1"})
    assert await queue.kv_get(b"result") is None
    job = await queue.claim("q")
    await queue.ack(job, kv_writes={b"result": b"2"})
    assert await queue.kv_get(b"result") == b"2"
