"""The ``Queue`` facade: validates input, runs transitions with conflict retries,
commits them durably, and wakes in-process waiters.
"""

from __future__ import annotations

import asyncio
import logging
import random
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import TypedDict, TypeVar, Unpack

from . import keys, transitions
from .claim_cursor import ScanCursors
from .clock import Clock, SystemClock
from .combine import Combiner
from .counters import CounterMirror, RecordingTransaction
from .config import QueueConfig, check_positive_int, seconds_to_ms
from .errors import (
    Contention,
    InvalidArgument,
    StoreClosed,
    StoreConflict,
    StoreFenced,
    TaqubaError,
)
from .ids import new_job_id
from .kvapi import check_kv_key, check_kv_writes
from .kv import Durability, KVStore, Transaction
from .notify import Notifier
from .record import JobRecord, JobStatus

_WRITERS: dict[int, weakref.ref[Queue]] = {}  # id(store) -> the open queue writing it

log = logging.getLogger("taquba")

T = TypeVar("T")

MAX_CONFLICT_RETRIES = 64
SWEEP_BATCH = 256


@dataclass(frozen=True)
class QueueStats:
    """Counts of one queue: jobs in each space, and acknowledgements in ``done``."""

    queue: str
    pending: int = 0
    scheduled: int = 0
    claimed: int = 0
    done: int = 0
    dead: int = 0


class EnqueueOptions(TypedDict, total=False):
    """The keyword options of :meth:`Queue.enqueue_with` (documented there)."""

    priority: int
    run_at: datetime
    delay: float
    max_attempts: int
    headers: Mapping[str, str]
    dedup_key: str


ENQUEUE_OPTIONS = frozenset(EnqueueOptions.__annotations__)


@dataclass(frozen=True)
class EnqueueResult:
    """What ``enqueue_with`` did: the job's ``id``, and ``created`` false on a dedup hit."""

    id: str
    created: bool


class CancelOutcome(str, Enum):
    """What :meth:`Queue.cancel` did."""

    REMOVED = "removed"
    """The job was pending or scheduled and is gone (its dedup key released)."""
    REQUESTED = "requested"
    """The job is claimed: ``cancel_requested`` is stored and the claim's signal fired."""
    NOT_FOUND = "not_found"
    """The job is done, dead, or unknown."""


class WaitStatus(str, Enum):
    """How :meth:`Queue.wait_for_completion` ended."""

    COMPLETED = "completed"
    TIMED_OUT = "timed_out"
    NOT_FOUND = "not_found"


@dataclass(frozen=True)
class WaitOutcome:
    """The result of a completion wait.

    ``record`` is the terminal record when one is kept (dead jobs always,
    done jobs when the queue keeps them), else ``None``.
    """

    status: WaitStatus
    record: JobRecord | None = None


def _job_status(status: object) -> JobStatus:
    """A :class:`JobStatus` from itself or its name in any case (``"pending"``, ``"Pending"``)."""
    if isinstance(status, JobStatus):
        return status
    if isinstance(status, str):
        for member in JobStatus:
            if status.lower() == member.value.lower():
                return member
    names = ", ".join(m.value.lower() for m in JobStatus)
    raise InvalidArgument(f"unknown job status {status!r}; expected one of {names}")


def _check_job_id(job_id: object) -> str:
    if not isinstance(job_id, str) or not job_id or not _encodable(job_id):
        raise InvalidArgument(f"job id must be a non-empty str of valid UTF-8, got {job_id!r}")
    return job_id


def _check_payload(payload: object) -> bytes:
    if isinstance(payload, (bytearray, memoryview)):
        return bytes(payload)
    if not isinstance(payload, bytes):
        raise InvalidArgument(f"payload must be bytes, got {type(payload).__name__} {payload!r:.60}")
    return payload


