"""Memory: peak RSS while enqueueing ``n`` jobs in batches and draining them with 16 workers.

Runs in a child process on SlateDB in a local directory (``file://``).
Phase 1 enqueues every job with ``enqueue_batch`` (so the whole backlog is
pending at once), phase 2 drains it with ``run_worker_concurrent`` at
concurrency 16.  RSS is sampled every 20 ms; the peak is the kernel's
high-water mark (VmHWM) of the process, which includes the interpreter,
the imports and SlateDB's caches.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from .common import child_main, peak_rss_mb, temp_dir


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def measure(n: int, batch: int, workers: int, payload: int) -> dict[str, Any]:
    from taquba_backends import open_store
    from taquba_core import Queue, run_worker_concurrent

    samples: list[tuple[str, float]] = []
    phase = "open"

    async def sampler() -> None:
        while True:
            samples.append((phase, rss_mb()))
            await asyncio.sleep(0.02)

    with temp_dir("bench-mem-") as tmp:
        baseline = rss_mb()
        watcher = asyncio.create_task(sampler())
        queue = await Queue.open(await open_store(Path(tmp, "store").as_uri()))
        opened = rss_mb()
        data = os.urandom(payload)
        phase = "enqueue"
        t0 = time.perf_counter()
        for start in range(0, n, batch):
            await queue.enqueue_batch("mem", [data] * min(batch, n - start))
        enqueue_s = time.perf_counter() - t0
        after_enqueue = rss_mb()
        phase = "drain"
        done = asyncio.Event()
        count = 0

        async def handler(job: Any) -> None:
            nonlocal count
            count += 1
            if count == n:
                done.set()

        stop = asyncio.Event()
        t1 = time.perf_counter()
        worker = asyncio.create_task(run_worker_concurrent(queue, "mem", handler, concurrency=workers, shutdown=stop))
        await asyncio.wait_for(done.wait(), timeout=1200)
        stop.set()
        await worker
        drain_s = time.perf_counter() - t1
        stats = await queue.stats("mem")
        assert stats.pending == 0 and stats.claimed == 0 and stats.done == n, stats
        await queue.close()
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    peak = {p: max((v for ph, v in samples if ph == p), default=float("nan")) for p in ("enqueue", "drain")}
    return {
        "baseline_mb": baseline,
        "opened_mb": opened,
        "after_enqueue_mb": after_enqueue,
        "peak_enqueue_mb": peak["enqueue"],
        "peak_drain_mb": peak["drain"],
        "peak_rss_mb": peak_rss_mb(),
        "enqueue_s": enqueue_s,
        "drain_s": drain_s,
        "drain_jobs_per_s": n / drain_s,
    }


def handle(n: int, batch: int = 1000, workers: int = 16, payload: int = 64) -> dict[str, Any]:
    return asyncio.run(measure(n, batch, workers, payload))


if __name__ == "__main__":
    child_main(handle)
