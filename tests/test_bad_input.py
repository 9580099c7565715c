"""Bad input: a typed error naming the bad value, and nothing written to the store."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone

import pytest

from queue_helpers import dump_store
from taquba_backends import open_store
from taquba_core import (
    ClaimLost,
    InvalidArgument,
    InvalidQueueName,
    InvalidStoreUrl,
    KvValueTooLarge,
    MAX_KV_VALUE_SIZE,
    Queue,
    QueueConfig,
    TaqubaError,
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
    at = datetime(2030, 1, 1, tzinfo=timezone.utc)
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
