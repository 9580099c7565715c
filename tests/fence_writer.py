"""The second writer for tests/test_fencing.py: opens a store another process is writing.

Usage: python fence_writer.py STORE_URL

Opens the store (which fences the first writer) and a queue on it (which
re-queues the first writer's claims), checks the design's invariants on
what it sees, enqueues one job, and prints one JSON line with the stats and
the invariant check.  Then it waits for a line on stdin; on ``stop`` it
checks the invariants again, prints a second JSON line and closes.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from model import check_dump, dump_store

from taquba_backends import open_store
from taquba_core import Queue, QueueConfig

QUEUE = "fence"


async def report(queue: Queue, label: str) -> None:
    try:
        check_dump(await dump_store(queue.store))
        invariants = "ok"
    except AssertionError as exc:  # reported, not raised: the test shows it
        invariants = f"violated: {exc}"
    s = await queue.stats(QUEUE)
    print(
        json.dumps({"at": label, "invariants": invariants, "pending": s.pending, "claimed": s.claimed,
                    "done": s.done, "dead": s.dead}),
        flush=True,
    )


async def main(url: str) -> None:
    queue = await Queue.open(await open_store(url), config=QueueConfig(max_attempts=5), background=False)
    async with queue:
        await queue.enqueue(QUEUE, b"from the second writer")
        await report(queue, "opened")
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        await report(queue, "closing")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
