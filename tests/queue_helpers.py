"""Helpers shared by the queue tests: store-parametrised fixtures and raw-store checks.

The fixtures are re-exported by ``conftest.py``; the helpers are imported by
the test modules directly (``from queue_helpers import dump_store``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from taquba_core import KVStore, ManualClock, Queue
from taquba_core import keys
from taquba_core.kv import decode_counter
from taquba_core.record import decode_record

STORE_KINDS = ["inmemory", "slatedb-memory"]

StoreFactory = Callable[[], Awaitable[KVStore]]


async def open_kind(kind: str) -> KVStore:
    """A fresh, empty store of ``kind`` (one of :data:`STORE_KINDS`)."""
    from taquba_backends import MemoryStore, open_store

    if kind == "inmemory":
        return MemoryStore()
    if kind == "slatedb-memory":
        return await open_store("memory://")
    raise ValueError(f"unknown store kind {kind!r}")


@pytest.fixture(params=STORE_KINDS)
def store_factory(request: pytest.FixtureRequest) -> StoreFactory:
    """An async factory of fresh, empty stores; parametrised over every store kind."""
    kind = request.param
    return lambda: open_kind(kind)


@pytest.fixture
async def make_queue(store_factory: StoreFactory) -> AsyncIterator[Callable[..., Awaitable[Queue]]]:
    """An async factory ``make_queue(**open_kwargs)`` of queues on fresh stores.

    Each queue runs without background tasks and with its own
    :class:`ManualClock` (reach it as ``queue.clock``).  All are closed at
    teardown.
    """
    opened: list[Queue] = []

    async def make(**kwargs: Any) -> Queue:
        kwargs.setdefault("clock", ManualClock())
        kwargs.setdefault("background", False)
        q = await Queue.open(await store_factory(), **kwargs)
        opened.append(q)
        return q

    yield make
    for q in opened:
        await q.close()


@pytest.fixture
async def queue(make_queue: Callable[..., Awaitable[Queue]]) -> Queue:
    """A :class:`Queue` with the default config on a fresh store of each kind.

    ``background=False`` and a :class:`ManualClock` as ``queue.clock``.
    """
    return await make_queue()


@pytest.fixture
def clock(queue: Queue) -> ManualClock:
    """The manual clock of the ``queue`` fixture."""
    assert isinstance(queue.clock, ManualClock)
    return queue.clock


# -- raw-store helpers ---------------------------------------------------------


async def close_with_a_cancelled_first_try(closable: Queue | KVStore) -> None:
    """Start ``close()``, cancel it at once (a shutdown timeout, say), then close again.

    The second call must wait for the same shutdown; the first must end in
    ``CancelledError``.
    """
    closing = asyncio.ensure_future(closable.close())
    await asyncio.sleep(0)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    await closable.close()


async def dump_store(store: KVStore) -> dict[bytes, bytes]:
    """Every key and value in ``store`` (one snapshot)."""
    txn = await store.begin()
    try:
        return dict(await txn.scan(b""))
    finally:
        await txn.rollback()


def space_keys(dump: dict[bytes, bytes], space: bytes) -> list[bytes]:
    return sorted(k for k in dump if k.startswith(space))


async def check_invariants(store: KVStore) -> dict[bytes, bytes]:
    """Assert the design's invariants 1-3 and 6 on a raw dump; returns the dump.

    1. every ``jobindex`` entry points to an existing key whose record has
       that id and the status of its key space, and every record has its entry;
    2. the pending/scheduled/claimed/dead counters equal the key counts;
    3. ``dedup`` entries exist exactly for pending/scheduled jobs with a dedup key;
    6. attempts never exceed max_attempts.
    """
    dump = await dump_store(store)
    status_of_space = {space: status for status, space in keys.SPACES.items()}
    records: dict[str, tuple[bytes, Any]] = {}
    counts: dict[tuple[str, str], int] = {}
    for key, value in dump.items():
        space = next((s for s in status_of_space if key.startswith(s)), None)
        if space is None:
            continue
        parsed = keys.parse_job_key(key)
        job = decode_record(value, key)
        assert job.id == parsed.job_id and job.queue == parsed.queue, key
        assert job.status.value == status_of_space[space], (key, job.status)
        assert job.attempts <= job.max_attempts, job
        assert job.id not in records, f"job {job.id} stored twice"
        records[job.id] = (key, job)
        metric = job.status.value.lower()
        counts[(job.queue, metric)] = counts.get((job.queue, metric), 0) + 1
    index = {k[len(keys.JOBINDEX):].decode(): v for k, v in dump.items() if k.startswith(keys.JOBINDEX)}
    for job_id, target in index.items():
        assert target in dump, f"jobindex:{job_id} points at missing {target!r}"
        assert job_id in records and records[job_id][0] == target, job_id
    assert set(records) == set(index), "records without index entry"
    for key, value in dump.items():
        if key.startswith(keys.STATS):
            queue, metric = key[len(keys.STATS):].decode().split(":")
            if metric != "done":
                assert decode_counter(value) == counts.get((queue, metric), 0), (queue, metric)
    for (queue, metric), n in counts.items():
        if metric != "done":
            assert decode_counter(dump.get(keys.stats_key(queue, metric))) == n, (queue, metric)
    dedups = {k: v for k, v in dump.items() if k.startswith(keys.DEDUP)}
    expected = {
        keys.dedup_key(job.queue, job.dedup_key): job.id.encode()
        for _, job in records.values()
        if job.dedup_key is not None and job.status.value in ("Pending", "Scheduled")
    }
    assert dedups == expected
    return dump


__all__ = [
    "STORE_KINDS",
    "check_invariants",
    "clock",
    "dump_store",
    "make_queue",
    "open_kind",
    "queue",
    "space_keys",
    "store_factory",
]
