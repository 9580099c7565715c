"""Garbage bytes planted under internal keys.

Behaviour (see docs/testing.md): reading a corrupt record raises the typed
``CorruptRecord`` naming the key.  A claim, promotion, reaping, recovery or
retention sweep that meets an undecodable record moves it aside to
``quarantine:{key}`` (logging the key once), takes its index entry, dedup
entry and count with it, and goes on with the other jobs: a corrupt record
never wedges the head of a queue, stops a sweep, or makes anything loop.  A
dedup entry that holds no live job's id is taken over by the next enqueue
with that key.  A corrupt counter is reported (``CorruptRecord`` naming the
key) when the queue opens.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import msgpack
import pytest
from model import check_dump, dump_store

from taquba_backends import MemoryStore
from taquba_core import (
    AckWith,
    CorruptRecord,
    JobStatus,
    KVStore,
    ManualClock,
    Queue,
    QueueConfig,
    keys,
    run_worker_concurrent,
)

GARBAGE = [
    pytest.param(b"\xc1\xff not msgpack", id="not-msgpack"),
    pytest.param(b"", id="empty"),
    pytest.param(msgpack.packb([1, 2, 3]), id="msgpack-array"),
    pytest.param(msgpack.packb({"id": "x"}), id="missing-fields"),
    pytest.param(
        msgpack.packb({"id": 5, "queue": "q", "payload": "str", "status": "Pending", "max_attempts": 1,
                       "enqueued_at": 0, "priority": 0}),
        id="wrong-types",
    ),
    pytest.param(
        msgpack.packb({"id": "x", "queue": "q", "payload": b"", "status": "Lost", "max_attempts": 1,
                       "enqueued_at": 0, "priority": 0}),
        id="unknown-status",
    ),
]

MakeQueue = Callable[..., Awaitable[Queue]]


async def plant(store: KVStore, key: bytes, value: bytes) -> None:
    """Write raw bytes under ``key``, behind the queue's back."""
    txn = await store.begin()
    await txn.put(key, value)
    await txn.commit()


async def key_of(queue: Queue, job_id: str) -> bytes:
    txn = await queue.store.begin()
    try:
        key = await txn.get(keys.jobindex_key(job_id))
    finally:
        await txn.rollback()
    assert key is not None
    return key


def errors_naming(caplog: pytest.LogCaptureFixture, key: bytes) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR and repr(key) in r.getMessage()]


async def stats_match_store(queue: Queue, name: str = "q") -> None:
    from taquba_core.kv import decode_counter

    dump = await dump_store(queue.store)
    s = await queue.stats(name)
    raw = tuple(decode_counter(dump.get(keys.stats_key(name, m))) for m in ("pending", "scheduled", "claimed", "done", "dead"))
    assert (s.pending, s.scheduled, s.claimed, s.done, s.dead) == raw


# -- pending: the head of a queue ----------------------------------------------------