def _encodable(text: str) -> bool:
    """Whether ``text`` can be stored: UTF-8 has no lone surrogates."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _error_text(error: object) -> str:
    """``str(error)`` with characters UTF-8 cannot store (lone surrogates) backslash-escaped."""
    return str(error).encode("utf-8", "backslashreplace").decode("utf-8")


def _check_headers(headers: object) -> dict[str, str]:
    if headers is None:
        return {}
    if not isinstance(headers, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) and _encodable(k) and _encodable(v) for k, v in headers.items()
    ):
        raise InvalidArgument(f"headers must be a mapping of str to str (valid UTF-8), got {headers!r}")
    return dict(headers)


def _check_dedup_key(dedup_key: object) -> str | None:
    if dedup_key is None:
        return None
    if not isinstance(dedup_key, str) or not dedup_key or not _encodable(dedup_key):
        raise InvalidArgument(f"dedup_key must be a non-empty str of valid UTF-8, got {dedup_key!r}")
    return dedup_key


def _run_at_ms(run_at: object, delay: object, now: int) -> int | None:
    if run_at is not None and delay is not None:
        raise InvalidArgument(f"give run_at or delay, not both (run_at={run_at!r}, delay={delay!r})")
    if delay is not None:
        ms = seconds_to_ms("delay", delay)
        return now + ms if ms > 0 else None
    if run_at is None:
        return None
    if not isinstance(run_at, datetime):
        raise InvalidArgument(f"run_at must be a timezone-aware datetime, got {run_at!r}")
    if run_at.tzinfo is None or run_at.utcoffset() is None:
        raise InvalidArgument(f"run_at must be timezone-aware, got naive {run_at.isoformat()}")
    ms = int(run_at.timestamp() * 1000)
    if ms < 0 or ms > keys.TIME_MAX:
        raise InvalidArgument(f"run_at {run_at.isoformat()} is outside the representable range")
    return ms if ms > now else None


class Queue:
    """A durable task queue over one transactional key-value store.

    Open with :meth:`open`; use as an async context manager or call
    :meth:`close`.  All durations given to methods are in **seconds**
    (floats allowed); all times stored on records are integer
    **milliseconds** since the Unix epoch.  Every call that returns has made
    its effect durable.  One process may write a store at a time: a second
    opener fences the first, whose later writes raise
    :class:`~taquba_core.errors.StoreFenced`.
    """

    def __init__(
        self,
        store: KVStore,
        *,
        config: QueueConfig | None = None,
        queues: Mapping[str, QueueConfig] | None = None,
        clock: Clock | None = None,
        promote_interval: float = 0.2,
        reap_interval: float = 1.0,
    ) -> None:
        for name in queues or {}:
            keys.validate_queue_name(name)
        self.store = store
        self.clock: Clock = clock or SystemClock()
        self.configs = transitions.QueueConfigs(config or QueueConfig(), queues)
        self.promote_interval = seconds_to_ms("promote_interval", promote_interval, allow_zero=False) / 1000
        self.reap_interval = seconds_to_ms("reap_interval", reap_interval, allow_zero=False) / 1000
        self._available = Notifier()
        self._completed = Notifier()
        self._cancel_signals: dict[str, asyncio.Event] = {}
        self._wakes: dict[str, int] = {}  # per queue: how many times wake() was called
        self._fenced: StoreFenced | None = None  # set once another writer took the store over
        self._claim_locks: dict[str, asyncio.Lock] = {}
        self._cursors = ScanCursors()
        self._sweep_locks: dict[bytes, asyncio.Lock] = {}
        # Enqueues and acks of concurrent callers share transactions (see combine.py).
        syncs = type(store).sync is not KVStore.sync  # the default has nothing to wait for
        self._combiner = Combiner(
            lambda step: self._transact(step, durable=False), self._wait_durable, store.sync if syncs else None
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._dead_cursors: dict[str, bytes | None] = {}
        self._counters = CounterMirror()
        self._closed = False
        self._closing: asyncio.Future[None] | None = None
        self._owner_ref: weakref.ref[Queue] | None = None

    # -- lifecycle ----------------------------------------------------------

    @classmethod
    async def open(
        cls,
        store: KVStore,
        *,
        config: QueueConfig | None = None,
        queues: Mapping[str, QueueConfig] | None = None,
        clock: Clock | None = None,
        promote_interval: float = 0.2,
        reap_interval: float = 1.0,
        background: bool = True,
    ) -> Queue:
        """Open a queue over ``store`` and recover what a previous process left.

        Args:
            store: an open :class:`~taquba_core.kv.KVStore`; the queue owns it
                and closes it in :meth:`close`.
            config: the default :class:`QueueConfig` of every queue.
            queues: per-queue overrides, by queue name.
            clock: source of ``now`` in milliseconds (default: system clock).
            promote_interval / reap_interval: seconds between background
                promoter and reaper ticks.
            background: start the promoter and reaper tasks (turn off in
                tests that drive :meth:`promote_now` / :meth:`reap_now`).

        Raises:
            InvalidArgument: ``store`` (a writable one) already belongs to
                another open queue; two queues writing one store object
                would not see each other's keys in their claim cursors.

        Every claimed record found at open belongs to a process that no
        longer runs (one writer per store), so it is re-queued at once, or
        dead-lettered when out of attempts, before ``open`` returns
        (reference: taquba 0.11.0 changed recovery to this from waiting
        out the recorded lease).
        """
        owner = _WRITERS.get(id(store))
        if not store.read_only and owner is not None and owner() is not None:
            raise InvalidArgument(
                f"store {getattr(store, 'url', store)!r} already belongs to an open Queue: share that Queue "
                "(its cursors and counters assume no other writer), or close it and open the store anew"
            )
        queue = cls(
            store,
            config=config,
            queues=queues,
            clock=clock,
            promote_interval=promote_interval,
            reap_interval=reap_interval,
        )
        if not store.read_only:
            # By id, through a weak reference to the queue: a store need not be
            # hashable, and a queue dropped without close() releases it.
            queue._owner_ref = _WRITERS[id(store)] = weakref.ref(queue)
        try:
            await queue._read(queue._counters.load)
            if not store.read_only:
                await queue.recover()
        except BaseException:
            queue._release_store()
            raise
        if background and not store.read_only:
            queue.start_background()
        return queue

    async def __aenter__(self) -> Queue:
        """Use the queue in ``async with``; it is closed on exit.

        Raises:
            StoreClosed: the queue was closed already.
        """
        if self._closed:
            raise StoreClosed("the queue is closed")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def start_background(self) -> None:
        """Start the promoter and reaper tasks (``open`` does unless told not to)."""
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._tick(self.promote_now, self.promote_interval), name="taquba-promoter"),
                asyncio.create_task(self._tick(self.reap_now, self.reap_interval), name="taquba-reaper"),
            ]

    async def close(self) -> None:
        """Stop the background tasks, wake every waiter, and close the store.

        A caller cancelled here leaves the shutdown running (shielded); every
        call waits for the same one.
        """
        if self._closing is None:
            self._closed = True
            self._closing = asyncio.ensure_future(self._shut_down())
        await asyncio.shield(self._closing)

    async def _shut_down(self) -> None:
        try:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._available.notify_all()
            self._completed.notify_all()
            await self.store.close()
        finally:
            self._release_store()

    def _release_store(self) -> None:
        """The store no longer belongs to this queue (see ``open``)."""
        if self._owner_ref is not None and _WRITERS.get(id(self.store)) is self._owner_ref:
            del _WRITERS[id(self.store)]

    @property
    def closed(self) -> bool:
        return self._closed

    def _fenced_by(self, exc: StoreFenced) -> None:
        """Another writer took the store over: every later claim raises ``exc``, and
        waiting claimers are woken to learn it (an idle worker would not write, so
        it would never find out by itself)."""
        if self._fenced is None:
            self._fenced = exc
            log.error("this process can no longer write the store; its workers stop: %s", exc)
            self._available.notify_all()

    async def _tick(self, sweep: Callable[[], Awaitable[int]], interval: float) -> None:
        while True:
            try:
                await sweep()
            except asyncio.CancelledError:
                raise
            except StoreFenced as exc:
                self._fenced_by(exc)
                return
            except TaqubaError as exc:
                if self._closed:
                    return  # closing: a sweep cut short is redone by the next opener
                if exc.is_permanent:
                    log.error("background sweep stopped: %s", exc)
                    return
                log.warning("background sweep failed, retrying next tick: %s", exc)
            await asyncio.sleep(interval)

    # -- transaction runner -------------------------------------------------

    async def _run(self, step: Callable[[Transaction], Awaitable[T]], *, durable: bool = True) -> T:
        """Run ``step`` in a transaction, retrying on conflict; commit it."""
        result, _ = await self._transact(step, durable=durable)
        return result

    async def _transact(
        self, step: Callable[[Transaction], Awaitable[T]], *, durable: bool
    ) -> tuple[T, Durability]:
        """:meth:`_run`, also returning the commit's :class:`Durability` (for ``durable=False``)."""
        if self._closed:
            raise StoreClosed("the queue is closed")
        for attempt in range(MAX_CONFLICT_RETRIES):
            txn = RecordingTransaction(await self.store.begin())
            try:
                result = await step(txn)
            except BaseException:
                await txn.rollback()
                raise
            if txn.scan_keys:
                # Before the commit: once committed, the keys are visible to
                # other transactions, and a cursor too low is only a longer scan.
                self._cursors.written(txn.scan_keys)
            self._counters.commit_started()
            try:
                durability = await txn.commit(durable=durable)
            except StoreConflict:
                self._counters.commit_ended([])
                await asyncio.sleep(random.uniform(0, 0.001 * min(2**attempt, 64)))
                continue
            except BaseException as exc:
                self._counters.commit_ended(None)  # the outcome is unknown: re-read the counters
                if isinstance(exc, StoreFenced):
                    self._fenced_by(exc)
                raise
            finally:
                if txn.scan_keys:
                    self._cursors.settled(txn.scan_keys)  # no longer in flight (see claim_cursor.py)
            self._counters.commit_ended(txn.deltas)
            return result, durability
        raise Contention(f"gave up after {MAX_CONFLICT_RETRIES} write conflicts; retry later")

    async def _wait_durable(self, durability: Durability) -> None:
        """Wait until a commit made with ``durable=False`` is durable."""
        try:
            await durability.wait()
        except BaseException:
            self._counters.invalidate()
            raise

    async def _read(self, step: Callable[[Transaction], Awaitable[T]]) -> T:
        """Run a read-only ``step`` on a snapshot."""
        if self._closed:
            raise StoreClosed("the queue is closed")
        txn = await self.store.begin()
        try:
            return await step(txn)
        finally:
            await txn.rollback()

    async def _ensure_counters(self) -> None:
        if self._closed:
            raise StoreClosed("the queue is closed")  # as every other read, whether or not cached
        if not self._counters.loaded:
            await self._counters.reload(self._read)

    def _now(self) -> int:
        return self.clock.now_ms()

    # -- enqueue ------------------------------------------------------------

    def _new_job(self, queue: str, payload: object, options: EnqueueOptions) -> JobRecord:
        keys.validate_queue_name(queue)
        unknown = set(options) - ENQUEUE_OPTIONS
        if unknown:
            raise InvalidArgument(f"unknown enqueue option(s) {sorted(unknown)}; expected {sorted(ENQUEUE_OPTIONS)}")
        config = self.configs.get(queue)
        data = _check_payload(payload)
        priority = options.get("priority")
        max_attempts = options.get("max_attempts")
        prio = config.priority if priority is None else keys.check_priority(priority)
        attempts = config.max_attempts if max_attempts is None else check_positive_int("max_attempts", max_attempts)
        now = self._now()
        due = _run_at_ms(options.get("run_at"), options.get("delay"), now)
        return JobRecord(
            id=new_job_id(now),
            queue=queue,
            payload=data,
            status=JobStatus.PENDING if due is None else JobStatus.SCHEDULED,
            max_attempts=attempts,
            enqueued_at=now,
            priority=prio,
            headers=_check_headers(options.get("headers")),
            run_at=due,
            dedup_key=_check_dedup_key(options.get("dedup_key")),
        )

    async def enqueue(self, queue: str, payload: bytes) -> str:
        """Enqueue ``payload`` (bytes) on ``queue`` with the queue's defaults; returns the job id.

        Raises:
            InvalidQueueName, InvalidArgument: bad input; nothing is written.
        """
        return (await self.enqueue_with(queue, payload)).id

    async def enqueue_with(
        self,
        queue: str,
        payload: bytes,
        *,
        kv_writes: Mapping[bytes, bytes | None] | None = None,
        **options: Unpack[EnqueueOptions],
    ) -> EnqueueResult:
        """Enqueue with options (keyword arguments, all optional).

        Args:
            priority: 0..2**32-1, lower is claimed first (default: the
                queue's, ``PRIORITY_NORMAL`` = 1000).
            run_at: a timezone-aware datetime; the job is scheduled until then.
            delay: seconds from now until the job may run (not with ``run_at``).
            max_attempts: claims allowed before dead-lettering (>= 1).
            headers: str → str metadata kept on the record.
            dedup_key: while a pending or scheduled job of this queue carries
                it, enqueueing again writes nothing and returns that job's id
                with ``created=False``; released when the job is claimed.
            kv_writes: caller KV writes (``None`` deletes) committed in the
                same transaction; not applied on a dedup hit.

        Raises:
            InvalidQueueName, InvalidArgument, KvValueTooLarge: bad input;
                nothing is written.
        """
        job = self._new_job(queue, payload, options)
        writes = check_kv_writes(kv_writes)
        inserted = await self._combiner.run(lambda txn: transitions.insert(txn, job, writes))
        if inserted.created and job.status is JobStatus.PENDING:
            self._available.notify(queue)
        return EnqueueResult(inserted.id, inserted.created)

    async def enqueue_batch(
        self,
        queue: str,
        payloads: list[bytes],
        *,
        kv_writes: Mapping[bytes, bytes | None] | None = None,
        **options: Unpack[EnqueueOptions],
    ) -> list[str]:
        """Enqueue every payload in one transaction, all or nothing.

        Ids ascend in input order, so the batch is claimed in input order.
        ``options`` are those of :meth:`enqueue_with` except ``dedup_key``;
        ``kv_writes`` commit with the batch.

        Raises:
            InvalidArgument: bad input (nothing is written).
        """
        if "dedup_key" in options:
            raise InvalidArgument("enqueue_batch does not take a dedup_key")
        jobs = [self._new_job(queue, payload, options) for payload in payloads]
        writes = check_kv_writes(kv_writes)

        async def step(txn: Transaction) -> list[str]:
            for job in jobs:
                await transitions.insert(txn, job)
            await transitions.apply_kv_writes(txn, writes)
            return [job.id for job in jobs]

        ids = await self._combiner.run(step)
        if jobs and jobs[0].status is JobStatus.PENDING:
            self._available.notify(queue)
        return ids

    # -- claim --------------------------------------------------------------

    def lease_ms(self, queue: str, lease: float | None) -> int:
        """``lease`` seconds in milliseconds, or ``queue``'s configured lease when ``None``."""
        if lease is None:
            return self.configs.get(queue).lease_ms
        return seconds_to_ms("lease", lease, allow_zero=False)

    async def claim_batch(self, queue: str, n: int, lease: float | None = None) -> list[JobRecord]:
        """Claim up to ``n`` jobs of ``queue`` in one transaction, in claim order.

        Each claimed job has its attempt counted and a lease of ``lease``
        seconds (default: the queue's).  Claims on one queue are serialised
        by an in-process lock, so they never fight through conflicts;
        different queues claim in parallel.  The claim returns without
        waiting for durability (see the comment in the body): after a crash
        the job is pending again either way.

        Raises:
            InvalidQueueName, InvalidArgument: bad input.
            StoreFenced: another writer took the store over (noticed by this
                claim, an earlier commit or a background sweep).
            StoreClosed: the queue was closed.
        """
        keys.validate_queue_name(queue)
        check_positive_int("n", n)
        lease_ms = self.lease_ms(queue, lease)
        if self._fenced is not None:
            raise StoreFenced(str(self._fenced))
        if self._closed:
            raise StoreClosed("the queue is closed")  # also when the queue is known to be empty
        lock = self._claim_locks.setdefault(queue, asyncio.Lock())
        prefix = keys.pending_prefix(queue)
        async with lock:
            # Claims commit without waiting for durability (as upstream's
            # later releases do): a claim lost with an unflushed WAL leaves the job
            # pending, a durable one is requeued at open; the only difference
            # is the attempt the durable claim consumed.  The settlement's
            # durable commit makes the claim durable too.
            if self._cursors.known_empty(prefix):
                await asyncio.sleep(0)  # as an empty claim below: never starve the sweeps
                return []
            self._cursors.begin(prefix)
            last = None
            drained = False
            read: list[bytes] | None = None  # the candidates the last attempt read
            registered: set[str] = set()

            async def step(txn: Transaction) -> tuple[list[JobRecord], bool]:
                nonlocal read
                # Read the cursor after the snapshot was taken: every key in
                # the snapshot was reported (lowering it, joining the known
                # keys) before it committed.
                after = self._cursors.after(prefix)
                read = self._cursors.candidates(prefix)
                jobs, drained = await transitions.claim_batch(txn, queue, n, self._now(), lease_ms, after, read)
                # Each claim's cancel signal exists before its commit, so a
                # cancel() landing right after the commit finds and sets it.
                for job in jobs:
                    if job.id not in self._cancel_signals:
                        self._cancel_signals[job.id] = asyncio.Event()
                        registered.add(job.id)
                return jobs, drained

            jobs: list[JobRecord] = []
            try:
                (jobs, drained), _ = await self._transact(step, durable=False)
                if jobs:
                    last = keys.pending_key(queue, jobs[-1].priority, jobs[-1].id)
            finally:
                self._cursors.end(prefix, last, drained, read)
                for job_id in registered.difference(job.id for job in jobs):
                    self._cancel_signals.pop(job_id, None)  # from an attempt that did not commit
        if not jobs:
            # An empty claim may complete without suspending (no I/O); yield,
            # so that a caller polling in a loop cannot starve the sweeps.
            await asyncio.sleep(0)
        for job in jobs:
            job.cancellation = self._cancel_signals.setdefault(job.id, asyncio.Event())
            if job.cancel_requested:
                job.cancellation.set()
        return jobs

    async def claim(self, queue: str, lease: float | None = None) -> JobRecord | None:
        """Claim the next job of ``queue`` (lowest priority number, then oldest) or ``None``.

        ``lease`` is in seconds (default: the queue's ``lease``).
        """
        jobs = await self.claim_batch(queue, 1, lease)
        return jobs[0] if jobs else None

    async def claim_next(self, queue: str) -> JobRecord | None:
        """:meth:`claim` with the queue's configured lease."""
        return await self.claim(queue)

    async def claim_with_wait(
        self, queue: str, lease: float | None = None, max_wait: float = 30.0
    ) -> JobRecord | None:
        """Claim, waiting up to ``max_wait`` seconds for a job to become available.

        Woken by in-process notification (enqueue, promotion, retry), never by
        polling.  Returns ``None`` when nothing arrived in time or the queue
        was closed.
        """
        jobs = await self.claim_batch_with_wait(queue, 1, lease, max_wait)
        return jobs[0] if jobs else None

    async def claim_batch_with_wait(
        self, queue: str, n: int, lease: float | None = None, max_wait: float = 30.0
    ) -> list[JobRecord]:
        """:meth:`claim_batch`, waiting up to ``max_wait`` seconds when none is pending."""
        wait_ms = seconds_to_ms("max_wait", max_wait)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_ms / 1000
        wakes = self._wakes.get(queue, 0)
        while True:
            waiter = self._available.register(queue)
            jobs = await self.claim_batch(queue, n, lease)
            remaining = deadline - loop.time()
            if jobs or remaining <= 0 or self._closed:
                self._available.discard(queue, waiter)
                return jobs
            await self._available.wait(queue, waiter, remaining)
            if self._closed or self._wakes.get(queue, 0) != wakes:
                return []

    def wake(self, queue: str) -> None:
        """Make the claimers waiting on ``queue`` return empty-handed now (e.g. at shutdown)."""
        self._wakes[queue] = self._wakes.get(queue, 0) + 1
        self._available.notify(queue)

    # -- settlement ---------------------------------------------------------

    async def ack(self, job: JobRecord, *, kv_writes: Mapping[bytes, bytes | None] | None = None) -> None:
        """Settle a claimed job as done, with optional caller KV writes in the same commit.

        Raises:
            ClaimLost: the claim no longer exists (lease reaped, already
                settled, or a stale copy); nothing is written.
        """
        writes = check_kv_writes(kv_writes)
        config = self.configs.get(job.queue)
        await self._combiner.run(lambda txn: transitions.ack(txn, job, self._now(), config, writes))
        self._claim_ended(job.id, terminal=True)

    async def nack(self, job: JobRecord, error: str) -> JobRecord:
        """Settle a claimed job as failed; returns the record it became.

        With attempts left the job waits ``min(backoff_base * 2**(attempts-1),
        backoff_max)`` seconds in the scheduled space (zero base: straight back
        to pending); without, it is dead-lettered.  ``error`` is kept as
        ``last_error``.

        Raises:
            ClaimLost: the claim no longer exists; nothing is written.
        """
        config = self.configs.get(job.queue)
        new = await self._run(lambda txn: transitions.nack(txn, job, self._now(), _error_text(error), config))
        self._claim_ended(job.id, terminal=new.status is JobStatus.DEAD)
        if new.status is JobStatus.PENDING:
            self._available.notify(job.queue)
        return new

    async def dead_letter(self, job: JobRecord, reason: str) -> JobRecord:
        """Dead-letter a claimed job now (a permanent failure); no further attempt is made.

        Raises:
            ClaimLost: the claim no longer exists; nothing is written.
        """
        new = await self._run(lambda txn: transitions.dead_letter(txn, job, self._now(), _error_text(reason)))
        self._claim_ended(job.id, terminal=True)
        return new

    async def renew_lease(self, job: JobRecord, lease: float | None = None) -> int:
        """Extend a claim's lease to ``lease`` seconds from now; returns the new expiry (ms).

        ``job.lease_expires_at`` is updated in place, so the same object
        settles the claim afterwards.

        Raises:
            ClaimLost: the claim no longer exists; nothing is written.
        """
        lease_ms = self.lease_ms(job.queue, lease)
        new = await self._run(lambda txn: transitions.renew(txn, job, self._now(), lease_ms))
        assert new.lease_expires_at is not None
        job.lease_expires_at = new.lease_expires_at
        return new.lease_expires_at

    # -- background sweeps --------------------------------------------------

    async def _sweep(
        self,
        space: bytes,
        step: Callable[[Transaction, bytes | None], Awaitable[tuple[list[JobRecord], bytes | None]]],
    ) -> list[JobRecord]:
        """Run a sweep step batch after batch, without waiting for durability.

        A sweep lost in a crash is redone by the next tick, so it never
        costs a WAL flush per job.  Sweeps of one space take turns, and each
        batch starts at the space's scan cursor (see claim_cursor.py), past
        the keys earlier batches and ticks deleted.
        """
        moved: list[JobRecord] = []
        async with self._sweep_locks.setdefault(space, asyncio.Lock()):
            while True:
                self._cursors.begin(space)
                last = None
                try:
                    # The cursor is read inside the step, after the snapshot (see claim_batch).
                    batch, last = await self._run(lambda txn: step(txn, self._cursors.after(space)), durable=False)
                finally:
                    self._cursors.end(space, last)
                moved.extend(batch)
                if len(batch) < SWEEP_BATCH:
                    return moved

    def _wake_pending(self, jobs: list[JobRecord]) -> int:
        """Notify claimers of every queue that got a pending job; returns ``len(jobs)``."""
        for queue in {job.queue for job in jobs if job.status is JobStatus.PENDING}:
            self._available.notify(queue)
        return len(jobs)

    def _claim_ended(self, job_id: str, *, terminal: bool) -> None:
        """Forget a claim's cancel signal; wake completion waiters when the job is finished."""
        self._cancel_signals.pop(job_id, None)
        if terminal:
            self._completed.notify(job_id)

    async def promote_now(self) -> int:
        """Move every due scheduled job to pending; returns how many moved."""
        moved = await self._sweep(
            keys.SCHEDULED, lambda txn, after: transitions.promote_due(txn, self._now(), SWEEP_BATCH, after)
        )
        return self._wake_pending(moved)

    async def reap_now(self) -> int:
        """Re-queue (or dead-letter) expired claims and run the retention sweeps.

        Returns how many expired claims were moved.
        """
        moved = await self._expire(until=self._now(), reason="lease expired")
        await self._sweep_retention()
        return moved

    async def recover(self) -> int:
        """Re-queue every claim in the store (done by :meth:`open`); returns how many."""
        return await self._expire(until=None, reason="interrupted: the previous process stopped")

    async def _expire(self, until: int | None, reason: str) -> int:
        moved = await self._sweep(
            keys.CLAIMED,
            lambda txn, after: transitions.expire_claims(
                txn, until, self._now(), SWEEP_BATCH, self.configs, reason, after
            ),
        )
        for job in moved:
            self._claim_ended(job.id, terminal=job.status is JobStatus.DEAD)
        return self._wake_pending(moved)

    async def _sweep_retention(self) -> None:
        now = self._now()
        keeps = [c.keep_done_jobs for c in self._all_configs() if c.keep_done_jobs is not None]
        until = now - int(min(keeps) * 1000) if keeps else -1
        after: bytes | None = None
        while until >= 0:
            # Page by the scan position, not by what a page removed: rows a
            # longer-keeping queue still keeps must not stall the sweep.
            _, after = await self._run(
                lambda txn, start=after: transitions.sweep_done(  # type: ignore[misc]
                    txn, until, now, SWEEP_BATCH, self.configs, start
                ),
                durable=False,
            )
            if after is None:
                break
        for queue in await self.list_queues():
            retention = self.configs.get(queue).dead_retention
            if retention is not None:
                await self._sweep_dead(queue, now, int(retention * 1000))

    async def _sweep_dead(self, queue: str, now: int, retention_ms: int) -> None:
        cursor = self._dead_cursors.get(queue)
        cursor = await self._run(
            lambda txn: transitions.sweep_dead(txn, queue, now, retention_ms, cursor, SWEEP_BATCH),
            durable=False,
        )
        self._dead_cursors[queue] = cursor

    def _all_configs(self) -> list[QueueConfig]:
        return [self.configs.default, *(self.configs.get(q) for q in self.configs.named())]

    # -- reads --------------------------------------------------------------

    async def get_job(self, job_id: str) -> JobRecord | None:
        """The current record of ``job_id``, or ``None`` when unknown (or acked and not kept)."""
        _check_job_id(job_id)
        found = await self._read(lambda txn: transitions.find(txn, job_id))
        return None if found is None else found[1]

    async def stats(self, queue: str) -> QueueStats:
        """Counts of ``queue`` from its counters (no scan of the jobs)."""
        keys.validate_queue_name(queue)
        await self._ensure_counters()
        counts = {m: self._counters.get(keys.stats_key(queue, m)) for m in transitions.METRICS}
        return QueueStats(queue, **counts)

    async def list_queues(self) -> list[str]:
        """Names of every queue that has ever held a job, sorted."""
        await self._ensure_counters()
        return self._counters.queues()

    # -- caller KV namespace -----------------------------------------------

    async def kv_get(self, key: bytes) -> bytes | None:
        """The caller value under ``key`` (any bytes), or ``None``."""
        k = keys.user_key(check_kv_key(key))
        return await self._read(lambda txn: txn.get(k))

    async def kv_put(self, key: bytes, value: bytes) -> None:
        """Durably write ``value`` (at most ``MAX_KV_VALUE_SIZE`` bytes) under caller ``key``.

        Raises:
            KvValueTooLarge, InvalidArgument: nothing is written.
        """
        writes = check_kv_writes({key: value})
        await self._run(lambda txn: transitions.apply_kv_writes(txn, writes))

    async def kv_write(self, writes: Mapping[bytes, bytes | None]) -> None:
        """Apply several caller writes (``None`` deletes) in one durable commit.

        Raises:
            KvValueTooLarge, InvalidArgument: nothing is written.
        """
        checked = check_kv_writes(writes)
        await self._run(lambda txn: transitions.apply_kv_writes(txn, checked))

    async def kv_delete(self, key: bytes) -> None:
        """Durably delete caller ``key`` (a no-op when absent)."""
        writes = check_kv_writes({key: None})
        await self._run(lambda txn: transitions.apply_kv_writes(txn, writes))

    async def kv_scan(
        self, prefix: bytes = b"", cursor: bytes | None = None, limit: int = 100
    ) -> tuple[list[tuple[bytes, bytes]], bytes | None]:
        """A page of caller (key, value) pairs under ``prefix`` in ascending key order.

        Returns the page and a cursor to pass back for the next page
        (``None`` when there is no more).
        """
        check_positive_int("limit", limit)
        full = keys.user_key(check_kv_key(prefix))
        after = None if cursor is None else keys.user_key(check_kv_key(cursor))
        rows = await self._read(lambda txn: txn.scan(full, start_after=after, limit=limit))
        page = [(k[len(keys.USER):], v) for k, v in rows]
        return page, (page[-1][0] if len(page) == limit else None)

    async def enqueue_with_kv(
        self,
        queue: str,
        payload: bytes,
        kv_writes: Mapping[bytes, bytes | None],
        **options: Unpack[EnqueueOptions],
    ) -> EnqueueResult:
        """:meth:`enqueue_with` whose caller KV writes commit with the job (none on a dedup hit)."""
        return await self.enqueue_with(queue, payload, kv_writes=kv_writes, **options)

    # -- cancellation and completion ----------------------------------------

    async def cancel(self, job_id: str) -> CancelOutcome:
        """Cancel a job.

        A pending or scheduled job is removed (its dedup key released):
        ``REMOVED``.  A claimed job gets ``cancel_requested`` stored and its
        claim's ``cancellation`` event set: ``REQUESTED``; the handler decides
        how to stop, the flag survives ``nack``, ``dead_letter`` and a lease
        expiry (a re-claim starts with the event set), and lease renewal is
        refused.  A done, dead or unknown job: ``NOT_FOUND``.
        """
        _check_job_id(job_id)
        job = await self._run(lambda txn: transitions.cancel(txn, job_id))
        if job is None:
            return CancelOutcome.NOT_FOUND
        if job.status is JobStatus.CLAIMED:
            signal = self._cancel_signals.get(job_id)
            if signal is not None:  # absent: the claim ended meanwhile, or another process holds it
                signal.set()
            return CancelOutcome.REQUESTED
        self._completed.notify(job_id)
        return CancelOutcome.REMOVED

    async def wait_for_completion(self, job_id: str, timeout: float) -> WaitOutcome:
        """Wait up to ``timeout`` seconds for a job to finish (done, dead, or removed).

        Woken by notification from every terminal transition; any number of
        waiters may wait on one id.  Returns ``NOT_FOUND`` when the id is
        unknown at the call (an acked job whose record was not kept is
        unknown), ``COMPLETED`` with the terminal record when one is kept
        (or ``None`` when not), or ``TIMED_OUT`` (also when the queue is
        closed while waiting, as :meth:`claim_with_wait` returns ``None``).
        """
        _check_job_id(job_id)
        wait_ms = seconds_to_ms("timeout", timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_ms / 1000
        first = True
        while True:
            waiter = self._completed.register(job_id)
            job = await self.get_job(job_id)
            if job is None or job.status in (JobStatus.DONE, JobStatus.DEAD):
                self._completed.discard(job_id, waiter)
                if job is None and first:
                    return WaitOutcome(WaitStatus.NOT_FOUND)
                return WaitOutcome(WaitStatus.COMPLETED, job)
            first = False
            remaining = deadline - loop.time()
            if remaining <= 0 or self._closed:
                self._completed.discard(job_id, waiter)
                return WaitOutcome(WaitStatus.TIMED_OUT)
            await self._completed.wait(job_id, waiter, remaining)
            if self._closed:
                return WaitOutcome(WaitStatus.TIMED_OUT)

    # -- dead letters and listings ------------------------------------------

    async def dead_jobs(self, queue: str, after: str | None = None, limit: int = 100) -> list[JobRecord]:
        """A page of ``queue``'s dead-letter set in id order.

        ``after`` is an exclusive job-id cursor: the scan seeks to it.
        """
        keys.validate_queue_name(queue)
        check_positive_int("limit", limit)
        start = None if after is None else keys.dead_key(queue, _check_job_id(after))
        jobs, _ = await self._read(lambda txn: transitions.list_space(txn, queue, JobStatus.DEAD, start, limit))
        return jobs

    async def requeue_dead_job(self, job_id: str) -> JobRecord:
        """Move a dead job back to pending with a fresh attempt budget; returns the new record.

        ``last_error``, ``failed_at`` and the cancel flag are cleared;
        ``enqueued_at`` is kept.

        Raises:
            JobNotFound: the job is not dead (already requeued, swept by
                retention, never dead, or unknown); nothing is written.
        """
        _check_job_id(job_id)
        job = await self._run(lambda txn: transitions.requeue_dead(txn, job_id))
        self._available.notify(job.queue)
        return job

    async def list_jobs(
        self, queue: str, status: JobStatus | str, cursor: str | None = None, limit: int = 100
    ) -> tuple[list[JobRecord], str | None]:
        """A page of ``queue``'s jobs in ``status`` (a :class:`JobStatus` or its name, any case).

        Pending in claim order, scheduled by ``run_at``, claimed by lease
        expiry, done by completion time, dead by id.  Returns the page and an
        opaque cursor for the next page (``None`` at the end).
        """
        keys.validate_queue_name(queue)
        check_positive_int("limit", limit)
        state = _job_status(status)
        try:
            after = None if cursor is None else bytes.fromhex(cursor)
        except (ValueError, TypeError):
            raise InvalidArgument(f"malformed cursor {cursor!r}") from None
        jobs, last = await self._read(lambda txn: transitions.list_space(txn, queue, state, after, limit))
        return jobs, None if last is None else last.hex()
