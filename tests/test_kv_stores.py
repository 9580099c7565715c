"""The KV contract (taquba_core.kv) on every store adapter, plus URL dispatch and S3."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from queue_helpers import close_with_a_cancelled_first_try
from s3server import moto_s3

from taquba_backends import MemoryStore, SlateDBStore, open_store, slatedb_store
from taquba_backends._readcache import ENTRY_OVERHEAD, MISS, ReadCache
from taquba_backends._versions import Pins
from taquba_backends.memory import FaultPlan
from taquba_backends.slatedb_store import parse_slatedb_url
from taquba_core.errors import (
    CorruptRecord,
    InvalidArgument,
    InvalidStoreUrl,
    StoreClosed,
    StoreConflict,
    StoreError,
    StoreFenced,
)
from taquba_core.kv import COUNTER, KVStore, Transaction, decode_counter



@pytest.fixture(params=["inmemory", "slatedb-memory", "slatedb-file"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[KVStore]:
    """Each adapter in turn: pure Python, SlateDB in memory, SlateDB on local disk."""
    urls = {"inmemory": "inmemory://", "slatedb-memory": "memory://", "slatedb-file": (tmp_path / "db").as_uri()}
    kv = await open_store(urls[request.param])
    yield kv
    await kv.close()


async def write(kv: KVStore, **items: bytes | None) -> None:
    """Commit puts (``None``: delete) of ``key=value`` pairs in one transaction."""
    txn = await kv.begin()
    for key, value in items.items():
        if value is None:
            await txn.delete(key.encode())
        else:
            await txn.put(key.encode(), value)
    await txn.commit()


async def read(kv: KVStore, key: bytes) -> bytes | None:
    """The committed value of ``key``."""
    txn = await kv.begin()
    try:
        return await txn.get(key)
    finally:
        await txn.rollback()


async def scan_all(kv: KVStore, prefix: bytes) -> list[tuple[bytes, bytes]]:
    """The committed rows under ``prefix``."""
    txn = await kv.begin()
    try:
        return await txn.scan(prefix)
    finally:
        await txn.rollback()


async def keys(txn: Transaction, prefix: bytes, **kwargs: object) -> list[bytes]:
    """The keys ``txn.scan`` returns."""
    return [k for k, _ in await txn.scan(prefix, **kwargs)]  # type: ignore[arg-type]


# -- snapshot isolation -------------------------------------------------------


async def test_snapshot_hides_later_commits(store: KVStore) -> None:
    await write(store, a=b"1")
    old = await store.begin()
    await write(store, a=b"2", b=b"2")
    assert await old.get(b"a") == b"1"
    assert await old.get(b"b") is None
    assert await old.scan(b"") == [(b"a", b"1")]
    await old.commit()
    assert await read(store, b"a") == b"2"


async def test_own_writes_visible_in_get_and_scan(store: KVStore) -> None:
    await write(store, a=b"old", b=b"old", c=b"old")
    txn = await store.begin()
    await txn.put(b"a", b"new")
    await txn.delete(b"b")
    await txn.put(b"d", b"new")
    await txn.merge_counter(b"n", 5)
    await txn.merge_counter(b"n", -2)
    assert await txn.get(b"a") == b"new"
    assert await txn.get(b"b") is None
    assert decode_counter(await txn.get(b"n")) == 3
    assert await txn.scan(b"") == [(b"a", b"new"), (b"c", b"old"), (b"d", b"new"), (b"n", (3).to_bytes(8, "little"))]
    await txn.commit()
    after = await store.begin()
    assert await keys(after, b"") == [b"a", b"c", b"d", b"n"]
    await after.rollback()


async def test_merge_after_put_or_delete_in_one_transaction(store: KVStore) -> None:
    txn = await store.begin()
    await txn.put(b"p", (10).to_bytes(8, "little", signed=True))
    await txn.merge_counter(b"p", 5)
    await txn.merge_counter(b"d", 7)
    await txn.delete(b"d")
    await txn.merge_counter(b"d", 2)
    assert decode_counter(await txn.get(b"p")) == 15
    assert decode_counter(await txn.get(b"d")) == 2
    await txn.commit()
    assert decode_counter(await read(store, b"p")) == 15
    assert decode_counter(await read(store, b"d")) == 2


async def test_rollback_discards(store: KVStore) -> None:
    txn = await store.begin()
    await txn.put(b"a", b"1")
    await txn.merge_counter(b"n", 1)
    await txn.rollback()
    assert await read(store, b"a") is None
    assert await read(store, b"n") is None


# -- scan ----------------------------------------------------------------------


async def test_scan_order_bounds_and_limit(store: KVStore) -> None:
    await write(store, **{k: k.encode() for k in ["a", "a:3", "a:1", "a:2", "a:10", "ab", "b:1", "0"]})
    txn = await store.begin()
    assert await keys(txn, b"a:") == [b"a:1", b"a:10", b"a:2", b"a:3"]
    assert await keys(txn, b"a:", start_after=b"a:10") == [b"a:2", b"a:3"]
    assert await keys(txn, b"a:", start_after=b"a") == [b"a:1", b"a:10", b"a:2", b"a:3"]
    assert await keys(txn, b"a:", end=b"a:2") == [b"a:1", b"a:10"]
    assert await keys(txn, b"a:", end=b"z") == [b"a:1", b"a:10", b"a:2", b"a:3"]
    assert await keys(txn, b"a:", start_after=b"a:1", end=b"a:3") == [b"a:10", b"a:2"]
    assert await keys(txn, b"a:", start_after=b"a:2", end=b"a:2") == []
    assert await keys(txn, b"a:", start_after=b"a:3", end=b"a:1") == []
    assert await keys(txn, b"a:", start_after=b"a:3") == []
    assert await keys(txn, b"a:", limit=2) == [b"a:1", b"a:10"]
    assert await keys(txn, b"a:", limit=0) == []
    assert await keys(txn, b"a") == [b"a", b"a:1", b"a:10", b"a:2", b"a:3", b"ab"]
    assert await keys(txn, b"") == [b"0", b"a", b"a:1", b"a:10", b"a:2", b"a:3", b"ab", b"b:1"]
    assert await keys(txn, b"c") == []
    assert await txn.scan(b"b:") == [(b"b:1", b"b:1")]
    await txn.rollback()


async def test_scan_prefix_of_ff_bytes(store: KVStore) -> None:
    txn = await store.begin()
    for key in [b"\xff", b"\xff\xff", b"\xff\x00", b"\xfe\xff"]:
        await txn.put(key, b"v")
    await txn.commit()
    txn = await store.begin()
    assert await keys(txn, b"\xff") == [b"\xff", b"\xff\x00", b"\xff\xff"]
    assert await keys(txn, b"\xfe") == [b"\xfe\xff"]
    await txn.rollback()


async def test_scan_many_rows_in_batches(store: KVStore) -> None:
    txn = await store.begin()
    for i in range(700):
        await txn.put(b"k:%05d" % i, b"v")
    await txn.commit()
    txn = await store.begin()
    assert len(await txn.scan(b"k:")) == 700
    limited = await keys(txn, b"k:", start_after=b"k:00099", limit=300)
    assert limited == [b"k:%05d" % i for i in range(100, 400)]
    await txn.rollback()


# -- conflicts -------------------------------------------------------------------


async def test_write_write_conflict_applies_nothing(store: KVStore) -> None:
    first, second = await store.begin(), await store.begin()
    await first.put(b"k", b"first")
    await second.put(b"k", b"second")
    await second.put(b"other", b"second")
    await second.merge_counter(b"n", 1)
    await first.commit()
    with pytest.raises(StoreConflict):
        await second.commit()
    assert await read(store, b"k") == b"first"
    assert await read(store, b"other") is None
    assert await read(store, b"n") is None


async def test_delete_delete_conflict(store: KVStore) -> None:
    await write(store, k=b"v")
    first, second = await store.begin(), await store.begin()
    await first.delete(b"k")
    await second.delete(b"k")
    await first.commit()
    with pytest.raises(StoreConflict):
        await second.commit()


async def test_delete_of_absent_key_conflicts(store: KVStore) -> None:
    first, second = await store.begin(), await store.begin()
    await first.delete(b"ghost")
    await second.put(b"ghost", b"v")
    await first.commit()
    with pytest.raises(StoreConflict):
        await second.commit()


async def test_disjoint_and_sequential_writes_do_not_conflict(store: KVStore) -> None:
    first, second = await store.begin(), await store.begin()
    await first.put(b"a", b"1")
    await second.put(b"b", b"2")
    await first.commit()
    await second.commit()
    later = await store.begin()
    await later.put(b"a", b"3")
    await later.commit()
    assert await read(store, b"a") == b"3"
    assert await read(store, b"b") == b"2"


async def test_concurrent_counter_merges_both_apply(store: KVStore) -> None:
    await write(store, n=(100).to_bytes(8, "little"))
    first, second = await store.begin(), await store.begin()
    await first.merge_counter(b"n", 1)
    await first.put(b"x", b"1")
    await second.merge_counter(b"n", -3)
    await second.merge_counter(b"m", 7)
    await first.commit()
    await second.commit()
    assert decode_counter(await read(store, b"n")) == 98
    assert decode_counter(await read(store, b"m")) == 7


async def test_merged_then_put_key_is_still_conflict_checked(store: KVStore) -> None:
    first, second = await store.begin(), await store.begin()
    await first.merge_counter(b"k", 1)
    await first.put(b"k", b"\x00" * 8)
    await second.put(b"k", b"\x01" * 8)
    await second.commit()
    with pytest.raises(StoreConflict):
        await first.commit()


async def test_read_modify_write_under_contention_loses_no_update(store: KVStore) -> None:
    async def increment() -> None:
        while True:
            txn = await store.begin()
            value = decode_counter(await txn.get(b"c"))
            await asyncio.sleep(0)
            await txn.put(b"c", (value + 1).to_bytes(8, "little"))
            try:
                await txn.commit()
                return
            except StoreConflict:
                continue

    await asyncio.gather(*(increment() for _ in range(10)))
    assert decode_counter(await read(store, b"c")) == 10


async def test_put_or_delete_after_a_concurrent_merge_conflicts(store: KVStore) -> None:
    await write(store, c=COUNTER.pack(10))
    reader = await store.begin()
    value = decode_counter(await reader.get(b"c"))
    merger = await store.begin()
    await merger.merge_counter(b"c", 1)
    await merger.commit()
    await reader.put(b"c", COUNTER.pack(value * 2))  # read-modify-write over a merge it did not see
    with pytest.raises(StoreConflict):
        await reader.commit()
    assert decode_counter(await read(store, b"c")) == 11


async def test_merges_go_on_from_a_put_or_delete_of_the_counter(store: KVStore) -> None:
    for step in ("merge5", "put100", "merge1"):
        txn = await store.begin()
        if step == "put100":
            await txn.put(b"n", COUNTER.pack(100))
        else:
            await txn.merge_counter(b"n", int(step[5:]))
        await txn.commit()
    assert decode_counter(await read(store, b"n")) == 101
    await write(store, n=None)
    txn = await store.begin()
    await txn.merge_counter(b"n", 1)
    await txn.commit()
    assert decode_counter(await read(store, b"n")) == 1


async def test_a_commit_waiting_for_its_turn_keeps_its_conflicts(store: KVStore) -> None:
    """A commit queued behind another that writes many keys (once enough to prune
    the conflict bookkeeping) is still checked against it."""
    await write(store, k=b"0")
    first, second = await store.begin(), await store.begin()
    assert await first.get(b"k") == await second.get(b"k") == b"0"
    await second.put(b"k", b"second")
    for i in range(5000):
        await second.put(b"filler%05d" % i, b"x")
    await first.put(b"k", b"first")
    second_commit = asyncio.ensure_future(second.commit())
    await asyncio.sleep(0)
    with pytest.raises(StoreConflict):
        await first.commit()
    await second_commit
    assert await read(store, b"k") == b"second"


async def test_cancelled_commits_lose_no_update_and_no_count(store: KVStore) -> None:
    """Callers cancelled (once or twice) while their commit is being written: whatever landed
    landed whole, and the commits after it neither miss it in their conflict check nor in the counter."""
    rng = random.Random(7)

    async def increment(tag: str) -> None:
        while True:
            txn = await store.begin()
            value = decode_counter(await txn.get(b"x"))
            await txn.put(b"x", COUNTER.pack(value + 1))
            await txn.put(b"d:" + tag.encode(), b"v")
            await txn.merge_counter(b"c", 1)
            try:
                await txn.commit(durable=False)
                return
            except StoreConflict:
                continue

    for i in range(300):
        task = asyncio.ensure_future(increment(f"a{i}"))
        behind = asyncio.ensure_future(increment(f"b{i}"))
        for _ in range(rng.randrange(4)):
            await asyncio.sleep(0)
        task.cancel()
        if i % 2:  # and again, while it waits for its write to end
            await asyncio.sleep(0)
            task.cancel()
        await asyncio.gather(task, behind, return_exceptions=True)
    landed = len(await scan_all(store, b"d:"))
    assert decode_counter(await read(store, b"x")) == landed
    assert decode_counter(await read(store, b"c")) == landed


async def test_an_empty_key_is_a_typed_error(store: KVStore) -> None:
    txn = await store.begin()
    with pytest.raises(InvalidArgument, match="empty"):
        await txn.put(b"", b"v")
    with pytest.raises(InvalidArgument, match="empty"):
        await txn.delete(b"")
    with pytest.raises(InvalidArgument, match="empty"):
        await txn.merge_counter(b"", 1)
    await txn.rollback()


async def test_merge_delta_must_be_int64(store: KVStore) -> None:
    txn = await store.begin()
    with pytest.raises(InvalidArgument):
        await txn.merge_counter(b"n", 2**63)
    await txn.rollback()


async def test_merge_onto_a_value_that_is_no_counter_writes_nothing(store: KVStore) -> None:
    await write(store, x=b"abc")
    txn = await store.begin()
    await txn.merge_counter(b"x", 1)
    await txn.put(b"y", b"1")
    with pytest.raises(CorruptRecord, match="not a counter"):
        await txn.get(b"x")  # the transaction's own view of the key is no counter either
    with pytest.raises(CorruptRecord, match="not a counter"):
        await txn.scan(b"")
    with pytest.raises(CorruptRecord, match="not a counter"):
        await txn.commit()
    txn = await store.begin()
    await txn.put(b"z", b"abc")
    await txn.merge_counter(b"z", 1)
    with pytest.raises(CorruptRecord, match="not a counter"):
        await txn.commit()
    assert (await read(store, b"x"), await read(store, b"y"), await read(store, b"z")) == (b"abc", None, None)
    await write(store, y=b"2")  # the store goes on working
    assert await read(store, b"y") == b"2"


async def test_counters_go_on_from_their_stored_value_after_reopen(tmp_path: Path) -> None:
    url = (tmp_path / "db").as_uri()
    for delta in (4, 3, -2):
        kv = await open_store(url)
        txn = await kv.begin()
        await txn.merge_counter(b"n", delta)
        await txn.commit()
        await kv.close()
    kv = await open_store(url)
    assert decode_counter(await read(kv, b"n")) == 5
    await kv.close()


async def test_first_merges_of_a_stored_counter_racing_a_put_all_count(tmp_path: Path) -> None:
    """Concurrent commits that each read the counter's stored value first, and a put
    of it landing while those reads are under way: no update is lost."""
    url = (tmp_path / "db").as_uri()
    kv = await open_store(url)
    await write(kv, n=COUNTER.pack(5))
    await kv.close()
    kv = await open_store(url)

    async def merge() -> None:
        txn = await kv.begin()
        await txn.merge_counter(b"n", 1)
        await txn.commit(durable=False)

    merges = [asyncio.ensure_future(merge()) for _ in range(20)]
    await asyncio.sleep(0)
    await write(kv, n=COUNTER.pack(100))  # conflicts with none of them: merges take no part
    await asyncio.gather(*merges)
    assert decode_counter(await read(kv, b"n")) in range(100, 121)
    before = decode_counter(await read(kv, b"n"))
    await asyncio.gather(*(merge() for _ in range(10)))
    await kv.close()
    kv = await open_store(url)
    assert decode_counter(await read(kv, b"n")) == before + 10
    await kv.close()


async def test_a_put_landing_between_a_counter_read_and_its_use_is_not_lost(tmp_path: Path) -> None:
    url = (tmp_path / "db").as_uri()
    kv = await open_store(url)
    await write(kv, n=COUNTER.pack(5))
    await kv.close()
    kv = await SlateDBStore.open(url)  # the counter is only in SlateDB: a merge reads it first
    merging, putting = await kv.begin(), await kv.begin()
    await merging.merge_counter(b"n", 1)
    await putting.put(b"n", COUNTER.pack(100))
    merge = asyncio.ensure_future(merging.commit())
    await asyncio.sleep(0)
    assert b"n" in kv._loading  # the merge is reading the counter
    while b"n" in kv._loading:  # until the read is over
        await asyncio.sleep(0)
    try:
        await putting.commit(durable=False)
        expected = 101  # the put landed first: the merge adds to it
    except StoreConflict:
        expected = 6  # the merge landed first: the put, which began before it, loses
    await merge
    assert decode_counter(await read(kv, b"n")) == expected
    await kv.close()


async def test_a_commit_nobody_waits_for_still_reaches_the_object_store(tmp_path: Path) -> None:
    from taquba_backends.reader import SlateDBReader

    url = (tmp_path / "db").as_uri()
    kv = await open_store(url)
    await write(kv, first=b"1")
    txn = await kv.begin()
    await txn.put(b"later", b"2")
    await txn.commit(durable=False)
    try:
        for _ in range(100):  # written within the flush interval, flushed by SlateDB's own timer
            await asyncio.sleep(0.05)
            reader = await SlateDBReader.open(url)
            try:
                if await read(reader, b"later") == b"2":
                    break
            finally:
                await reader.close()
        else:
            pytest.fail("a non-durable commit never reached the object store")
    finally:
        await kv.close()


async def test_a_failed_write_out_fails_the_waiters_and_stops_the_store(tmp_path: Path) -> None:
    url = (tmp_path / "db").as_uri()
    first = await SlateDBStore.open(url)
    await write(first, k=b"first")
    second = await SlateDBStore.open(url)  # fences the first
    txn = await first.begin()
    await txn.put(b"k", b"lost")
    pending = await txn.commit(durable=False)  # taken in, as far as this process knows
    with pytest.raises(StoreFenced):
        await pending.wait()
    for attempt in (first.begin(), first.sync()):
        with pytest.raises(StoreFenced):
            await attempt
    await first.close()
    assert await read(second, b"k") == b"first"
    await second.close()


def test_read_cache_keeps_the_newest_values_within_its_budget() -> None:
    cache = ReadCache(budget=3 * (ENTRY_OVERHEAD + 2 + 10))
    for i in range(5):
        cache.remember(b"k%d" % i, b"v" * 10)
    assert [cache.get(b"k%d" % i) for i in range(5)] == [MISS, MISS, b"v" * 10, b"v" * 10, b"v" * 10]
    cache.remember(b"k2", None)  # a delete is remembered, and refreshes the key
    cache.remember(b"k5", b"v" * 10)
    assert (cache.get(b"k2"), cache.get(b"k3"), len(cache)) == (None, MISS, 3)
    assert cache.size <= 3 * (ENTRY_OVERHEAD + 2 + 10)


def test_pins_hold_one_entry_per_number_pinned() -> None:
    pins = Pins()
    pins.pin(5)  # a long transaction
    for seq in range(6, 10_006):  # many short ones come and go meanwhile
        pins.pin(seq)
        pins.pin(seq)
        pins.unpin(seq)
        pins.unpin(seq)
        assert len(pins) == 1 and pins.oldest() == 5
    pins.pin(10_006)
    pins.abandon(5)  # dropped without ending
    pins.unpin(10_006)
    assert len(pins) == 0 and pins.oldest() is None


async def test_slatedb_overlay_keeps_what_open_snapshots_lack_and_no_more() -> None:
    kv = await SlateDBStore.open("memory://")
    pinned = await kv.begin()  # its snapshot lacks every later commit: the overlay keeps them
    for i in range(300):
        await write(kv, **{f"k{i}": b"v"})
    assert len(kv._overlay) >= 300
    assert await pinned.get(b"k1") is None and await pinned.scan(b"k") == []
    await pinned.rollback()
    assert len(kv._overlay) == 0  # all written out, and nothing pins them any more
    for i in range(300):
        await write(kv, **{f"j{i}": b"v"})
    assert len(kv._overlay) <= 1  # released once nothing pins it
    txn = await kv.begin()
    assert await txn.get(b"k1") == b"v" and len(await txn.scan(b"")) == 600
    await txn.rollback()
    await kv.close()


# -- commit modes and lifecycle ----------------------------------------------------


async def test_read_only_and_empty_commits(store: KVStore) -> None:
    txn = await store.begin()
    assert await txn.get(b"nothing") is None
    await txn.commit()
    await (await store.begin()).commit()


async def test_non_durable_commit_is_visible(store: KVStore) -> None:
    txn = await store.begin()
    await txn.put(b"k", b"v")
    await txn.commit(durable=False)
    assert await read(store, b"k") == b"v"


async def test_finished_transaction_is_unusable(store: KVStore) -> None:
    txn = await store.begin()
    await txn.put(b"k", b"v")
    await txn.commit()
    with pytest.raises(StoreClosed):
        await txn.get(b"k")
    with pytest.raises(StoreClosed):
        await txn.commit()
    await txn.rollback()  # a no-op


async def test_closed_store_refuses_work(store: KVStore) -> None:
    await store.close()
    with pytest.raises(StoreClosed):
        await store.begin()
    await store.close()  # idempotent


# -- SlateDB on disk: durability and fencing ----------------------------------------


async def test_durable_commit_survives_reopen(tmp_path: Path) -> None:
    url = (tmp_path / "db").as_uri()
    kv = await SlateDBStore.open(url)
    txn = await kv.begin()
    await txn.put(b"k", b"v")
    await txn.merge_counter(b"n", 4)
    await txn.commit()
    await kv.close()
    reopened = await open_store(url)
    assert await read(reopened, b"k") == b"v"
    assert decode_counter(await read(reopened, b"n")) == 4
    await reopened.close()


async def test_durable_commits_reach_the_object_store_before_returning(tmp_path: Path) -> None:
    """Without a close: a writer that takes over sees every commit that returned durable."""
    url = (tmp_path / "db").as_uri() + "?flush_interval_ms=60000"  # only the commits' own flushes
    first = await SlateDBStore.open(url)
    await write(first, a=b"1")
    pending = []
    for i in range(20):
        txn = await first.begin()
        await txn.put(f"k{i}".encode(), b"v")
        await txn.merge_counter(b"n", 1)
        pending.append(await txn.commit(durable=False))
    await asyncio.gather(*(d.wait() for d in pending))
    second = await SlateDBStore.open(url)  # fences the first, which is never closed cleanly
    assert await read(second, b"a") == b"1"
    assert [await read(second, f"k{i}".encode()) for i in range(20)] == [b"v"] * 20
    assert decode_counter(await read(second, b"n")) == 20
    await second.close()


class RecordingDb:
    """A SlateDB handle that records when writes and WAL flushes are sent and done.

    With ``hold_writes`` (seconds) a write waits before SlateDB sees it, as
    under SlateDB's backpressure: a flush asked for meanwhile does not cover it.
    """

    def __init__(self, db: Any, hold_writes: float = 0.0) -> None:
        self._db = db
        self._hold = hold_writes
        self.events: list[str] = []
        self.turn: Callable[[], int] = lambda: 0  # the loop turn, when the test counts them
        self.turns: dict[str, int] = {}  # the turn of each event's first occurrence

    def _record(self, event: str) -> None:
        self.events.append(event)
        self.turns.setdefault(event, self.turn())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)

    async def write(self, batch: Any) -> Any:
        self._record("write sent")
        if self._hold:
            await asyncio.sleep(self._hold)
        handle = await self._db.write(batch)
        self._record("write done")
        return handle

    async def flush_with_options(self, options: Any) -> None:
        self._record("flush sent")
        await self._db.flush_with_options(options)
        self._record("flush done")


async def recorded_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hold_writes: float = 0.0
) -> tuple[str, SlateDBStore, RecordingDb]:
    """A file store past its first write-out, with its writes and flushes recorded from now on."""
    url = (tmp_path / "db").as_uri() + "?flush_interval_ms=60000"  # only the commits' own flushes
    kv = await SlateDBStore.open(url)
    await write(kv, a=b"0")
    recording = RecordingDb(kv._db, hold_writes)
    monkeypatch.setattr(kv, "_db", recording)
    return url, kv, recording


async def assert_a_taker_over_reads(url: str, key: bytes, value: bytes) -> None:
    """A writer that takes the store over (fencing the first, never closed cleanly) reads ``value``."""
    second = await SlateDBStore.open(url)
    assert await read(second, key) == value
    await second.close()


async def test_a_durable_commit_asks_for_its_flush_while_its_write_is_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SlateDB queues writes and flushes in one queue: the flush goes with the write, not a loop turn after it."""
    url, kv, recording = await recorded_store(tmp_path, monkeypatch)
    loop = asyncio.get_running_loop()
    turns = 0

    def tick() -> None:
        nonlocal turns, ticker
        turns += 1
        ticker = loop.call_soon(tick)

    ticker = loop.call_soon(tick)
    recording.turn = lambda: turns
    try:
        await write(kv, a=b"1")
    finally:
        ticker.cancel()
    assert sorted(recording.events) == ["flush done", "flush sent", "write done", "write sent"]
    assert recording.turns["flush sent"] == recording.turns["write sent"]
    await assert_a_taker_over_reads(url, b"a", b"1")


