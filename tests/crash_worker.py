"""A worker process for tests/test_crash.py, meant to be killed with SIGKILL.

Usage: python crash_worker.py STORE_URL N

Opens the store, enqueues N jobs (payloads ``b"%05d" % i``) unless an earlier
run already did (a KV marker committed in the same transaction as the batch
makes that exactly-once), prints ``started``, then works through the queue
acking each job with the KV write ``done/<payload> = 1``.  Prints
``finished`` and exits when nothing is left.

Usage: python crash_worker.py --mixed STORE_URL SEED TOTAL

A producer and a worker in one process: four producer tasks enqueue
``TOTAL`` payloads (plain enqueues, options, dedup keys, small batches) while
a concurrent worker processes them.  After each enqueue call *returns*, the
producer prints ``enq <id> [<id> ...]`` (flushed), so whoever kills this
process knows which enqueues returned.  The handler fails the first attempt
of payloads starting with ``fail-`` (a retry at once) and acks every other
delivery with the KV write ``done/<job id> = b"<attempts> <payload>"``, in the
same commit.
"""

from __future__ import annotations

import asyncio
import random
import sys

from taquba_backends import open_store
from taquba_core import AckWith, Queue, QueueConfig, WorkerStats, run_worker_concurrent

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
        stats = await drain(queue, ack_payload, concurrency=64)
        print(f"finished acked={stats.acked}", flush=True)


async def ack_payload(job):
    """Ack with ``done/<payload> = 1`` in the same commit."""
    return AckWith(kv_writes={b"done/" + job.payload: b"1"})


MIXED_CONFIG = QueueConfig(max_attempts=10, lease=30, backoff_base=0)
PRODUCERS = 4


async def mixed_handler(job):
    """Fail the first attempt of ``fail-`` payloads; ack the rest with ``done/<id> = "<attempts> <payload>"``."""
    await asyncio.sleep(0)
    if job.payload.startswith(b"fail-") and job.attempts == 1:
        raise RuntimeError("the first attempt of this job fails on purpose")
    return AckWith(kv_writes={b"done/" + job.id.encode(): b"%d %s" % (job.attempts, job.payload)})


async def drain(queue: Queue, handler=mixed_handler, concurrency: int = 16, until=None) -> WorkerStats:
    """Work ``QUEUE`` until ``until`` (an awaitable) is done and no job is pending, scheduled or claimed."""
    shutdown = asyncio.Event()

    async def watch() -> None:
        if until is not None:
            await until
        while True:
            s = await queue.stats(QUEUE)
            if s.pending + s.scheduled + s.claimed == 0:
                shutdown.set()
                return
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    stats = await run_worker_concurrent(
        queue, QUEUE, handler, concurrency=concurrency, poll_interval=0.05, shutdown=shutdown
    )
    await watcher
    return stats


async def mixed(url: str, seed: int, total: int) -> None:
    rng = random.Random(seed)
    queue = await Queue.open(
        await open_store(url), config=MIXED_CONFIG, promote_interval=0.02, reap_interval=0.5
    )
    async with queue:
        print("started", flush=True)

        async def produce(first: int) -> None:
            for i in range(first, total, PRODUCERS):
                payload = (b"fail-" if rng.random() < 0.1 else b"ok-") + b"%06d" % i
                kind = rng.random()
                if kind < 0.5:
                    ids = [await queue.enqueue(QUEUE, payload)]
                elif kind < 0.85:
                    result = await queue.enqueue_with(
                        QUEUE,
                        payload,
                        priority=rng.choice([100, 1000, 10000]),
                        delay=rng.choice([None, None, 0.03]),
                        dedup_key=rng.choice([None, None, f"d{i % 20}"]),
                        headers={"n": str(i)},
                    )
                    ids = [result.id]
                else:
                    ids = await queue.enqueue_batch(QUEUE, [payload + b"-%d" % j for j in range(3)])
                print("enq " + " ".join(ids), flush=True)

        producers = asyncio.gather(*(produce(n) for n in range(PRODUCERS)))
        await drain(queue, until=producers)
        await producers
        print("finished", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--mixed":
        asyncio.run(mixed(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
    else:
        asyncio.run(main(sys.argv[1], int(sys.argv[2])))
