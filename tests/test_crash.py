"""Crash safety: SIGKILL a worker process mid-work, recover in-process, lose nothing.

Set ``TAQUBA_CRASH_SEED`` to replay a run; the seed is printed (shown on failure).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from pathlib import Path

import pytest

from queue_helpers import check_invariants, dump_store, space_keys
from taquba_backends import open_store
from taquba_core import AckWith, Queue, QueueConfig, keys, run_worker_concurrent
from taquba_core.kv import decode_counter
from taquba_core.record import decode_record

N = 2000
QUEUE = "crash"
SCRIPT = Path(__file__).with_name("crash_worker.py")


def done_payloads(dump: dict[bytes, bytes]) -> set[bytes]:
    prefix = keys.user_key(b"done/")
    return {k[len(prefix):] for k in dump if k.startswith(prefix)}


def payloads_in(dump: dict[bytes, bytes], space: bytes) -> set[bytes]:
    return {decode_record(dump[k], k).payload for k in space_keys(dump, space)}


@pytest.mark.slow
async def test_sigkill_mid_work_loses_nothing(tmp_path: Path) -> None:
    seed = int(os.environ.get("TAQUBA_CRASH_SEED", random.randrange(2**32)))
    print(f"crash test seed: {seed} (TAQUBA_CRASH_SEED={seed} replays it)")
    kill_after = random.Random(seed).uniform(0.3, 2.0)
    url = f"file://{tmp_path / 'store'}"

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        url,
        str(N),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        if line.strip() != b"started":
            err = await proc.stderr.read()
            pytest.fail(f"worker did not start (seed {seed}): {line!r} {err.decode()[-2000:]}")
        await asyncio.sleep(kill_after)
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    rest = await proc.stdout.read()
    assert proc.returncode in (0, -signal.SIGKILL), (seed, proc.returncode, (await proc.stderr.read())[-2000:])
    print(f"killed after {kill_after:.2f}s, return code {proc.returncode}, output {rest!r}")

    queue = await Queue.open(await open_store(url), config=QueueConfig(max_attempts=5), reap_interval=0.5)
    async with queue:
        # Recovery ran inside open: no claim survives, and no job whose done
        # marker was committed is still around (ack and marker are one commit).
        dump = await check_invariants(queue.store)
        assert not space_keys(dump, keys.CLAIMED), seed
        done_before = done_payloads(dump)
        assert not done_before & payloads_in(dump, keys.PENDING), seed
        assert decode_counter(dump.get(keys.stats_key(QUEUE, "done"))) == len(done_before), seed
        assert await queue.kv_get(b"crash-test/enqueued") == b"1"
        recovered = [
            job for k in space_keys(dump, keys.PENDING) if (job := decode_record(dump[k], k)).attempts > 0
        ]
        assert all(j.last_error and "interrupted" in j.last_error for j in recovered), seed
        print(f"done by the killed process: {len(done_before)}, claims recovered at open: {len(recovered)}")

        shutdown = asyncio.Event()

        async def handler(job):
            return AckWith(kv_writes={b"done/" + job.payload: b"1"})

        async def watch() -> None:
            while True:
                s = await queue.stats(QUEUE)
                if s.pending + s.scheduled + s.claimed == 0:
                    shutdown.set()
                    return
                await asyncio.sleep(0.02)

        watcher = asyncio.create_task(watch())
        await asyncio.wait_for(
            run_worker_concurrent(queue, QUEUE, handler, concurrency=64, poll_interval=0.1, shutdown=shutdown),
            60,
        )
        await watcher

        dump = await check_invariants(queue.store)
        assert done_payloads(dump) == {b"%05d" % i for i in range(N)}, seed
        for space in (keys.PENDING, keys.SCHEDULED, keys.CLAIMED, keys.DEAD):
            assert space_keys(dump, space) == [], (seed, space)
        counters = {m: decode_counter(dump.get(keys.stats_key(QUEUE, m))) for m in ("pending", "scheduled", "claimed", "dead")}
        spaces = {"pending": keys.PENDING, "scheduled": keys.SCHEDULED, "claimed": keys.CLAIMED, "dead": keys.DEAD}
        for metric, space in spaces.items():
            assert counters[metric] == len(space_keys(dump, space)), (seed, metric)
        done = decode_counter(dump.get(keys.stats_key(QUEUE, "done")))
        assert done >= N, seed
        assert done == N, (seed, done)  # each job acked exactly once: an ack needs the claim it removes
        for key in space_keys(dump, keys.JOBINDEX):
            assert dump[key] in dump, (seed, key)
        assert space_keys(dump, keys.JOBINDEX) == []  # acked jobs are not kept
        stats = await queue.stats(QUEUE)
        assert (stats.pending, stats.scheduled, stats.claimed, stats.done, stats.dead) == (0, 0, 0, N, 0)
    assert dump == await _reopened_dump(url)


async def _reopened_dump(url: str) -> dict[bytes, bytes]:
    """The store's contents as a fresh open sees them (everything above was durable)."""
    store = await open_store(url)
    try:
        return await dump_store(store)
    finally:
        await store.close()