async def test_a_write_held_back_past_its_flush_request_is_still_durable_when_it_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, kv, recording = await recorded_store(tmp_path, monkeypatch, hold_writes=0.05)
    await asyncio.wait_for(write(kv, a=b"1"), timeout=10)
    # The first flush went ahead of the write; a second one, asked for after it, covered it.
    events = recording.events
    assert events[:2] == ["write sent", "flush sent"] and sorted(events[2:4]) == ["flush done", "write done"]
    assert events[4:] == ["flush sent", "flush done"]
    await assert_a_taker_over_reads(url, b"a", b"1")


async def test_close_releases_commits_waiting_for_durability(tmp_path: Path) -> None:
    kv = await SlateDBStore.open((tmp_path / "db").as_uri())
    txn = await kv.begin()
    await txn.put(b"k", b"v")
    durability = await txn.commit(durable=False)
    waits = asyncio.gather(durability.wait(), kv.sync(), durability.wait())
    await asyncio.sleep(0)  # the waits start
    await kv.close()
    await asyncio.wait_for(waits, timeout=10)  # durable: the clean shutdown wrote the WAL


async def test_concurrent_durable_commits_share_write_outs_and_flushes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kv = await SlateDBStore.open((tmp_path / "db").as_uri())
    flushes = 0
    flush = kv._flush

    async def counted(handle: object, requested: object) -> None:
        nonlocal flushes
        flushes += 1
        await flush(handle, requested)

    monkeypatch.setattr(kv, "_flush", counted)
    try:
        await asyncio.wait_for(asyncio.gather(*(write(kv, **{f"k{i}": b"v"}) for i in range(40))), timeout=20)
        assert 1 <= flushes < 40  # group commit: the commits made during one flush share the next
        assert len(await scan_all(kv, b"k")) == 40
    finally:
        await kv.close()


