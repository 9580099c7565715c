"""Read-only views: they see the writer's durable state, refuse writes, and never fence."""

from __future__ import annotations

import asyncio

import pytest

from taquba_backends import open_store
from taquba_core import InvalidStoreUrl, Queue, ReadOnlyStore, StoreError, keys

from queue_helpers import dump_store


async def test_reader_sees_durable_state_and_refuses_writes(tmp_path) -> None:
    url = f"file://{tmp_path / 'store'}"
    writer = await Queue.open(await open_store(url), background=False)
    try:
        job = await writer.enqueue("q", b"payload")
        before = await dump_store(writer.store)
        reader = await Queue.open(await open_store(url, read_only=True))
        try:
            assert (await reader.get_job(job)).payload == b"payload"
            assert (await reader.stats("q")).pending == 1
            with pytest.raises(ReadOnlyStore, match="read-only"):
                await reader.enqueue("q", b"more")
            with pytest.raises(ReadOnlyStore):
                await reader.kv_put(b"k", b"v")
        finally:
            await reader.close()
        assert await dump_store(writer.store) == before
        await writer.enqueue("q", b"writer still writes")
    finally:
        await writer.close()


async def test_reading_a_missing_store_creates_nothing(tmp_path) -> None:
    with pytest.raises(StoreError, match="no store at"):
        await open_store(str(tmp_path / "nothing"), read_only=True)
    assert not (tmp_path / "nothing").exists()


@pytest.mark.parametrize("url", ["memory://", "inmemory://"])
async def test_read_only_needs_a_persistent_store(url: str) -> None:
    with pytest.raises(InvalidStoreUrl, match="persistent"):
        await open_store(url, read_only=True)


async def test_a_dedup_hit_returns_only_once_the_job_it_names_is_durable(tmp_path) -> None:
    # The hit reads the first enqueue's commit, which may not be durable yet;
    # a read-only view sees only durable data.
    url = f"file://{tmp_path / 'store'}"
    queue = await Queue.open(await open_store(url), background=False)
    try:
        for i in range(10):
            first = asyncio.create_task(queue.enqueue_with("q", b"x", dedup_key=f"k{i}"))
            for _ in range(3):
                await asyncio.sleep(0)
            hit = await queue.enqueue_with("q", b"x", dedup_key=f"k{i}")
            view = await open_store(url, read_only=True)
            try:
                txn = await view.begin()
                assert await txn.get(keys.jobindex_key(hit.id)) is not None, f"round {i}: {hit}"
            finally:
                await view.close()
            assert (await first).id == hit.id
    finally:
        await queue.close()
