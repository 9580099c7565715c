"""Bad input: a typed error naming the bad value, and nothing written to the store."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import pytest
from queue_helpers import dump_store

from taquba_backends import open_store
from taquba_core import (
    MAX_KV_VALUE_SIZE,
    CancelOutcome,
    ClaimLost,
    InvalidArgument,
    InvalidQueueName,
    InvalidStoreUrl,
    JobNotFound,
    KvValueTooLarge,
    Queue,
    QueueConfig,
    TaqubaError,
    WaitStatus,
    keys,
)


@pytest.fixture
async def busy_queue(queue: Queue) -> Queue:
    """The ``queue`` fixture with some state in every key space, so "unchanged" means something."""
    await queue.enqueue("q", b"pending")
    await queue.enqueue_with("q", b"scheduled", delay=60, dedup_key="d")
    await queue.enqueue_with("q", b"doomed", max_attempts=1, priority=0)
    await queue.nack(await queue.claim("q"), "dead")
    await queue.enqueue_with("q", b"claimed", priority=1)
    await queue.claim("q")
    await queue.kv_put(b"user", b"value")
    return queue


async def assert_rejected(
    queue: Queue,
    call: Callable[[], Awaitable[object]],
    error: type[TaqubaError],
    names: str,
) -> TaqubaError:
    """``call`` raises ``error`` whose message contains ``names``, and the store is unchanged."""
    before = await dump_store(queue.store)
    with pytest.raises(error) as info:
        await call()
    assert isinstance(info.value, TaqubaError)
    assert info.value.is_permanent
    assert names in str(info.value), f"{names!r} not in {str(info.value)!r}"
    assert await dump_store(queue.store) == before
    return info.value


BAD_QUEUE_NAMES = [
    pytest.param("", id="empty"),
    pytest.param("x" * 256, id="256-bytes"),
    pytest.param("é" * 128, id="256-bytes-utf8"),
    pytest.param("a:b", id="colon"),
    pytest.param("a\x01b", id="control-char"),
    pytest.param("a\nb", id="newline"),
    pytest.param(42, id="int"),
    pytest.param(None, id="none"),
    pytest.param(b"q", id="bytes"),
]


@pytest.mark.parametrize("name", BAD_QUEUE_NAMES)
async def test_bad_queue_names(busy_queue: Queue, name) -> None:
    q = busy_queue
    for call in (
        lambda: q.enqueue(name, b"x"),
        lambda: q.enqueue_with(name, b"x", dedup_key="k", kv_writes={b"k": b"v"}),
        lambda: q.enqueue_batch(name, [b"x", b"y"]),
        lambda: q.claim(name),
        lambda: q.claim_batch(name, 3),
        lambda: q.claim_with_wait(name, max_wait=0),
        lambda: q.stats(name),
    ):
        await assert_rejected(q, call, InvalidQueueName, repr(name))


async def test_bad_queue_name_in_config(store_factory) -> None:
    store = await store_factory()
    try:
        with pytest.raises(InvalidQueueName, match=repr("a:b")):
            Queue(store, queues={"a:b": QueueConfig()})
    finally:
        await store.close()


@pytest.mark.parametrize("payload", ["text", 7, None, 1.5, ["b"]], ids=["str", "int", "none", "float", "list"])
async def test_non_bytes_payloads(busy_queue: Queue, payload) -> None:
    q = busy_queue
    await assert_rejected(q, lambda: q.enqueue("q", payload), InvalidArgument, repr(payload))
    await assert_rejected(q, lambda: q.enqueue_with("q", payload), InvalidArgument, repr(payload))
    await assert_rejected(q, lambda: q.enqueue_batch("q", [b"ok", payload]), InvalidArgument, repr(payload))


@pytest.mark.parametrize("priority", [-1, 2**32, 1.5, "1"])
async def test_bad_priority(busy_queue: Queue, priority) -> None:
    q = busy_queue
    await assert_rejected(q, lambda: q.enqueue_with("q", b"x", priority=priority), InvalidArgument, str(priority))
    await assert_rejected(q, lambda: q.enqueue_batch("q", [b"x"], priority=priority), InvalidArgument, str(priority))


@pytest.mark.parametrize("max_attempts", [0, -1, 2.0, True, 2**64])
async def test_bad_max_attempts(busy_queue: Queue, max_attempts) -> None:
    q = busy_queue
    err = await assert_rejected(
        q, lambda: q.enqueue_with("q", b"x", max_attempts=max_attempts), InvalidArgument, repr(max_attempts)
    )
    assert "max_attempts" in str(err)
    with pytest.raises(InvalidArgument, match="max_attempts"):
        QueueConfig(max_attempts=max_attempts)


@pytest.mark.parametrize("delay", [-1, -0.001, math.nan, math.inf, -math.inf, "5"], ids=str)
async def test_bad_delays(busy_queue: Queue, delay) -> None:
    q = busy_queue
    err = await assert_rejected(q, lambda: q.enqueue_with("q", b"x", delay=delay), InvalidArgument, repr(delay))
    assert "delay" in str(err)


async def test_delay_and_run_at_together(busy_queue: Queue) -> None:
    q = busy_queue
    at = datetime(2030, 1, 1, tzinfo=UTC)
    await assert_rejected(q, lambda: q.enqueue_with("q", b"x", delay=1, run_at=at), InvalidArgument, "delay=1")


async def test_naive_run_at(busy_queue: Queue) -> None:
    q = busy_queue
    naive = datetime(2030, 1, 2, 3, 4, 5)
    await assert_rejected(q, lambda: q.enqueue_with("q", b"x", run_at=naive), InvalidArgument, naive.isoformat())
    await assert_rejected(q, lambda: q.enqueue_with("q", b"x", run_at=1234), InvalidArgument, "1234")


@pytest.mark.parametrize("key", ["", 5, b"bytes", "\ud800"], ids=["empty", "int", "bytes", "lone-surrogate"])
async def test_bad_dedup_key(busy_queue: Queue, key) -> None:
    q = busy_queue
    err = await assert_rejected(q, lambda: q.enqueue_with("q", b"x", dedup_key=key), InvalidArgument, repr(key))
    assert "dedup_key" in str(err)


@pytest.mark.parametrize(
    "headers",
    [{"k": 1}, {1: "v"}, ["k", "v"], {"k": "\udc80"}, {"\ud800": "v"}],
    ids=["int-value", "int-key", "list", "surrogate-value", "surrogate-key"],
)
async def test_bad_headers(busy_queue: Queue, headers) -> None:
    q = busy_queue
    await assert_rejected(q, lambda: q.enqueue_with("q", b"x", headers=headers), InvalidArgument, repr(headers))


async def test_oversized_kv_value(busy_queue: Queue) -> None:
    q = busy_queue
    big = b"x" * (MAX_KV_VALUE_SIZE + 1)
    size = str(MAX_KV_VALUE_SIZE + 1)
    await assert_rejected(q, lambda: q.kv_put(b"big-key", big), KvValueTooLarge, size)
    err = await assert_rejected(
        q, lambda: q.enqueue_with("q", b"x", kv_writes={b"big-key": big}), KvValueTooLarge, size
    )
    assert "big-key" in str(err)
    await assert_rejected(q, lambda: q.enqueue_batch("q", [b"x"], kv_writes={b"big-key": big}), KvValueTooLarge, size)
    # at the limit exactly is fine
    await q.kv_put(b"max", b"x" * MAX_KV_VALUE_SIZE)
    assert len(await q.kv_get(b"max")) == MAX_KV_VALUE_SIZE


async def test_oversized_kv_value_in_ack(busy_queue: Queue) -> None:
    q = busy_queue
    await q.enqueue("q", b"to-ack")
    job = await q.claim("q")
    big = b"x" * (MAX_KV_VALUE_SIZE + 1)
    await assert_rejected(q, lambda: q.ack(job, kv_writes={b"res": big}), KvValueTooLarge, "b'res'")
    await q.ack(job)  # the claim survived the rejected settlement


@pytest.mark.parametrize("key", ["str", 1, None], ids=["str", "int", "none"])
async def test_non_bytes_kv_keys(busy_queue: Queue, key) -> None:
    q = busy_queue
    await assert_rejected(q, lambda: q.kv_put(key, b"v"), InvalidArgument, repr(key))
    await assert_rejected(q, lambda: q.kv_get(key), InvalidArgument, repr(key))
    await assert_rejected(q, lambda: q.kv_delete(key), InvalidArgument, repr(key))


async def test_non_bytes_kv_value(busy_queue: Queue) -> None:
    q = busy_queue
    await assert_rejected(q, lambda: q.kv_put(b"k", "text"), InvalidArgument, "str")


@pytest.mark.parametrize(
    "url",
    ["ftp://host/path", "redis://localhost", "nope:thing", "", "inmemory://extra"],
)
async def test_unknown_store_url(busy_queue: Queue, url) -> None:
    await assert_rejected(busy_queue, lambda: open_store(url), InvalidStoreUrl, repr(url))


async def test_settling_a_never_claimed_record(busy_queue: Queue) -> None:
    q = busy_queue
    res = await q.enqueue_with("q", b"never claimed")
    job = await q.get_job(res.id)
    for call in (
        lambda: q.ack(job),
        lambda: q.nack(job, "e"),
        lambda: q.dead_letter(job, "e"),
        lambda: q.renew_lease(job),
    ):
        await assert_rejected(q, call, ClaimLost, res.id)


@pytest.mark.parametrize(
    "call, names",
    [
        (lambda q: q.claim("q", lease=0), "0"),
        (lambda q: q.claim("q", lease=-5), "-5"),
        (lambda q: q.claim_batch("q", 0), "0"),
        (lambda q: q.claim_with_wait("q", max_wait=-1), "-1"),
        (lambda q: q.kv_scan(limit=0), "0"),
        (lambda q: q.get_job(None), "None"),
        (lambda q: q.get_job("\ud800"), repr("\ud800")),
        (lambda q: q.claim_batch("q", 2**64), str(2**64)),
    ],
    ids=[
        "lease-zero",
        "lease-negative",
        "batch-zero",
        "wait-negative",
        "scan-limit-zero",
        "job-id-none",
        "job-id-surrogate",
        "batch-huge",
    ],
)
async def test_bad_call_arguments(busy_queue: Queue, call, names) -> None:
    await assert_rejected(busy_queue, lambda: call(busy_queue), InvalidArgument, names)


# -- settling twice, stale claims, requeue, unknown ids -----------------------------


SETTLE = {
    "ack": lambda q, job: q.ack(job),
    "nack": lambda q, job: q.nack(job, "again"),
    "dead_letter": lambda q, job: q.dead_letter(job, "again"),
    "renew_lease": lambda q, job: q.renew_lease(job, 5),
}


@pytest.mark.parametrize("first", ["ack", "nack", "dead_letter"])
@pytest.mark.parametrize("second", sorted(SETTLE))
async def test_settling_twice(busy_queue: Queue, first: str, second: str) -> None:
    q = busy_queue
    await q.enqueue_with("q", b"twice", priority=0)
    job = await q.claim("q")
    await SETTLE[first](q, job)
    err = await assert_rejected(q, lambda: SETTLE[second](q, job), ClaimLost, job.id)
    assert "no longer exists" in str(err) or "claimed again" in str(err)


@pytest.mark.parametrize("second", sorted(SETTLE))
async def test_settling_a_claim_that_was_reaped_and_claimed_again(busy_queue: Queue, second: str) -> None:
    q = busy_queue
    await q.enqueue_with("q", b"stale", priority=0)
    stale = await q.claim("q", lease=1)
    q.clock.advance(1000)
    await q.reap_now()
    fresh = await q.claim("q")
    assert fresh.id == stale.id
    await assert_rejected(q, lambda: SETTLE[second](q, stale), ClaimLost, stale.id)
    await q.ack(fresh)


@pytest.mark.parametrize("second", sorted(SETTLE))
async def test_settling_a_claim_whose_job_was_requeued_and_claimed_again_in_the_same_ms(
    busy_queue: Queue, second: str
) -> None:
    """Same lease expiry, same attempt number (requeue resets it): still a different claim."""
    q = busy_queue
    await q.enqueue_with("q", b"requeued", priority=0)
    old = await q.claim("q")
    await q.dead_letter(old, "bad")
    await q.requeue_dead_job(old.id)
    new = await q.claim("q")
    assert (new.id, new.lease_expires_at, new.attempts) == (old.id, old.lease_expires_at, old.attempts)
    err = await assert_rejected(q, lambda: SETTLE[second](q, old), ClaimLost, old.id)
    assert "claimed again" in str(err)
    await q.ack(new)


async def test_requeueing_a_job_that_is_not_dead(busy_queue: Queue, make_queue) -> None:
    q = busy_queue
    pending = await q.enqueue("q", b"p")
    scheduled = (await q.enqueue_with("q", b"s", delay=60)).id
    await q.enqueue_with("q", b"c", priority=0)
    claimed = (await q.claim("q")).id
    for job_id, status in ((pending, "Pending"), (scheduled, "Scheduled"), (claimed, "Claimed")):
        err = await assert_rejected(q, lambda job_id=job_id: q.requeue_dead_job(job_id), JobNotFound, job_id)
        assert "not dead" in str(err) and status in str(err)
    keeping = await make_queue(config=QueueConfig(keep_done_jobs=60))
    await keeping.enqueue("q", b"d")
    done = await keeping.claim("q")
    await keeping.ack(done)
    err = await assert_rejected(keeping, lambda: keeping.requeue_dead_job(done.id), JobNotFound, done.id)
    assert "Done" in str(err)


async def test_requeueing_twice(busy_queue: Queue) -> None:
    q = busy_queue
    (dead,) = await q.dead_jobs("q")
    await q.requeue_dead_job(dead.id)
    await assert_rejected(q, lambda: q.requeue_dead_job(dead.id), JobNotFound, dead.id)


UNKNOWN = "01ARZ3NDEKTSV4RRFFQ69G5FAV"


async def test_unknown_job_ids(busy_queue: Queue) -> None:
    """An unknown id is an answer, not a write: typed where the call needs the job, and nothing changes."""
    q = busy_queue
    for job_id in (UNKNOWN, "not-a-ulid", "é" * 3):
        await assert_rejected(q, lambda job_id=job_id: q.requeue_dead_job(job_id), JobNotFound, repr(job_id))
        before = await dump_store(q.store)
        assert await q.get_job(job_id) is None
        assert await q.cancel(job_id) is CancelOutcome.NOT_FOUND
        assert (await q.wait_for_completion(job_id, 0)).status is WaitStatus.NOT_FOUND
        assert await q.dead_jobs("q", after=job_id) is not None
        assert await dump_store(q.store) == before


@pytest.mark.parametrize("job_id", ["", None, 7, b"id", "\udc80"], ids=["empty", "none", "int", "bytes", "surrogate"])
async def test_malformed_job_ids(busy_queue: Queue, job_id) -> None:
    q = busy_queue
    for call in (
        lambda: q.get_job(job_id),
        lambda: q.cancel(job_id),
        lambda: q.requeue_dead_job(job_id),
        lambda: q.wait_for_completion(job_id, 0),
        lambda: q.dead_jobs("q", after=job_id) if job_id is not None else q.get_job(job_id),
    ):
        await assert_rejected(q, call, InvalidArgument, repr(job_id))


# -- store URLs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, why",
    [
        ("file://relative/dir", "absolute"),
        ("file:///", "absolute directory"),
        ("file://host/dir", "three slashes"),
        ("s3://", "needs a bucket"),
        ("s3:///prefix", "needs a bucket"),
        ("gs://", "needs a bucket"),
        ("az://", "needs a bucket"),
        ("memory://host", "no location"),
        ("memory:/x", "expected"),
        ("memory://?flush_interval_ms=0", "flush_interval_ms"),
        ("memory://?flush_interval_ms=abc", "flush_interval_ms"),
        ("s3://b/p?flush_interval_ms=99999999", "flush_interval_ms"),
        ("file:///tmp/x?flush_interval_ms=1&flush_interval_ms=2", "flush_interval_ms"),
        ("memory://?bogus=1", "bogus"),
        ("MEMORY://?x", "malformed query"),
        ("memory://#frag", "fragment"),
        ("   ", "expected"),
        (None, "expected"),
        (42, "expected"),
        (b"memory://", "expected"),
    ],
)
async def test_malformed_store_urls(busy_queue: Queue, url, why: str) -> None:
    err = await assert_rejected(busy_queue, lambda: open_store(url), InvalidStoreUrl, repr(url))
    assert why in str(err)


# -- other call arguments ----------------------------------------------------------------


@pytest.mark.parametrize(
    "call, names",
    [
        (lambda q: q.enqueue_batch("q", [b"x"], dedup_key="d"), "dedup_key"),
        (lambda q: q.list_jobs("q", "Lost"), "'Lost'"),
        (lambda q: q.list_jobs("q", "Pending", cursor="zz"), "'zz'"),
        (lambda q: q.list_jobs("q", "Pending", limit=0), "0"),
        (lambda q: q.dead_jobs("q", limit=-1), "-1"),
        (lambda q: q.kv_write([(b"k", b"v")]), "mapping"),
        (lambda q: q.kv_write({b"k": 5}), "int"),
        (lambda q: q.kv_scan(b"", cursor="c"), "'c'"),
        (lambda q: q.kv_scan(b"", limit=2.5), "2.5"),
        (lambda q: q.enqueue_with("q", b"x", kv_writes={"k": b"v"}), "'k'"),
        (lambda q: q.wait_for_completion(UNKNOWN, -1), "-1"),
        (lambda q: q.claim_batch("q", "3"), "'3'"),
        (lambda q: q.claim("q", lease=math.nan), "nan"),
        (lambda q: q.enqueue_with("q", b"x", delay=True), "True"),
    ],
    ids=[
        "batch-dedup", "list-status", "list-cursor", "list-limit", "dead-limit", "kv-write-list", "kv-write-int",
        "kv-scan-cursor", "kv-scan-limit", "kv-writes-str-key", "wait-negative", "batch-str", "lease-nan",
        "delay-bool",
    ],
)
async def test_more_bad_call_arguments(busy_queue: Queue, call, names: str) -> None:
    await assert_rejected(busy_queue, lambda: call(busy_queue), InvalidArgument, names)


@pytest.mark.parametrize("lease", [0, -1, math.inf, "5"], ids=str)
async def test_bad_renewal_lease_keeps_the_claim(busy_queue: Queue, lease) -> None:
    q = busy_queue
    await q.enqueue_with("q", b"r", priority=0)
    job = await q.claim("q")
    expiry = job.lease_expires_at
    await assert_rejected(q, lambda: q.renew_lease(job, lease), InvalidArgument, repr(lease))
    assert job.lease_expires_at == expiry
    await q.ack(job)


@pytest.mark.parametrize(
    "kwargs, names",
    [
        ({"lease": 0}, "lease"),
        ({"backoff_base": -1}, "backoff_base"),
        ({"backoff_max": math.nan}, "backoff_max"),
        ({"keep_done_jobs": -5}, "keep_done_jobs"),
        ({"dead_retention": math.inf}, "dead_retention"),
        ({"priority": -1}, "-1"),
    ],
)
def test_bad_queue_configs(kwargs, names: str) -> None:
    with pytest.raises(InvalidArgument, match=names):
        QueueConfig(**kwargs)


# -- the caller KV namespace is isolated ------------------------------------------------


async def test_caller_keys_shaped_like_internal_keys_reach_only_caller_data(busy_queue: Queue) -> None:
    q = busy_queue
    before = await dump_store(q.store)
    internal = {k: v for k, v in before.items() if not k.startswith(keys.USER)}
    real = sorted(k for k in internal if not k.startswith(keys.STATS))[:3] + [keys.stats_key("q", "pending")]
    shaped = [*real, b"pending:", b"stats:", b"", b"\x00", b"jobindex:", b"usr:", b"usr:user", b"\xff\xff"]
    for key in shaped:  # the internal key of the same name is not visible
        assert await q.kv_get(key) is None, key
    listed, _ = await q.kv_scan(b"", limit=1000)
    assert listed == [(b"user", b"value")]
    for prefix in (b"pending:", b"stats:", b"dead:", b"jobindex:", b"\x00"):
        assert await q.kv_scan(prefix) == ([], None)

    await q.kv_write({key: b"caller " + key for key in shaped})
    await q.enqueue_with("q", b"with kv", kv_writes={keys.stats_key("q", "done"): b"\x01" * 8})
    after = await dump_store(q.store)
    new_internal = {k: v for k, v in after.items() if not k.startswith(keys.USER)}
    assert {k: v for k, v in new_internal.items() if k in internal and not k.startswith(keys.STATS)} == {
        k: v for k, v in internal.items() if not k.startswith(keys.STATS)
    }, "a caller write reached an internal key"
    assert (await q.stats("q")).done == 0 and (await q.stats("q")).pending == 2  # only the enqueue counted
    for key in shaped:
        assert await q.kv_get(key) == b"caller " + key
    listed, cursor = await q.kv_scan(b"", limit=1000)
    assert cursor is None
    assert [k for k, _ in listed] == sorted({b"user", keys.stats_key("q", "done"), *shaped})
    page, _ = await q.kv_scan(b"pending:")
    assert [k for k, _ in page] == sorted(k for k in shaped if k.startswith(b"pending:"))

    for key in shaped:
        await q.kv_delete(key)
    await q.kv_delete(keys.stats_key("q", "done"))
    final = await dump_store(q.store)
    assert {k: v for k, v in final.items() if k.startswith(keys.USER)} == {keys.user_key(b"user"): b"value"}
    assert {k for k in final if not k.startswith(keys.USER)} == set(new_internal)
    job = await q.claim("q")  # the queue still serves its jobs
    assert job is not None


async def test_unknown_enqueue_option_is_a_typed_error(queue) -> None:
    before = await dump_store(queue.store)
    with pytest.raises(InvalidArgument, match="priorty"):
        await queue.enqueue_with("q", b"x", priorty=5)  # type: ignore[call-arg]
    with pytest.raises(InvalidArgument, match="priorty"):
        await queue.enqueue_batch("q", [b"x"], priorty=5)  # type: ignore[call-arg]
    assert await dump_store(queue.store) == before


@pytest.mark.parametrize("seconds", [0.0004, 1e13])
async def test_durations_that_round_to_zero_or_overflow_are_refused(queue, seconds: float) -> None:
    before = await dump_store(queue.store)
    with pytest.raises(InvalidArgument, match=repr(seconds)):
        await queue.claim("q", lease=seconds)
    with pytest.raises(InvalidArgument, match=repr(seconds)):
        QueueConfig(lease=seconds)
    assert await dump_store(queue.store) == before