def hold_first_flush(kv: SlateDBStore, monkeypatch: pytest.MonkeyPatch) -> tuple[asyncio.Event, list[int]]:
    """Make ``kv``'s first WAL flush wait for the returned event; the list gets, per flush, the last commit written."""
    release = asyncio.Event()
    flushes: list[int] = []
    flush = kv._flush

    async def first_held(handle: Any, requested: Any) -> None:
        flushes.append(kv._applied)
        if len(flushes) == 1:
            await release.wait()
        await flush(handle, requested)

    monkeypatch.setattr(kv, "_flush", first_held)
    return release, flushes


async def until(condition: Any) -> None:
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition not reached")


async def test_a_small_commit_is_written_and_flushed_while_an_earlier_flush_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kv = await SlateDBStore.open((tmp_path / "db").as_uri())
    release, flushes = hold_first_flush(kv, monkeypatch)
    try:
        first = asyncio.ensure_future(write(kv, a=b"1"))
        await until(lambda: len(flushes) == 1)
        await asyncio.wait_for(write(kv, b=b"2"), timeout=10)
        assert len(flushes) == 2 and flushes[1] > flushes[0]
        # SlateDB writes its WAL in order: the second flush made the first commit durable too.
        await asyncio.wait_for(first, timeout=10)
        assert not release.is_set()
    finally:
        release.set()
        await kv.close()
    reopened = await open_store((tmp_path / "db").as_uri())
    assert (await read(reopened, b"a"), await read(reopened, b"b")) == (b"1", b"2")
    await reopened.close()