@pytest.mark.parametrize("garbage", GARBAGE)
async def test_corrupt_record_at_the_head_is_moved_aside_and_claims_go_on(
    make_queue: MakeQueue, garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    queue = await make_queue()
    head = (await queue.enqueue_with("q", b"head", priority=0, dedup_key="d")).id
    second = await queue.enqueue("q", b"second")
    third = await queue.enqueue("q", b"third")
    key = await key_of(queue, head)
    await plant(queue.store, key, garbage)

    with pytest.raises(CorruptRecord, match=repr(key).replace("\\", "\\\\")[:30]) as info:
        await queue.get_job(head)
    assert repr(key) in str(info.value) and info.value.is_permanent

    job = await queue.claim("q")
    assert job is not None and job.id == second  # not wedged behind the corrupt head
    assert len(errors_naming(caplog, key)) == 1
    dump = await dump_store(queue.store)
    assert dump[keys.QUARANTINE + key] == garbage
    assert key not in dump and keys.jobindex_key(head) not in dump and keys.dedup_key("q", "d") not in dump
    check_dump(dump)
    await stats_match_store(queue)
    assert await queue.get_job(head) is None

    assert (await queue.claim("q")).id == third
    assert await queue.claim("q") is None
    assert len(errors_naming(caplog, key)) == 1  # reported once, not on every claim
    assert (await queue.enqueue_with("q", b"again", dedup_key="d")).created  # the dedup key was released


async def test_garbage_under_keys_nobody_indexed(make_queue: MakeQueue, caplog: pytest.LogCaptureFixture) -> None:
    queue = await make_queue()
    real = await queue.enqueue("q", b"real")
    planted = [b"pending:q:0000000000:NOT-A-JOB", b"pending:q:garbage", b"pending:q:"]
    for key in planted:
        await plant(queue.store, key, b"\xc1junk")
    job = await queue.claim("q")
    assert job is not None and job.id == real
    assert await queue.claim("q") is None  # reaches pending:q:garbage, after the real job
    dump = await dump_store(queue.store)
    for key in planted:
        assert key not in dump and dump[keys.QUARANTINE + key] == b"\xc1junk"
        assert errors_naming(caplog, key)
    check_dump(dump)
    await stats_match_store(queue)  # nothing counted them, so nothing was uncounted


async def test_a_corrupt_head_does_not_make_waiting_claims_spin(
    make_queue: MakeQueue, caplog: pytest.LogCaptureFixture
) -> None:
    queue = await make_queue()
    only = await queue.enqueue("q", b"only")
    key = await key_of(queue, only)
    await plant(queue.store, key, b"\xc1")
    begins = 0
    original = queue.store.begin

    async def counting_begin():  # type: ignore[no-untyped-def]
        nonlocal begins
        begins += 1
        return await original()

    queue.store.begin = counting_begin  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await queue.claim_with_wait("q", max_wait=0.3) is None
    assert loop.time() - started >= 0.29
    assert begins <= 3, f"{begins} transactions for one wait: the claim loops"
    assert len(errors_naming(caplog, key)) == 1


async def test_worker_serves_every_other_job_past_a_corrupt_record(make_queue: MakeQueue) -> None:
    queue = await make_queue()
    ids = await queue.enqueue_batch("q", [b"%d" % i for i in range(20)])
    for job_id in ids[:3] + ids[10:11]:
        await plant(queue.store, await key_of(queue, job_id), b"\xc1")
    done: list[str] = []
    stop = asyncio.Event()

    async def handler(job):  # type: ignore[no-untyped-def]
        done.append(job.id)
        if len(done) == 16:
            stop.set()
        return AckWith({b"done/" + job.id.encode(): b"1"})

    await asyncio.wait_for(
        run_worker_concurrent(queue, "q", handler, concurrency=4, poll_interval=0.05, shutdown=stop), 10
    )
    assert sorted(done) == sorted(ids[3:10] + ids[11:])
    check_dump(await dump_store(queue.store))
    assert (await queue.stats("q")).pending == 0


# -- scheduled, claimed, done, dead ---------------------------------------------------


async def test_corrupt_scheduled_record_does_not_stop_promotion(
    make_queue: MakeQueue, caplog: pytest.LogCaptureFixture
) -> None:
    queue = await make_queue()
    bad = (await queue.enqueue_with("q", b"bad", delay=1, dedup_key="s")).id
    good = (await queue.enqueue_with("q", b"good", delay=1)).id
    key = await key_of(queue, bad)
    await plant(queue.store, key, b"\xc1")
    queue.clock.advance(1000)  # type: ignore[attr-defined]
    assert await queue.promote_now() == 1
    assert (await queue.get_job(good)).status is JobStatus.PENDING
    assert errors_naming(caplog, key)
    check_dump(await dump_store(queue.store))
    await stats_match_store(queue)


async def test_corrupt_claim_is_reported_to_its_settler_and_moved_aside_by_the_reaper(
    make_queue: MakeQueue, caplog: pytest.LogCaptureFixture
) -> None:
    queue = await make_queue()
    await queue.enqueue_batch("q", [b"bad", b"good"])
    bad, good = await queue.claim_batch("q", 2, lease=1)
    key = await key_of(queue, bad.id)
    await plant(queue.store, key, b"\xc1")
    with pytest.raises(CorruptRecord) as info:
        await queue.ack(bad)
    assert repr(key) in str(info.value)
    queue.clock.advance(1000)  # type: ignore[attr-defined]
    assert await queue.reap_now() == 1
    assert (await queue.get_job(good.id)).status is JobStatus.PENDING
    assert errors_naming(caplog, key)
    check_dump(await dump_store(queue.store))
    await stats_match_store(queue)


async def test_corrupt_claim_does_not_stop_recovery_at_open(caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock()
    queue = await Queue.open(MemoryStore(), clock=clock, background=False)
    await queue.enqueue_batch("q", [b"bad", b"good"])
    bad, good = await queue.claim_batch("q", 2, lease=60)
    key = await key_of(queue, bad.id)
    await queue.close()
    store = queue.store.reopen()  # type: ignore[attr-defined]
    await plant(store, key, b"\xc1")
    queue = await Queue.open(store, clock=clock, background=False)  # recovery meets the corrupt claim
    async with queue:
        assert (await queue.get_job(good.id)).status is JobStatus.PENDING
        assert errors_naming(caplog, key)
        dump = check_dump(await dump_store(queue.store))
        assert set(dump) == {good.id}
        await stats_match_store(queue)


async def test_corrupt_done_and_dead_records_do_not_stop_retention(
    make_queue: MakeQueue, caplog: pytest.LogCaptureFixture
) -> None:
    queue = await make_queue(config=QueueConfig(keep_done_jobs=1, dead_retention=1, max_attempts=1))
    await queue.enqueue_batch("q", [b"a", b"b", b"c", b"d"])
    a, b, c, d = await queue.claim_batch("q", 4)
    await queue.ack(a)
    await queue.ack(b)
    await queue.nack(c, "x")
    await queue.nack(d, "x")
    bad_done, bad_dead = await key_of(queue, a.id), await key_of(queue, c.id)
    await plant(queue.store, bad_done, b"\xc1")
    await plant(queue.store, bad_dead, b"\xc1")
    with pytest.raises(CorruptRecord, match="dead:q:"):
        await queue.dead_jobs("q")
    queue.clock.advance(1000)  # type: ignore[attr-defined]
    await queue.reap_now()
    dump = await dump_store(queue.store)
    assert check_dump(dump) == {}
    assert {k for k in dump if k.startswith(keys.QUARANTINE)} == {keys.QUARANTINE + bad_done, keys.QUARANTINE + bad_dead}
    s = await queue.stats("q")
    assert (s.done, s.dead) == (2, 0)  # both acknowledgements stay counted
    await stats_match_store(queue)
    assert errors_naming(caplog, bad_done) and errors_naming(caplog, bad_dead)


# -- index, dedup and counter entries -------------------------------------------------


async def test_corrupt_index_entry_is_reported_by_key_and_healed_by_the_next_move(make_queue: MakeQueue) -> None:
    queue = await make_queue()
    victim = await queue.enqueue("q", b"victim")
    await queue.enqueue("q", b"other")
    await plant(queue.store, keys.jobindex_key(victim), b"\xc1 nowhere")
    for call in (lambda: queue.get_job(victim), lambda: queue.cancel(victim)):
        with pytest.raises(CorruptRecord) as info:
            await call()
        assert f"jobindex:{victim}" in str(info.value)
    job = await queue.claim("q")  # the record itself is fine: claiming it rewrites the index entry
    assert job is not None and job.id == victim
    assert (await queue.get_job(victim)).status is JobStatus.CLAIMED
    check_dump(await dump_store(queue.store))


@pytest.mark.parametrize("holder", [b"\xff\xfe", b"01NOTAJOBID", b""], ids=["not-utf8", "unknown-id", "empty"])
async def test_dedup_entry_holding_no_job_is_taken_over(
    make_queue: MakeQueue, holder: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    queue = await make_queue()
    dkey = keys.dedup_key("q", "k")
    await plant(queue.store, dkey, holder)
    result = await queue.enqueue_with("q", b"x", dedup_key="k")
    assert result.created
    assert (await queue.enqueue_with("q", b"y", dedup_key="k")).id == result.id  # and now it dedups
    assert errors_naming(caplog, dkey)
    check_dump(await dump_store(queue.store))


async def test_corrupt_counter_is_reported_by_key_at_open(store_factory) -> None:  # type: ignore[no-untyped-def]
    store = await store_factory()
    key = keys.stats_key("q", "pending")
    await plant(store, key, b"xyz")
    with pytest.raises(CorruptRecord) as info:
        await Queue.open(store, background=False)
    assert repr(key) in str(info.value)
    await store.close()


async def test_corrupt_counter_fails_a_memory_commit_whole() -> None:
    queue = await Queue.open(MemoryStore(), clock=ManualClock(), background=False)
    async with queue:
        await queue.enqueue("q", b"x")
        key = keys.stats_key("q", "pending")
        await plant(queue.store, key, b"xyz")
        before = await dump_store(queue.store)
        with pytest.raises(CorruptRecord) as info:
            await queue.enqueue("q", b"y")
        assert repr(key) in str(info.value)
        assert await dump_store(queue.store) == before  # nothing half-applied
