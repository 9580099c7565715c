"""Throughput and latency: taquba end to end, the engine ceiling, and the peers.

Each measurement runs in a child process of its own (``python -m
benchmarks.bench_throughput`` with JSON arguments on stdin), on a fresh store,
so that runs do not share caches, memory or the FFI set-up.

* ``taquba``: ``conc`` producer tasks enqueue ``n`` jobs one ``enqueue`` call
  each, while ``run_worker_concurrent(concurrency=conc)`` claims and acks them
  with a no-op handler, all in one event loop.  Every returned enqueue and
  ack is durable (SlateDB: the WAL write reached the object store).  jobs/s is
  ``n`` over the time from the first enqueue to the last ack.  Latencies:
  enqueue (per call), claim (per ``claim_batch`` call that returned jobs),
  ack (per call), enqueue-to-ack (per job).
* ``ceiling``: the raw ``slatedb.uniffi`` binding, ``conc`` tasks each
  committing durable transactions of the enqueue's shape (record put, index
  put, counter merge excluded from conflicts) with the same settings and
  record size: commits/s.  ``fast`` selects taquba's FFI fast path
  (taquba_backends/_uniffi_fast.py) or the binding as shipped.
* ``huey``: huey with its SQLite storage, ``fsync=True`` (synchronous=FULL,
  WAL journal), results stored; ``conc`` producer threads and a consumer
  with ``conc`` worker threads in the same process.  Done = huey's
  ``SIGNAL_COMPLETE`` (after the result is written).
* ``procrastinate``: procrastinate on PostgreSQL (fsync=on,
  synchronous_commit=on); ``conc`` producer tasks and a worker with
  ``concurrency=conc`` in one event loop.  Done = the worker's
  ``finish_job`` returned (the job row is marked succeeded).

The peers expose no per-step claim/ack latency: only enqueue and
enqueue-to-done are reported for them.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import resource
import struct
import threading
import time
from pathlib import Path
from typing import Any

from .common import child_main, peak_rss_mb, percentile, temp_dir

QUEUE = "bench"


def _summary(name: str, values: list[float]) -> dict[str, float]:
    return {f"{name}_p50_ms": percentile(values, 50) * 1000, f"{name}_p99_ms": percentile(values, 99) * 1000}


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# -- taquba --------------------------------------------------------------------------------


async def taquba_e2e(url: str, conc: int, payload: int, n: int) -> dict[str, Any]:
    from taquba_backends import _uniffi_fast, open_store
    from taquba_core import Queue, QueueConfig, run_worker_concurrent

    queue = await Queue.open(await open_store(url), config=QueueConfig(lease=300))
    data = os.urandom(payload)
    enq_start: dict[str, float] = {}
    ack_done: dict[str, float] = {}
    lat_enq: list[float] = []
    lat_claim: list[float] = []
    lat_ack: list[float] = []
    claimed_per_call: list[int] = []
    all_acked = asyncio.Event()

    claim_batch = queue.claim_batch
    ack = queue.ack

    async def timed_claim_batch(name: str, k: int, lease: float | None = None) -> Any:
        start = time.perf_counter()
        jobs = await claim_batch(name, k, lease)
        if jobs:
            lat_claim.append(time.perf_counter() - start)
            claimed_per_call.append(len(jobs))
        return jobs

    async def timed_ack(job: Any, *, kv_writes: Any = None) -> None:
        start = time.perf_counter()
        await ack(job, kv_writes=kv_writes)
        end = time.perf_counter()
        lat_ack.append(end - start)
        ack_done[job.id] = end
        if len(ack_done) == n:
            all_acked.set()

    queue.claim_batch = timed_claim_batch  # type: ignore[method-assign]
    queue.ack = timed_ack  # type: ignore[method-assign]

    async def handler(job: Any) -> None:
        return None

    counter = itertools.count()

    async def producer() -> None:
        while next(counter) < n:
            start = time.perf_counter()
            job_id = await queue.enqueue(QUEUE, data)
            lat_enq.append(time.perf_counter() - start)
            enq_start[job_id] = start

    stop = asyncio.Event()
    cpu0, thread0 = _cpu(), time.thread_time()
    t0 = time.perf_counter()
    worker = asyncio.create_task(run_worker_concurrent(queue, QUEUE, handler, concurrency=conc, shutdown=stop))
    await asyncio.gather(*(producer() for _ in range(conc)))
    await asyncio.wait_for(all_acked.wait(), timeout=600)
    elapsed = max(ack_done.values()) - t0
    cpu, thread_cpu = _cpu() - cpu0, time.thread_time() - thread0
    stop.set()
    await worker
    stats = await queue.stats(QUEUE)
    assert (stats.pending, stats.claimed, stats.done) == (0, 0, n), stats
    await queue.close()
    e2e = [ack_done[i] - enq_start[i] for i in ack_done]
    return {
        "jobs_per_s": n / elapsed,
        "elapsed_s": elapsed,
        **_summary("enqueue", lat_enq),
        **_summary("claim", lat_claim),
        **_summary("ack", lat_ack),
        **_summary("e2e", e2e),
        "claim_batch_mean": sum(claimed_per_call) / max(len(claimed_per_call), 1),
        "cpu_us_per_job": cpu / n * 1e6,
        "loop_thread_cpu_us_per_job": thread_cpu / n * 1e6,
        "peak_rss_mb": peak_rss_mb(),
        "fast_ffi": _uniffi_fast.installed(),
    }


# -- the engine ceiling ------------------------------------------------------------------------


async def ceiling(url: str, conc: int, payload: int, n: int) -> dict[str, Any]:
    import json

    import slatedb.uniffi as sdb

    from taquba_backends import _uniffi_fast
    from taquba_backends.slatedb_store import CounterMergeOperator, parse_slatedb_url
    from taquba_core import keys
    from taquba_core.ids import new_job_id
    from taquba_core.record import JobRecord, JobStatus, encode_record

    _uniffi_fast.install()  # a no-op with TAQUBA_SLATEDB_FAST_FFI=0: the binding as shipped
    location = parse_slatedb_url(url)
    settings = sdb.Settings.default()
    settings.set("flush_interval", json.dumps(f"{location.flush_interval_ms}ms"))
    if location.scheme == "file":
        os.makedirs(location.path, exist_ok=True)
    builder = sdb.DbBuilder(location.path, location.object_store())
    builder.with_merge_operator(CounterMergeOperator())
    builder.with_settings(settings)
    db = await builder.build()
    now = int(time.time() * 1000)
    # A record of the same size as an enqueued job's.
    sample = JobRecord(id=new_job_id(now), queue=QUEUE, payload=os.urandom(payload), status=JobStatus.PENDING,
                       max_attempts=3, enqueued_at=now, priority=1000)
    record = encode_record(sample)
    stats_key = keys.stats_key(QUEUE, "pending")
    one = struct.pack("<q", 1)
    counter = itertools.count()
    lat: list[float] = []

    async def committer() -> None:
        while next(counter) < n:
            start = time.perf_counter()
            job_id = new_job_id(now)
            key = keys.pending_key(QUEUE, 1000, job_id)
            txn = await db.begin(sdb.IsolationLevel.SNAPSHOT)
            await txn.put(key, record)
            await txn.put(keys.jobindex_key(job_id), key)
            await txn.merge(stats_key, one)
            await txn.unmark_write([stats_key])
            handle = await txn.commit()
            await handle.await_durable()
            lat.append(time.perf_counter() - start)

    cpu0, thread0 = _cpu(), time.thread_time()
    t0 = time.perf_counter()
    await asyncio.gather(*(committer() for _ in range(conc)))
    elapsed = time.perf_counter() - t0
    cpu, thread_cpu = _cpu() - cpu0, time.thread_time() - thread0
    await db.shutdown()
    return {
        "commits_per_s": n / elapsed,
        "elapsed_s": elapsed,
        **_summary("commit", lat),
        "cpu_us_per_commit": cpu / n * 1e6,
        "loop_thread_cpu_us_per_commit": thread_cpu / n * 1e6,
        "record_bytes": len(record),
        "fast_ffi": _uniffi_fast.installed(),
    }


# -- huey --------------------------------------------------------------------------------------


def huey_e2e(conc: int, payload: int, n: int) -> dict[str, Any]:
    import logging

    from huey import SqliteHuey
    from huey.consumer import Consumer
    from huey.signals import SIGNAL_COMPLETE

    logging.getLogger("huey").setLevel(logging.ERROR)
    with temp_dir("bench-huey-") as tmp:
        huey = SqliteHuey("bench", filename=str(Path(tmp) / "huey.db"), fsync=True, results=True)
        data = os.urandom(payload)
        enq_start: dict[int, float] = {}
        done: dict[int, float] = {}
        lat_enq: list[float] = []
        lock = threading.Lock()
        finished = threading.Event()

        @huey.task()
        def job(i: int, payload: bytes) -> int:
            return 1  # a result to store, as taquba's ack stores the outcome

        @huey.signal(SIGNAL_COMPLETE)
        def on_complete(signal: str, task: Any, *args: Any) -> None:
            end = time.perf_counter()
            with lock:
                done[task.args[0]] = end
                if len(done) == n:
                    finished.set()

        consumer = Consumer(
            huey, workers=conc, worker_type="thread", periodic=False,
            initial_delay=0.005, backoff=1.15, max_delay=0.05, check_worker_health=False,
        )
        counter = itertools.count()

        def producer() -> None:
            while True:
                i = next(counter)
                if i >= n:
                    return
                start = time.perf_counter()
                job(i, data)
                end = time.perf_counter()
                with lock:
                    lat_enq.append(end - start)
                    enq_start[i] = start

        cpu0 = _cpu()
        t0 = time.perf_counter()
        consumer.start()
        threads = [threading.Thread(target=producer) for _ in range(conc)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if not finished.wait(timeout=900):
            raise RuntimeError(f"huey finished {len(done)} of {n} jobs")
        elapsed = max(done.values()) - t0
        cpu = _cpu() - cpu0
        consumer.stop(graceful=True)
        e2e = [done[i] - enq_start[i] for i in done]
        return {
            "jobs_per_s": n / elapsed,
            "elapsed_s": elapsed,
            **_summary("enqueue", lat_enq),
            **_summary("e2e", e2e),
            "cpu_us_per_job": cpu / n * 1e6,
            "peak_rss_mb": peak_rss_mb(),
        }


# -- procrastinate -----------------------------------------------------------------------------


async def procrastinate_e2e(conninfo: str, conc: int, payload: int, n: int) -> dict[str, Any]:
    import logging

    import procrastinate

    logging.getLogger("procrastinate").setLevel(logging.ERROR)
    pool = min(conc + 4, 60)
    app = procrastinate.App(
        connector=procrastinate.PsycopgConnector(conninfo=conninfo, min_size=min(4, pool), max_size=pool)
    )
    data = "x" * payload  # a JSON string argument of the payload's size
    enq_start: dict[int, float] = {}
    done: dict[int, float] = {}
    lat_enq: list[float] = []
    finished = asyncio.Event()

    @app.task(queue=QUEUE, name="bench")
    async def job(i: int, payload: str) -> None:
        return None

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        finish_job = app.job_manager.finish_job

        async def timed_finish(job: Any, status: Any, delete_job: bool) -> None:
            await finish_job(job, status, delete_job)
            done[job.task_kwargs["i"]] = time.perf_counter()
            if len(done) == n:
                finished.set()

        app.job_manager.finish_job = timed_finish  # type: ignore[method-assign]
        counter = itertools.count()

        async def producer() -> None:
            while True:
                i = next(counter)
                if i >= n:
                    return
                start = time.perf_counter()
                await job.defer_async(i=i, payload=data)
                lat_enq.append(time.perf_counter() - start)
                enq_start[i] = start

        cpu0 = _cpu()
        t0 = time.perf_counter()
        worker = asyncio.create_task(
            app.run_worker_async(
                queues=[QUEUE], concurrency=conc, wait=True, install_signal_handlers=False,
                listen_notify=True, fetch_job_polling_interval=1.0,
            )
        )
        await asyncio.gather(*(producer() for _ in range(conc)))
        await asyncio.wait_for(finished.wait(), timeout=900)
        elapsed = max(done.values()) - t0
        cpu = _cpu() - cpu0
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
    e2e = [done[i] - enq_start[i] for i in done]
    return {
        "jobs_per_s": n / elapsed,
        "elapsed_s": elapsed,
        **_summary("enqueue", lat_enq),
        **_summary("e2e", e2e),
        "cpu_us_per_job": cpu / n * 1e6,
        "peak_rss_mb": peak_rss_mb(),
        "pool_size": pool,
    }


# -- child entry point -------------------------------------------------------------------------


def _store_url(store: str, tmp: Path) -> str:
    return "memory://" if store == "memory" else Path(tmp, "store").as_uri()


def handle(
    kind: str, conc: int, payload: int, n: int, store: str = "file", conninfo: str = "", loop: str = "run"
) -> dict[str, Any]:
    """One measurement.  ``loop``: ``run`` runs the asyncio programs (taquba, the ceiling,
    procrastinate) through ``taquba_backends.run`` (uvloop when installed, as the README's
    Quick start and the command line do), ``asyncio`` on asyncio's own loop."""
    from taquba_backends import run
    from taquba_backends.eventloop import uses_uvloop

    runner: Any = asyncio.run if loop == "asyncio" else run
    with temp_dir("bench-tp-") as tmp:
        if kind == "taquba":
            result = runner(taquba_e2e(_store_url(store, tmp), conc, payload, n))
        elif kind == "ceiling":
            result = runner(ceiling(_store_url(store, tmp), conc, payload, n))
        elif kind == "procrastinate":
            result = runner(procrastinate_e2e(conninfo, conc, payload, n))
        elif kind == "huey":
            return huey_e2e(conc, payload, n)
        else:
            raise ValueError(f"unknown kind {kind!r}")
    return dict(result, event_loop="uvloop" if runner is run and uses_uvloop() else "asyncio")


if __name__ == "__main__":
    child_main(handle)