async def test_a_large_batch_waits_for_the_running_flush(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kv = await SlateDBStore.open((tmp_path / "db").as_uri())
    release, flushes = hold_first_flush(kv, monkeypatch)
    try:
        first = asyncio.ensure_future(write(kv, a=b"1"))
        await until(lambda: len(flushes) == 1)
        written = kv._applied
        second = asyncio.ensure_future(write(kv, b=bytes(slatedb_store.PIPELINE_BYTES + 1)))
        third = asyncio.ensure_future(write(kv, c=b"3"))
        await asyncio.sleep(0.05)
        assert kv._applied == written and not second.done()  # left to grow while the flush runs
        release.set()
        await asyncio.wait_for(asyncio.gather(first, second, third), timeout=10)
        assert flushes == [written, written + 2]  # the two later commits: one write, one flush
    finally:
        release.set()
        await kv.close()


@pytest.mark.parametrize("turns", [slatedb_store.GATHER_TURNS, 0])
async def test_a_write_out_gathers_the_commits_of_tasks_already_woken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, turns: int
) -> None:
    """What a task woken with the committer commits a loop turn later shares the write (with GATHER_TURNS)."""
    monkeypatch.setattr(slatedb_store, "GATHER_TURNS", turns)
    kv = await SlateDBStore.open((tmp_path / "db").as_uri())
    batches: list[int] = []
    write_unwritten = kv._write_unwritten

    async def counted() -> None:
        batches.append(len(kv._unwritten))
        await write_unwritten()

    monkeypatch.setattr(kv, "_write_unwritten", counted)

    async def woken_with_it() -> None:
        await asyncio.sleep(0)
        await write(kv, b=b"2")

    try:
        await write(kv, z=b"0")  # a first write-out; the test looks at the next
        follower = asyncio.ensure_future(woken_with_it())
        await write(kv, a=b"1")
        await asyncio.wait_for(follower, timeout=10)
        assert batches[1:] == ([2] if turns else [1, 1])
    finally:
        await kv.close()


