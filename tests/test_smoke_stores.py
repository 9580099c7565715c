"""The lifecycle smoke test on persistent stores: local directory and S3 (moto)."""

from __future__ import annotations

import pytest

from taquba_backends import open_store
from taquba_core import JobStatus, Queue, QueueConfig

from queue_helpers import check_invariants


async def _lifecycle(url: str) -> None:
    config = QueueConfig(backoff_base=0)
    queue = await Queue.open(await open_store(url), config=config, background=False)
    ok = await queue.enqueue("smoke", b"ok")
    fail = await queue.enqueue("smoke", b"fail")
    first = await queue.claim("smoke")
    assert first is not None and first.id == ok
    await queue.ack(first)
    second = await queue.claim("smoke")
    assert second is not None and second.id == fail
    retried = await queue.nack(second, "boom")
    assert retried.status is JobStatus.PENDING and retried.last_error == "boom"
    await queue.close()

    reopened = await Queue.open(await open_store(url), config=config, background=False)
    try:
        again = await reopened.claim("smoke")
        assert again is not None and again.id == fail and again.attempts == 2
        dead = await reopened.dead_letter(again, "permanent")
        assert dead.status is JobStatus.DEAD
        stats = await reopened.stats("smoke")
        assert (stats.pending, stats.claimed, stats.done, stats.dead) == (0, 0, 1, 1)
        await check_invariants(reopened.store)
    finally:
        await reopened.close()


async def test_lifecycle_on_local_directory(tmp_path) -> None:
    await _lifecycle(f"file://{tmp_path / 'store'}")


async def test_lifecycle_on_plain_path(tmp_path) -> None:
    await _lifecycle(str(tmp_path / "plain"))


@pytest.mark.slow
async def test_lifecycle_on_s3(s3_url: str) -> None:
    await _lifecycle(s3_url)
