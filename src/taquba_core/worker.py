"""Worker loops: claim jobs, run a handler, settle by its outcome.

The handler is an async (or plain) callable taking the claimed
:class:`~taquba_core.record.JobRecord`:

* it returns → ``ack`` (return :class:`AckWith` to commit caller KV writes
  with the acknowledgement);
* it raises :class:`PermanentFailure` → ``dead_letter`` (no retry);
* it raises anything else → ``nack`` with the error text (retry with backoff
  while attempts are left).

Shutdown is honoured at safe points: no new claim is made once the shutdown
event is set, and jobs in flight finish and settle before the loop returns.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from .errors import CancelRequested, ClaimLost, StoreFenced, TaqubaError
from .queue import Queue
from .record import JobRecord, JobStatus

log = logging.getLogger("taquba.worker")

Handler = Callable[[JobRecord], Awaitable[object] | object]


class PermanentFailure(Exception):
    """Raise from a handler to dead-letter the job at once, without retrying."""


@dataclass(frozen=True)
class AckWith:
    """Return from a handler to ack with caller KV writes in the same commit.

    ``kv_writes`` maps caller keys (bytes) to values (bytes, or ``None`` to
    delete); they are durable exactly when the acknowledgement is.
    """

    kv_writes: Mapping[bytes, bytes | None]


@dataclass
class WorkerStats:
    """What a worker loop did: settlements by kind, and settlements that found their claim gone.

    ``nacked`` counts failures that will be retried; ``dead_lettered`` counts
    both ``PermanentFailure`` and failures that used up the job's attempts.
    """

    acked: int = 0
    nacked: int = 0
    dead_lettered: int = 0
    claims_lost: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def processed(self) -> int:
        return self.acked + self.nacked + self.dead_lettered + self.claims_lost


async def _call(handler: Handler, job: JobRecord) -> object:
    if inspect.iscoroutinefunction(handler):
        return await handler(job)
    result = await asyncio.to_thread(handler, job)
    if inspect.isawaitable(result):
        return await result
    return result


async def _keep_lease(queue: Queue, job: JobRecord, lease: float | None, wait_first: bool = True) -> None:
    """Renew ``job``'s lease at a third of its length while the handler runs.

    A requested cancellation stops renewal quietly: the handler was told
    through ``job.cancellation`` and decides how to stop.  With
    ``wait_first`` false the first renewal happens at once.
    """
    lease_ms = queue.lease_ms(job.queue, lease)
    while True:
        if wait_first:
            await asyncio.sleep(lease_ms / 3000)
        wait_first = True
        try:
            await queue.renew_lease(job, lease)
        except CancelRequested:
            log.info("job %s: cancellation requested; its lease is no longer renewed", job.id)
            return
        except ClaimLost as exc:
            log.warning("job %s: lease no longer renewed: %s", job.id, exc)
            return
        except TaqubaError as exc:
            if exc.is_permanent:
                return
            log.warning("job %s: lease renewal failed, will retry: %s", job.id, exc)


def _count_failure(stats: WorkerStats, job: JobRecord, settled: JobRecord, error: str) -> None:
    """Count and log a nack by what it became: a retry, or a dead letter when attempts ran out."""
    if settled.status is JobStatus.DEAD:
        stats.dead_lettered += 1
        log.warning(
            "job %s of %r dead-lettered after %d/%d attempts: %s",
            job.id, job.queue, job.attempts, job.max_attempts, error,
        )  # fmt: skip
    else:
        stats.nacked += 1
        log.warning("job %s of %r attempt %d/%d failed, will retry: %s", job.id, job.queue, job.attempts, job.max_attempts, error)


async def process_one(
    queue: Queue,
    job: JobRecord,
    handler: Handler,
    stats: WorkerStats,
    lease: float | None = None,
    on_handled: Callable[[], None] | None = None,
) -> None:
    """Run ``handler`` on one claimed job and settle it by the outcome.

    A settlement whose claim is gone (:class:`ClaimLost`) is logged and
    counted; :class:`StoreFenced` propagates.  ``on_handled`` is called once
    the handler has finished, before the settlement is committed.

    The lease is renewed at a third of its length while the handler runs; the
    renewal task is only started when the handler is still running by then.
    """
    loop = asyncio.get_running_loop()
    keeper: asyncio.Task[None] | None = None

    def start_keeper() -> None:
        nonlocal keeper
        keeper = loop.create_task(_keep_lease(queue, job, lease, wait_first=False))

    timer = loop.call_later(queue.lease_ms(job.queue, lease) / 3000, start_keeper)
    try:
        outcome: tuple[str, object] = ("ack", await _call(handler, job))
    except PermanentFailure as exc:
        outcome = ("dead", f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # noqa: BLE001 - any handler failure is a retry
        outcome = ("nack", f"{type(exc).__name__}: {exc}")
    finally:
        timer.cancel()
        if keeper is not None:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
        if on_handled is not None:
            on_handled()
    kind, value = outcome
    try:
        if kind == "ack":
            writes = value.kv_writes if isinstance(value, AckWith) else None
            await queue.ack(job, kv_writes=writes)
            stats.acked += 1
            log.info("job %s of %r acked (attempt %d/%d)", job.id, job.queue, job.attempts, job.max_attempts)
        elif kind == "dead":
            await queue.dead_letter(job, str(value))
            stats.dead_lettered += 1
            log.warning("job %s of %r dead-lettered (permanent failure): %s", job.id, job.queue, value)
        else:
            settled = await queue.nack(job, str(value))
            _count_failure(stats, job, settled, str(value))
    except ClaimLost as exc:
        stats.claims_lost += 1
        log.warning("job %s: settlement skipped: %s", job.id, exc)
    except StoreFenced:
        raise
    except TaqubaError as exc:
        stats.errors.append(str(exc))
        log.error("job %s: settlement failed (the lease will expire and the job retry): %s", job.id, exc)


async def run_worker(
    queue: Queue,
    name: str,
    handler: Handler,
    *,
    poll_interval: float = 1.0,
    shutdown: asyncio.Event | None = None,
    lease: float | None = None,
) -> WorkerStats:
    """Process jobs of queue ``name`` one at a time until ``shutdown`` is set.

    ``poll_interval`` (seconds) bounds each wait for work; wake-ups come from
    in-process notification, so it is a safety net, not a polling rate.
    ``lease`` is the claim lease in seconds (default: the queue's).

    Raises:
        StoreFenced: another writer took the store over; in-flight jobs
            were settled or abandoned to the new writer's recovery.
    """
    return await run_worker_concurrent(
        queue, name, handler, concurrency=1, poll_interval=poll_interval, shutdown=shutdown, lease=lease
    )


async def run_worker_concurrent(
    queue: Queue,
    name: str,
    handler: Handler,
    *,
    concurrency: int = 4,
    poll_interval: float = 1.0,
    shutdown: asyncio.Event | None = None,
    lease: float | None = None,
) -> WorkerStats:
    """Process jobs of queue ``name`` with up to ``concurrency`` handlers at once.

    Claims come in batches sized to the free capacity (one transaction per
    batch).  A handler's slot is free again as soon as the handler returns:
    the next claim does not wait for the settlement to become durable, so the
    two share a WAL flush.  Returns when ``shutdown`` is set (after in-flight
    jobs settle) or the queue is closed.

    Raises:
        StoreFenced: see :func:`run_worker`.
        InvalidArgument: ``concurrency`` < 1 or a bad ``poll_interval``.
    """
    from .config import check_positive_int, seconds_to_ms

    check_positive_int("concurrency", concurrency)
    seconds_to_ms("poll_interval", poll_interval, allow_zero=False)
    stop = shutdown or asyncio.Event()
    stats = WorkerStats()
    in_flight: set[asyncio.Task[None]] = set()  # handling or settling
    handling = 0  # jobs whose handler has not returned yet
    freed = asyncio.Event()

    def handled() -> None:
        nonlocal handling
        handling -= 1
        freed.set()

    waker = asyncio.create_task(_wake_on(stop, queue, name))
    fenced: StoreFenced | None = None
    try:
        while not stop.is_set() and not queue.closed and fenced is None:
            if handling >= concurrency:
                freed.clear()
                await freed.wait()
            else:
                jobs = await queue.claim_batch_with_wait(name, concurrency - handling, lease, poll_interval)
                for job in jobs:
                    handling += 1
                    task = asyncio.create_task(process_one(queue, job, handler, stats, lease, handled))
                    in_flight.add(task)
            fenced = _reap_tasks(in_flight) or fenced
    except StoreFenced as exc:
        fenced = exc
    finally:
        waker.cancel()
        if in_flight:
            await asyncio.wait(in_flight)
        fenced = _reap_tasks(in_flight) or fenced
    if fenced is not None:
        log.error("worker for queue %r stopped: %s", name, fenced)
        raise fenced
    return stats


def _reap_tasks(tasks: set[asyncio.Task[None]]) -> StoreFenced | None:
    """Drop finished tasks; return a fencing error one of them raised."""
    fenced = None
    for task in [t for t in tasks if t.done()]:
        tasks.discard(task)
        exc = task.exception() if not task.cancelled() else None
        if isinstance(exc, StoreFenced):
            fenced = exc
        elif exc is not None:
            log.error("worker task failed: %r", exc)
    return fenced


async def _wake_on(stop: asyncio.Event, queue: Queue, name: str) -> None:
    await stop.wait()
    queue.wake(name)