async def test_a_cancelled_close_still_closes_and_releases_every_waiter(tmp_path: Path) -> None:
    url = (tmp_path / "db").as_uri()
    kv = await SlateDBStore.open(url)

    returned: set[bytes] = set()

    async def committer(i: int) -> str:
        n = 0
        while True:
            try:
                await write(kv, **{f"k{i}-{n}": b"v"})
            except StoreClosed:
                return "closed"
            returned.add(f"k{i}-{n}".encode())
            n += 1

    committers = [asyncio.ensure_future(committer(i)) for i in range(16)]
    while len(returned) < 16 or kv._write_out is None:  # some commits returned, a write-out under way
        await asyncio.sleep(0)
    await close_with_a_cancelled_first_try(kv)
    assert await asyncio.wait_for(asyncio.gather(*committers), timeout=10) == ["closed"] * 16
    reopened = await open_store(url)
    landed = {k for k, _ in await scan_all(reopened, b"k")}
    await reopened.close()
    assert returned and returned <= landed  # every commit that returned durable is there


async def test_second_writer_fences_the_first(tmp_path: Path) -> None:
    url = (tmp_path / "db").as_uri()
    first = await SlateDBStore.open(url)
    await write(first, k=b"first")
    second = await SlateDBStore.open(url)
    txn = await first.begin()
    await txn.put(b"k", b"stale")
    with pytest.raises(StoreFenced, match=str(tmp_path)):
        await txn.commit()
    with pytest.raises(StoreFenced):
        await first.begin()
    await first.close()  # a fenced store closes quietly
    assert await read(second, b"k") == b"first"
    await write(second, k=b"second")
    assert await read(second, b"k") == b"second"
    await second.close()


