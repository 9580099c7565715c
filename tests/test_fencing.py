"""Fencing: a second writer process opens the same file:// store.

The first writer's next write fails with the typed ``StoreFenced`` error,
its worker loop stops with a clear log line, every later call fails the same
way, and the second writer sees a store on which the invariants hold (the
first writer's claims re-queued, nothing lost).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path

import pytest
from model import check_dump, dump_store

from taquba_backends import open_store
from taquba_core import (
    AckWith,
    JobStatus,
    Queue,
    QueueConfig,
    StoreFenced,
    keys,
    run_worker_concurrent,
)

WRITER = Path(__file__).with_name("fence_writer.py")
QUEUE = "fence"
N = 2000  # enough work that the worker is still busy (and writing) when the second writer arrives


@pytest.mark.slow
async def test_second_writer_process_fences_the_first(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="taquba")
    url = f"file://{tmp_path / 'store'}"
    first = await Queue.open(
        await open_store(url), config=QueueConfig(max_attempts=5, lease=30), promote_interval=0.05, reap_interval=0.1
    )
    ids = await first.enqueue_batch(QUEUE, [b"%04d" % i for i in range(N)])
    acked: list[str] = []

    async def handler(job):  # slow enough that the worker is busy when the second writer arrives
        await asyncio.sleep(0.02)
        acked.append(job.id)
        return AckWith(kv_writes={b"done/" + job.id.encode(): b"1"})

    worker = asyncio.create_task(run_worker_concurrent(first, QUEUE, handler, concurrency=4, poll_interval=0.05))
    while len(acked) < 10:
        await asyncio.sleep(0.01)

    second = await asyncio.create_subprocess_exec(
        sys.executable, str(WRITER), url,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        line = await asyncio.wait_for(second.stdout.readline(), 60)
        assert line, (await second.stderr.read()).decode()[-2000:]
        opened = json.loads(line)
        assert opened["invariants"] == "ok", opened
        assert opened["claimed"] == 0  # the first writer's claims were re-queued at open

        # The first writer's next write fails, typed; its worker loop stops.
        with pytest.raises(StoreFenced, match="another writer"):
            await asyncio.wait_for(worker, 30)
        stopped = [r for r in caplog.records if "worker for queue 'fence' stopped" in r.getMessage()]
        assert stopped and stopped[0].levelno == logging.ERROR
        assert "opened by another writer" in stopped[0].getMessage()
        for call in (
            lambda: first.enqueue(QUEUE, b"late"),
            lambda: first.claim(QUEUE),
            lambda: first.kv_put(b"k", b"v"),
        ):
            with pytest.raises(StoreFenced) as info:
                await call()
            assert info.value.is_permanent
        await first.close()  # a fenced queue closes quietly

        second.stdin.write(b"stop\n")
        await second.stdin.drain()
        closing = json.loads(await asyncio.wait_for(second.stdout.readline(), 60))
        assert closing["invariants"] == "ok", closing
        assert await asyncio.wait_for(second.wait(), 60) == 0
    finally:
        if second.returncode is None:
            second.kill()
            await second.wait()
        if not first.closed:
            await first.close()

    # What the second writer left: nothing lost, nothing acked twice.
    store = await open_store(url)
    try:
        dump = await dump_store(store)
    finally:
        await store.close()
    stored = check_dump(dump)
    done = {k[len(keys.user_key(b"done/")):].decode() for k in dump if k.startswith(keys.user_key(b"done/"))}
    assert all(job.status is JobStatus.PENDING for job in stored.values()), "after recovery every job not done waits"
    pending = set(stored)
    assert set(ids) <= done | pending, "a job of the first writer was lost"
    assert not done & pending
    assert len(pending) == N - len(done) + 1  # plus the second writer's job
    assert done <= set(acked)  # every done marker came from a handler run of the first writer
    print(f"first writer acked {len(done)} jobs before it was fenced; {len(pending)} pending for the second")


async def test_an_idle_worker_stops_when_another_writer_takes_the_store(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker with nothing to do never writes; the background sweeps notice the
    takeover and the worker stops instead of idling on a store it may not write."""
    caplog.set_level(logging.INFO, logger="taquba")
    url = f"file://{tmp_path / 'store'}"
    first = await Queue.open(await open_store(url), promote_interval=0.05, reap_interval=0.05)
    try:

        async def handler(job: object) -> None:
            return None

        worker = asyncio.create_task(run_worker_concurrent(first, QUEUE, handler, poll_interval=30))
        await asyncio.sleep(0.2)  # idle: the queue is empty
        second = await open_store(url)  # another writer (in this process, for speed)
        try:
            with pytest.raises(StoreFenced):
                await asyncio.wait_for(worker, timeout=20)
            with pytest.raises(StoreFenced):
                await first.claim(QUEUE)
        finally:
            await second.close()
    finally:
        await first.close()
    assert any("can no longer write" in r.getMessage() for r in caplog.records)
