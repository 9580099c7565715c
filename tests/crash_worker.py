"""A worker process for tests/test_crash.py, meant to be killed with SIGKILL.

Usage: python crash_worker.py STORE_URL N

Opens the store, enqueues N jobs (payloads ``b"%05d" % i``) unless an earlier
run already did (a KV marker committed in the same transaction as the batch
makes that exactly-once), prints ``started``, then works through the queue
acking each job with the KV write ``done/<payload> = 1``.  Prints
``finished`` and exits when nothing is left.
"""

from __future__ import annotations

import asyncio
import sys

from taquba_backends import open_store
from taquba_core import AckWith, Queue, QueueConfig, run_worker_concurrent

QUEUE = "crash"
MARKER = b"crash-test/enqueued"


async def main(url: str, n: int) -> None:
    queue = await Queue.open(
        await open_store(url), config=QueueConfig(max_attempts=5, lease=30), reap_interval=0.5
    )
    async with queue:
        if await queue.kv_get(MARKER) is None:
            await queue.enqueue_batch(QUEUE, [b"%05d" % i for i in range(n)], kv_writes={MARKER: b"1"})
        print("started", flush=True)

        async def handler(job):
            return AckWith(kv_writes={b"done/" + job.payload: b"1"})

        shutdown = asyncio.Event()

        async def watch() -> None:
            while True:
                s = await queue.stats(QUEUE)
                if s.pending + s.scheduled + s.claimed == 0:
                    shutdown.set()
                    return
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        stats = await run_worker_concurrent(
            queue, QUEUE, handler, concurrency=64, poll_interval=0.1, shutdown=shutdown
        )
        await watcher
        print(f"finished acked={stats.acked}", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