async def test_an_object_store_outage_delays_durable_commits_and_loses_none(
    s3_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # s3_url sets the AWS variables; this test runs a server of its own, which it stops.
    with moto_s3("taquba-outage") as s3:
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
        url = f"s3://{s3.bucket}/outage"
        kv = await open_store(url)
        await write(kv, a=b"1")
        monkeypatch.setattr(slatedb_store, "SLOW_FLUSH_WARNING_S", 1.0)
        s3.stop()
        try:
            txn = await kv.begin()
            await txn.put(b"b", b"2")
            commit = asyncio.ensure_future(txn.commit())
            await asyncio.sleep(2)
            assert not commit.done()  # SlateDB retries: the commit is not reported durable meanwhile
            assert await read(kv, b"b") == b"2"  # reads are answered in process
            assert "has waited 1 s for the object store" in caplog.text
        finally:
            s3.restart()
        await asyncio.wait_for(commit, timeout=60)
        assert "went through after" in caplog.text
        await write(kv, c=b"3")
        await kv.close()
        reopened = await open_store(url)
        assert [await read(reopened, k) for k in (b"a", b"b", b"c")] == [b"1", b"2", b"3"]
        await reopened.close()


async def test_s3_round_trip(s3_url: str) -> None:
    kv = await open_store(s3_url)
    assert isinstance(kv, SlateDBStore)
    txn = await kv.begin()
    await txn.put(b"k", b"v")
    await txn.merge_counter(b"n", 2)
    await txn.commit()
    await kv.close()
    reopened = await open_store(s3_url)
    assert await read(reopened, b"k") == b"v"
    assert decode_counter(await read(reopened, b"n")) == 2
    await reopened.close()


# -- URLs ----------------------------------------------------------------------------


async def test_open_store_dispatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kv = await open_store("inmemory://")
    assert isinstance(kv, MemoryStore)
    await kv.close()
    kv = await open_store("memory://?flush_interval_ms=1")
    assert isinstance(kv, SlateDBStore)
    await kv.close()
    monkeypatch.chdir(tmp_path)
    kv = await open_store("relative/dir")
    assert isinstance(kv, SlateDBStore)
    assert kv.url == (tmp_path / "relative" / "dir").as_uri()
    assert (tmp_path / "relative" / "dir").is_dir()
    await write(kv, k=b"v")
    await kv.close()
    kv = await open_store(str(tmp_path / "relative" / "dir"))
    assert await read(kv, b"k") == b"v"
    await kv.close()


def test_slatedb_url_forms() -> None:
    assert parse_slatedb_url("s3://bucket").path == "taquba"
    s3 = parse_slatedb_url("s3://bucket/a/b/?flush_interval_ms=20")
    assert (s3.bucket, s3.path, s3.flush_interval_ms) == ("bucket", "a/b", 20)
    assert parse_slatedb_url("gs://b/p").flush_interval_ms == 50
    assert parse_slatedb_url("az://container").bucket == "container"
    local = parse_slatedb_url("file:///tmp/some%20dir/")
    assert (local.path, local.flush_interval_ms) == ("/tmp/some dir", 5)
    assert parse_slatedb_url("file://localhost/tmp/x").path == "/tmp/x"


@pytest.mark.parametrize(
    "url",
    [
        "",
        "ftp://host/x",
        "file://relative/dir",
        "file:///",
        "file:relative",
        "s3://",
        "s3:///prefix",
        "s3:bucket",
        "s3://user:pw@bucket/p",
        "s3://bucket:9000/p",
        "s3://bucket:/p",
        "memory://?flush_interval_ms=\u00b2",
        "gs://",
        "memory://somewhere",
        "memory://?flush_interval_ms=0",
        "memory://?flush_interval_ms=fast",
        "memory://?flush_interval_ms=5&flush_interval_ms=6",
        "memory://?flush=5",
        "memory://#frag",
        "inmemory://x",
        "inmemory:",
    ],
)
async def test_invalid_urls(url: str) -> None:
    with pytest.raises(InvalidStoreUrl) as info:
        await open_store(url)
    assert repr(url) in str(info.value)


# -- MemoryStore specifics: pruning, fault injection, model check --------------------


async def test_memory_prunes_versions_nobody_sees() -> None:
    kv = MemoryStore()
    for i in range(50):
        await write(kv, k=b"%d" % i)
    assert kv.footprint() == (1, 1)
    old = await kv.begin()
    for i in range(5):
        await write(kv, k=b"new%d" % i, gone=None)
    assert kv.footprint()[1] > 2
    assert await old.get(b"k") == b"49"
    await old.rollback()
    assert kv.footprint() == (1, 1)
    await write(kv, k=None)
    assert kv.footprint() == (0, 0)


async def test_memory_dropped_transaction_stops_pinning_versions() -> None:
    kv = MemoryStore()
    await write(kv, k=b"1")
    forgotten = await kv.begin()
    await write(kv, k=b"2")
    assert kv.footprint() == (1, 2)
    del forgotten
    await write(kv, k=b"3")
    assert kv.footprint() == (1, 1)


async def test_memory_fault_injection() -> None:
    kv = MemoryStore()
    kv.inject_faults(conflicts=1, fail_before_apply=1, fail_after_apply=1)
    await (await kv.begin()).commit()  # read-only commits are never faulted
    with pytest.raises(StoreConflict):
        await write(kv, a=b"1")
    with pytest.raises(StoreError) as before:
        await write(kv, b=b"1")
    assert not isinstance(before.value, StoreConflict)
    with pytest.raises(StoreError):
        await write(kv, c=b"1")
    await write(kv, d=b"1")
    assert [await read(kv, k) for k in (b"a", b"b", b"c", b"d")] == [None, None, b"1", b"1"]

    plan = kv.inject_faults(FaultPlan(fail_before_apply=1, matches=lambda ks: b"target" in ks))
    await write(kv, other=b"1")
    with pytest.raises(StoreError):
        await write(kv, target=b"1")
    assert plan.fail_before_apply == 0
    await write(kv, target=b"2")
    assert await read(kv, b"target") == b"2"


@pytest.mark.parametrize("url", ["inmemory://", "memory://"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    committed=st.dictionaries(st.sampled_from([b"a", b"a:", b"a:a", b"ab", b"b", b"\xff", b"a\xff"]), st.binary(max_size=2)),
    ops=st.lists(
        st.tuples(st.sampled_from(["put", "delete"]), st.sampled_from([b"a", b"a:", b"a:b", b"b:", b"\xff\xff"]), st.binary(max_size=2))
        | st.tuples(st.just("merge"), st.sampled_from([b"a:c", b"c"]), st.integers(-3, 3)),
        max_size=8,
    ),
    prefix=st.sampled_from([b"", b"a", b"a:", b"b", b"\xff"]),
    start_after=st.none() | st.sampled_from([b"", b"a", b"a:", b"a:a", b"b", b"\xff"]),
    end=st.none() | st.sampled_from([b"", b"a:", b"a:b", b"ab", b"b", b"\xff\xff\xff"]),
    limit=st.none() | st.integers(min_value=0, max_value=4),
)
# A limit reached while buffered deletes hide committed rows; buffered keys past the last row read.
@example(committed={b"a": b"1", b"a:": b"2", b"a:a": b"3"}, ops=[("delete", b"a", b"")], prefix=b"a",
         start_after=None, end=None, limit=2)
@example(committed={b"a": b"1", b"a:a": b"3"}, ops=[("put", b"a:b", b"4"), ("merge", b"c", 2)], prefix=b"",
         start_after=None, end=None, limit=2)
def test_scan_with_own_writes_matches_a_dict_model(
    url: str,
    committed: dict[bytes, bytes],
    ops: list[tuple[str, bytes, Any]],
    prefix: bytes,
    start_after: bytes | None,
    end: bytes | None,
    limit: int | None,
) -> None:
    """A scan lays the transaction's puts, deletes and merges over the committed rows, on every store."""

    async def run() -> list[tuple[bytes, bytes]]:
        kv = await open_store(url)
        try:
            txn = await kv.begin()
            for key, value in committed.items():
                await txn.put(key, value)
            await txn.commit()
            txn = await kv.begin()
            for op, key, value in ops:
                if op == "merge":
                    await txn.merge_counter(key, value)
                else:
                    await (txn.put(key, value) if op == "put" else txn.delete(key))
            return await txn.scan(prefix, start_after=start_after, end=end, limit=limit)
        finally:
            await kv.close()

    model = dict(committed)
    for op, key, value in ops:
        if op == "put":
            model[key] = value
        elif op == "merge":
            model[key] = COUNTER.pack(decode_counter(model.get(key)) + value)
        else:
            model.pop(key, None)
    expected = [
        (k, v)
        for k, v in sorted(model.items())
        if k.startswith(prefix) and (start_after is None or k > start_after) and (end is None or k < end)
    ][:limit]
    assert asyncio.run(run()) == expected
