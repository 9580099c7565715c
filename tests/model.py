"""A plain-Python model of the queue, and a harness that runs every public
operation on a real :class:`Queue` and on the model side by side.

Used by ``test_model.py`` (hypothesis state machine, differential test) and
``test_faults.py``.  The model is written from the README and the design
notes, not from ``transitions.py``: it keeps the jobs as a dict and computes
claim order, backoff, retention and recovery with plain Python.

After every operation :meth:`Harness.step` scans the raw store once and
checks the design's invariants on that scan (:func:`check_dump`) and the
whole store against the model: every job record byte-for-byte equal to the
model's, the counters, the dedup index, the job index and the caller KV
namespace.  An operation the model says changes nothing (a settlement of a
lost claim, a refused renewal, a requeue of a job that is not dead, ...)
must leave the raw store byte-for-byte unchanged.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import slatedb.uniffi as sdb
from hypothesis import strategies as st

from taquba_backends import MemoryStore
from taquba_backends.slatedb_store import SlateDBStore
from taquba_core import (
    CancelOutcome,
    CancelRequested,
    ClaimLost,
    JobNotFound,
    JobRecord,
    JobStatus,
    KVStore,
    ManualClock,
    Queue,
    QueueConfig,
    WaitStatus,
    keys,
)
from taquba_core.kv import decode_counter
from taquba_core.record import decode_record

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
START_MS = 1_700_000_000_000

# Three queues: two configured, one on the defaults.
QUEUES = ("a", "b", "c")
CONFIGS = {
    "a": QueueConfig(max_attempts=3, lease=10, backoff_base=1, backoff_max=4, dead_retention=60),
    "b": QueueConfig(max_attempts=2, lease=5, priority=500, backoff_base=0, keep_done_jobs=30, dead_retention=None),
}
DEFAULT_CONFIG = QueueConfig()
RECOVERY_REASON = "interrupted: the previous process stopped"
REAP_REASON = "lease expired"
UNKNOWN_ID = "01ARZ3NDEKTSV4RRFFQ69G5FAV"  # a well-formed id no run ever creates (timestamp of 2016)

# Caller keys shaped like internal keys, plus ordinary ones.
KV_KEYS = (
    b"",
    b"\x00",
    b"a",
    b"ab",
    b"pending:a:0000001000:x",
    b"stats:a:pending",
    b"jobindex:x",
    b"dedup:a:k1",
    b"usr:x",
    b"\xff",
)
KV_PREFIXES = (b"", b"a", b"pending:", b"stats:", b"\x00", b"usr:", b"\xff")


def config_of(queue: str) -> QueueConfig:
    return CONFIGS.get(queue, DEFAULT_CONFIG)


def to_ms(seconds: float) -> int:
    return round(seconds * 1000)


# -- the model -----------------------------------------------------------------


@dataclass
class Model:
    """The queue as plain Python: live jobs by id, and what happened to the others."""

    jobs: dict[str, JobRecord] = field(default_factory=dict)
    gone: dict[str, str] = field(default_factory=dict)  # id -> why it left the store
    created: list[str] = field(default_factory=list)  # every created id, in creation order
    acks: Counter[str] = field(default_factory=Counter)  # the done counter per queue
    dedup: dict[tuple[str, str], str] = field(default_factory=dict)
    kv: dict[bytes, bytes] = field(default_factory=dict)
    queues_seen: set[str] = field(default_factory=set)
    claim_ids: list[str] = field(default_factory=list)  # in claim order

    # -- enqueue

    def dedup_holder(self, queue: str, dedup_key: str | None) -> str | None:
        return None if dedup_key is None else self.dedup.get((queue, dedup_key))

    def insert(
        self,
        job_id: str,
        queue: str,
        payload: bytes,
        now: int,
        *,
        priority: int | None = None,
        delay: float | None = None,
        run_at_ms: int | None = None,
        max_attempts: int | None = None,
        headers: dict[str, str] | None = None,
        dedup_key: str | None = None,
    ) -> JobRecord:
        assert job_id not in self.jobs and job_id not in self.gone, f"id {job_id} handed out twice"
        assert not self.created or job_id > self.created[-1], f"id {job_id} does not follow {self.created[-1]}"
        cfg = config_of(queue)
        due = None
        if delay is not None and to_ms(delay) > 0:
            due = now + to_ms(delay)
        if run_at_ms is not None and run_at_ms > now:
            due = run_at_ms
        job = JobRecord(
            id=job_id,
            queue=queue,
            payload=payload,
            status=JobStatus.PENDING if due is None else JobStatus.SCHEDULED,
            max_attempts=cfg.max_attempts if max_attempts is None else max_attempts,
            enqueued_at=now,
            priority=cfg.priority if priority is None else priority,
            headers=dict(headers or {}),
            run_at=due,
            dedup_key=dedup_key,
        )
        self.jobs[job_id] = job
        self.created.append(job_id)
        self.queues_seen.add(queue)
        if dedup_key is not None:
            self.dedup[(queue, dedup_key)] = job_id
        return job

    def kv_write(self, writes: dict[bytes, bytes | None] | None) -> None:
        for key, value in (writes or {}).items():
            if value is None:
                self.kv.pop(key, None)
            else:
                self.kv[key] = value

    # -- orders

    def in_state(self, queue: str, status: JobStatus) -> list[JobRecord]:
        """``queue``'s jobs in ``status``, in the order the API lists them."""
        jobs = [j for j in self.jobs.values() if j.queue == queue and j.status is status]
        order: dict[JobStatus, Callable[[JobRecord], Any]] = {
            JobStatus.PENDING: lambda j: (j.priority, j.id),
            JobStatus.SCHEDULED: lambda j: (j.run_at, j.id),
            JobStatus.CLAIMED: lambda j: (j.lease_expires_at, j.id),
            JobStatus.DONE: lambda j: (j.completed_at, j.id),
            JobStatus.DEAD: lambda j: j.id,
        }
        return sorted(jobs, key=order[status])

    # -- claims

    def claim(self, queue: str, n: int, now: int, lease_ms: int) -> list[JobRecord]:
        """Claim order: lowest priority number first, then enqueue (id) order."""
        out = []
        for job in self.in_state(queue, JobStatus.PENDING)[:n]:
            if job.dedup_key is not None:
                del self.dedup[(queue, job.dedup_key)]
            new = replace(
                job,
                status=JobStatus.CLAIMED,
                attempts=job.attempts + 1,
                claimed_at=now,
                lease_expires_at=now + lease_ms,
                dedup_key=None,
            )
            self.jobs[job.id] = new
            out.append(new)
        return out

    def claim_is_current(self, held: JobRecord) -> bool:
        """Whether ``held`` is the job's current claim: the very claim handed out last
        (not merely one with the same lease and attempt count)."""
        job = self.jobs.get(held.id)
        return job is not None and job.status is JobStatus.CLAIMED and job.claim_id == held.claim_id

    def claimed_as(self, got: list[JobRecord]) -> None:
        """Adopt the claim ids the queue gave (opaque, but each must be new)."""
        for job in got:
            assert job.claim_id is not None and job.claim_id not in self.claim_ids, f"claim id of {job}"
            self.claim_ids.append(job.claim_id)
            self.jobs[job.id] = replace(self.jobs[job.id], claim_id=job.claim_id)

    @staticmethod
    def backoff_ms(cfg: QueueConfig, attempts: int) -> int:
        """``min(base * 2**(attempts-1), max)``; a zero base retries at once (README)."""
        base = to_ms(cfg.backoff_base)
        return 0 if base == 0 else min(base * 2 ** (attempts - 1), to_ms(cfg.backoff_max))

    @staticmethod
    def dead(job: JobRecord, now: int, error: str) -> JobRecord:
        return replace(
            job, status=JobStatus.DEAD, failed_at=now, last_error=error, lease_expires_at=None, run_at=None
        )

    def ack(self, job_id: str, now: int) -> None:
        job = self.jobs[job_id]
        self.acks[job.queue] += 1
        if config_of(job.queue).keep_done_jobs is None:
            del self.jobs[job_id]
            self.gone[job_id] = "acked"
        else:
            self.jobs[job_id] = replace(job, status=JobStatus.DONE, completed_at=now, lease_expires_at=None)

    def nack(self, job_id: str, now: int, error: str) -> JobRecord:
        job = self.jobs[job_id]
        if job.attempts >= job.max_attempts:
            new = self.dead(job, now, error)
        else:
            delay = self.backoff_ms(config_of(job.queue), job.attempts)
            base = replace(job, last_error=error, lease_expires_at=None, claimed_at=None)
            if delay == 0:
                new = replace(base, status=JobStatus.PENDING, run_at=None)
            else:
                new = replace(base, status=JobStatus.SCHEDULED, run_at=now + delay)
        self.jobs[job_id] = new
        return new

    def dead_letter(self, job_id: str, now: int, reason: str) -> JobRecord:
        new = self.jobs[job_id] = self.dead(self.jobs[job_id], now, reason)
        return new

    def renew(self, job_id: str, now: int, lease_ms: int) -> JobRecord:
        new = self.jobs[job_id] = replace(self.jobs[job_id], lease_expires_at=now + lease_ms)
        return new

    # -- cancel, requeue

    def cancel(self, job_id: str) -> CancelOutcome:
        job = self.jobs.get(job_id)
        if job is None or job.status in (JobStatus.DONE, JobStatus.DEAD):
            return CancelOutcome.NOT_FOUND
        if job.status is JobStatus.CLAIMED:
            self.jobs[job_id] = replace(job, cancel_requested=True)
            return CancelOutcome.REQUESTED
        if job.dedup_key is not None and self.dedup.get((job.queue, job.dedup_key)) == job_id:
            del self.dedup[(job.queue, job.dedup_key)]
        del self.jobs[job_id]
        self.gone[job_id] = "cancelled"
        return CancelOutcome.REMOVED

    def requeue(self, job_id: str) -> JobRecord | None:
        job = self.jobs.get(job_id)
        if job is None or job.status is not JobStatus.DEAD:
            return None
        fresh = replace(
            job,
            status=JobStatus.PENDING,
            attempts=0,
            last_error=None,
            failed_at=None,
            cancel_requested=False,
            claimed_at=None,
            lease_expires_at=None,
            run_at=None,
        )
        self.jobs[job_id] = fresh
        return fresh

    # -- sweeps

    def promote(self, now: int) -> int:
        due = [j for j in self.jobs.values() if j.status is JobStatus.SCHEDULED and j.run_at <= now]
        for job in due:
            self.jobs[job.id] = replace(job, status=JobStatus.PENDING, run_at=None)
        return len(due)

    def expire(self, until: int | None, now: int, reason: str) -> int:
        """Re-queue (or dead-letter at max attempts) claims whose lease ends at or before ``until``."""
        moved = [
            j
            for j in self.jobs.values()
            if j.status is JobStatus.CLAIMED and (until is None or j.lease_expires_at <= until)
        ]
        for job in moved:
            if job.attempts >= job.max_attempts:
                self.jobs[job.id] = self.dead(job, now, reason)
            else:
                self.jobs[job.id] = replace(
                    job, status=JobStatus.PENDING, last_error=reason, lease_expires_at=None, claimed_at=None
                )
        return len(moved)

    def sweep_retention(self, now: int) -> None:
        for job in list(self.jobs.values()):
            cfg = config_of(job.queue)
            keep = cfg.keep_done_jobs if job.status is JobStatus.DONE else None
            retention = cfg.dead_retention if job.status is JobStatus.DEAD else None
            if keep is not None and job.completed_at + to_ms(keep) <= now:
                del self.jobs[job.id]
                self.gone[job.id] = "done retention"
            elif retention is not None and job.failed_at + to_ms(retention) <= now:
                del self.jobs[job.id]
                self.gone[job.id] = "dead retention"

    def stats(self, queue: str) -> tuple[int, int, int, int, int]:
        count = Counter(j.status for j in self.jobs.values() if j.queue == queue)
        return (
            count[JobStatus.PENDING],
            count[JobStatus.SCHEDULED],
            count[JobStatus.CLAIMED],
            self.acks[queue],
            count[JobStatus.DEAD],
        )


# -- the raw-store check -------------------------------------------------------

STATUS_OF_SPACE = {space: JobStatus(status) for status, space in keys.SPACES.items()}


def key_of(job: JobRecord) -> bytes:
    """Where the design's key table says ``job`` lives (written from the table, not from transitions.py)."""
    if job.status is JobStatus.PENDING:
        return b"pending:%s:%010d:%s" % (job.queue.encode(), job.priority, job.id.encode())
    if job.status is JobStatus.DEAD:
        return b"dead:%s:%s" % (job.queue.encode(), job.id.encode())
    at = {
        JobStatus.SCHEDULED: job.run_at,
        JobStatus.CLAIMED: job.lease_expires_at,
        JobStatus.DONE: job.completed_at,
    }[job.status]
    space = job.status.value.lower().encode()
    return b"%s:%020d:%s:%s" % (space, at, job.queue.encode(), job.id.encode())


def check_dump(dump: dict[bytes, bytes], model: Model | None = None) -> dict[str, JobRecord]:
    """Check the design's invariants on one raw scan; with ``model``, check the store equals it.

    Returns the stored jobs by id.  Invariants (design.md):

    1. every ``jobindex`` entry points at an existing key whose record has
       that id and the status of its key space; every record has its entry;
    2. pending/scheduled/claimed/dead counters equal the key counts (and,
       with a model, ``done`` equals the acknowledgements);
    3. ``dedup:{q}:{k}`` exists exactly for pending/scheduled jobs carrying
       k, holding that job's id;
    4. claim order is the key order (checked by the key equality below:
       every record is under the key its priority and id give);
    5. conservation: every job the model knows is stored exactly once, in
       the state the model says, or left through ack, cancel or retention;
    6. attempts never exceed max_attempts.
    """
    records: dict[str, JobRecord] = {}
    index: dict[str, bytes] = {}
    dedups: dict[bytes, bytes] = {}
    counters: dict[tuple[str, str], int] = {}
    key_counts: Counter[tuple[str, str]] = Counter()
    user: dict[bytes, bytes] = {}
    quarantined: list[bytes] = []
    for key, value in dump.items():
        space = key[: key.index(b":") + 1] if b":" in key else key
        status = STATUS_OF_SPACE.get(space)
        if status is not None:
            job = decode_record(value, key)
            assert job.status is status, f"{key!r} holds a {job.status.value} record"
            assert key == key_of(job), f"record {job.id} is under {key!r}, expected {key_of(job)!r}"
            assert job.attempts <= job.max_attempts, f"job {job.id}: attempts {job.attempts} > {job.max_attempts}"
            assert job.id not in records, f"job {job.id} stored twice"
            assert job.lease_expires_at is not None or status is not JobStatus.CLAIMED, job
            records[job.id] = job
            key_counts[(job.queue, status.value.lower())] += 1
        elif space == keys.JOBINDEX:
            index[key[len(keys.JOBINDEX):].decode()] = value
        elif space == keys.DEDUP:
            dedups[key] = value
        elif space == keys.STATS:
            queue, metric = key[len(keys.STATS):].decode().rsplit(":", 1)
            counters[(queue, metric)] = decode_counter(value)
        elif space == keys.USER:
            user[key[len(keys.USER):]] = value
        elif space == keys.QUARANTINE:
            quarantined.append(key)  # undecodable bytes moved aside: outside every job space
        else:
            raise AssertionError(f"unexpected key {key!r} in the store")
    # 1. index <-> records
    assert set(index) == set(records), (
        f"index without record: {sorted(set(index) - set(records))}, "
        f"record without index: {sorted(set(records) - set(index))}"
    )
    for job_id, target in index.items():
        assert target == key_of(records[job_id]), f"jobindex:{job_id} points at {target!r}"
    # 2. counters
    for (queue, metric), n in key_counts.items():
        if metric != "done":  # done counts acknowledgements, not kept records
            assert counters.get((queue, metric)) == n, f"counter {queue}:{metric} is {counters.get((queue, metric))}, keys {n}"
    for (queue, metric), n in counters.items():
        if metric != "done":
            assert n == key_counts[(queue, metric)], f"counter {queue}:{metric} is {n}, keys {key_counts[(queue, metric)]}"
    # 3. dedup
    expected_dedup = {
        keys.dedup_key(j.queue, j.dedup_key): j.id.encode()
        for j in records.values()
        if j.dedup_key is not None and j.status in (JobStatus.PENDING, JobStatus.SCHEDULED)
    }
    assert dedups == expected_dedup, f"dedup index {dedups} != {expected_dedup}"
    # 5. and the rest, against the model
    if model is not None:
        assert not quarantined, f"nothing was corrupted, yet {quarantined} were quarantined"
        live, gone = set(model.jobs), set(model.gone)
        assert not live & gone and live | gone == set(model.created), "model lost track of a job"
        missing = live - set(records)
        extra = set(records) - live
        assert not missing and not extra, f"jobs missing from the store: {missing}; unexpected jobs: {extra}"
        for job_id, job in records.items():
            assert job == model.jobs[job_id], f"stored {job}\n  model {model.jobs[job_id]}"
        for queue in {q for q, _ in counters} | model.queues_seen:
            assert counters.get((queue, "done"), 0) == model.acks[queue], f"done counter of {queue}"
        assert {q for q, _ in counters} == model.queues_seen
        assert {keys.dedup_key(q, k): i.encode() for (q, k), i in model.dedup.items()} == dedups
        assert user == model.kv, f"caller KV {user} != model {model.kv}"
    return records


async def dump_store(store: KVStore) -> dict[bytes, bytes]:
    txn = await store.begin()
    try:
        return dict(await txn.scan(b""))
    finally:
        await txn.rollback()


# -- stores that can be closed and reopened ------------------------------------

SLATEDB_TEST_FLUSH_MS = 1

OUTCOMES: Counter[tuple[str, str]] = Counter()
"""How often each operation had each outcome, over the whole process (coverage report)."""


class StoreHandle:
    """Opens a store of one kind, and reopens it after the queue closed it."""

    kind = ""

    async def open(self) -> KVStore:
        raise NotImplementedError

    async def reopen(self, closed: KVStore) -> KVStore:
        raise NotImplementedError

    def cleanup(self) -> None:
        pass


class MemoryHandle(StoreHandle):
    """``MemoryStore``; a reopen keeps every committed write (:meth:`MemoryStore.reopen`)."""

    kind = "inmemory"

    async def open(self) -> KVStore:
        return MemoryStore()

    async def reopen(self, closed: KVStore) -> KVStore:
        assert isinstance(closed, MemoryStore)
        return closed.reopen()


class SlateMemoryHandle(StoreHandle):
    """SlateDB on ``memory://``; a reopen builds a new database on the same in-memory object store.

    ``memory://`` opened by URL is empty every time; passing the same object
    store back makes the reopen a real SlateDB close, recovery and open.
    """

    kind = "slatedb-memory"

    def __init__(self) -> None:
        self.object_store = sdb.ObjectStore.resolve("memory://")
        self.url = f"memory://?flush_interval_ms={SLATEDB_TEST_FLUSH_MS}"

    async def open(self) -> KVStore:
        return await SlateDBStore.open(self.url, object_store=self.object_store)

    async def reopen(self, closed: KVStore) -> KVStore:
        return await self.open()


class UrlHandle(StoreHandle):
    """A SlateDB store named by a URL (``file://``, ``s3://``): reopened by URL."""

    def __init__(self, url: str, kind: str, tmp: tempfile.TemporaryDirectory | None = None) -> None:
        self.url = url
        self.kind = kind
        self._tmp = tmp

    async def open(self) -> KVStore:
        return await SlateDBStore.open(self.url)

    async def reopen(self, closed: KVStore) -> KVStore:
        return await self.open()

    def cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def file_handle() -> UrlHandle:
    tmp = tempfile.TemporaryDirectory(prefix="taquba-model-")
    return UrlHandle(f"file://{tmp.name}/db?flush_interval_ms={SLATEDB_TEST_FLUSH_MS}", "slatedb-file", tmp)


def handle_for(kind: str) -> StoreHandle:
    if kind == "inmemory":
        return MemoryHandle()
    if kind == "slatedb-memory":
        return SlateMemoryHandle()
    if kind == "slatedb-file":
        return file_handle()
    raise ValueError(kind)


# -- the harness ---------------------------------------------------------------

Op = tuple[str, dict[str, Any]]


class Harness:
    """A real queue and the model, driven by operations ``(name, kwargs)``.

    :meth:`step` applies one operation to both, compares every return value,
    then checks the raw store (one scan) against the invariants and the
    model, and returns the observation with job ids replaced by their
    creation ordinals (``#0``, ``#1``, ...) so that runs on different stores
    compare equal.
    """

    def __init__(self, handle: StoreHandle) -> None:
        self.handle = handle
        self.clock = ManualClock(START_MS)
        self.model = Model()
        self.held: list[JobRecord] = []  # claims handed out, current or stale
        self.queue: Queue | None = None
        self.last_dump: dict[bytes, bytes] = {}
        self.steps = 0

    async def start(self) -> None:
        self.queue = await self._open(await self.handle.open())
        self.last_dump = await self.check()

    async def _open(self, store: KVStore) -> Queue:
        return await Queue.open(store, queues=CONFIGS, clock=self.clock, background=False)

    async def close(self) -> None:
        if self.queue is not None:
            await self.queue.close()
            self.queue = None
        self.handle.cleanup()

    # -- helpers

    @property
    def q(self) -> Queue:
        assert self.queue is not None
        return self.queue

    def now(self) -> int:
        return self.clock.now_ms()

    def target(self, ref: int, *prefer: JobStatus) -> str:
        """A job id picked by ``ref``: an unknown id for a negative ``ref``; for an even
        ``ref`` a live job in one of the ``prefer`` states when there is one; else
        any job ever created (gone ones included)."""
        if ref < 0 or not self.model.created:
            return UNKNOWN_ID
        if prefer and ref % 2 == 0:
            preferred = sorted(j.id for j in self.model.jobs.values() if j.status in prefer)
            if preferred:
                return preferred[(ref // 2) % len(preferred)]
        return self.model.created[ref % len(self.model.created)]

    def pick_queue(self, queue: str | None) -> str:
        """``queue``, or for ``None`` the first queue with a pending job (else ``a``)."""
        if queue is not None:
            return queue
        return next((q for q in QUEUES if self.model.in_state(q, JobStatus.PENDING)), QUEUES[0])

    def norm(self, value: Any) -> Any:
        """``value`` with every job id replaced by ``#ordinal`` (records become tuples)."""
        if isinstance(value, JobRecord):
            fields = {k: getattr(value, k) for k in value.__dataclass_fields__ if k != "cancellation"}
            return tuple(sorted((k, self.norm(v)) for k, v in fields.items()))
        if isinstance(value, str):
            return self._norm_text(value)
        if isinstance(value, (list, tuple)):
            return type(value)(self.norm(v) for v in value)
        if isinstance(value, dict):
            return tuple(sorted((self.norm(k), self.norm(v)) for k, v in value.items()))
        if isinstance(value, bytes):
            return self._norm_bytes(value)
        return value

    def _norm_text(self, text: str) -> str:
        for n, job_id in enumerate(self.model.created):
            text = text.replace(job_id, f"#{n}")
        for n, claim_id in enumerate(self.model.claim_ids):
            text = text.replace(claim_id, f"~{n}")
        return text.replace(UNKNOWN_ID, "#unknown")

    def _norm_bytes(self, data: bytes) -> bytes:
        if len(data) < 26:
            return data
        for n, job_id in enumerate(self.model.created):
            data = data.replace(job_id.encode(), b"#%d" % n)
        for n, claim_id in enumerate(self.model.claim_ids):
            data = data.replace(claim_id.encode(), b"~%d" % n)
        return data

    def normalized_dump(self) -> tuple[tuple[bytes, bytes], ...]:
        return tuple(sorted((self._norm_bytes(k), self._norm_bytes(v)) for k, v in self.last_dump.items()))

    def lease_ms(self, queue: str, lease: float | None) -> int:
        return to_ms(config_of(queue).lease if lease is None else lease)

    # -- the step

    async def step(self, op: Op) -> Any:
        name, args = op
        result = await getattr(self, "op_" + name)(**args)
        unchanged = isinstance(result, tuple) and result[:1] == ("unchanged",)
        OUTCOMES[(name, result[1] if unchanged and isinstance(result[1], str) else result[0])] += 1
        dump = await self.check()
        if unchanged:
            assert dump == self.last_dump, f"{name} should have changed nothing"
        self.last_dump = dump
        self.steps += 1
        return self.norm(result)

    async def check(self) -> dict[bytes, bytes]:
        dump = await dump_store(self.q.store)
        check_dump(dump, self.model)
        for queue in QUEUES:
            s = await self.q.stats(queue)
            got = (s.pending, s.scheduled, s.claimed, s.done, s.dead)
            assert got == self.model.stats(queue), f"stats({queue!r}) {got} != model {self.model.stats(queue)}"
        assert await self.q.list_queues() == sorted(self.model.queues_seen)
        return dump

    # -- enqueue

    async def op_enqueue(self, queue: str, payload: bytes) -> Any:
        now = self.now()
        job_id = await self.q.enqueue(queue, payload)
        self.model.insert(job_id, queue, payload, now)
        return ("id", job_id)

    async def op_enqueue_with(
        self,
        queue: str,
        payload: bytes,
        timing: tuple[str, int | float] | None = None,
        kv_writes: dict[bytes, bytes | None] | None = None,
        **options: Any,
    ) -> Any:
        now = self.now()
        delay = run_at_ms = run_at = None
        if timing is not None and timing[0] == "delay":
            delay = timing[1]
        elif timing is not None:
            run_at_ms = now + int(timing[1])
            run_at = EPOCH + timedelta(milliseconds=run_at_ms)
        holder = self.model.dedup_holder(queue, options.get("dedup_key"))
        result = await self.q.enqueue_with(
            queue, payload, delay=delay, run_at=run_at, kv_writes=kv_writes, **options
        )
        if holder is not None:
            assert (result.id, result.created) == (holder, False), "a dedup hit must return the holder"
            return ("unchanged", "dedup-hit", result.id)
        assert result.created
        self.model.insert(result.id, queue, payload, now, delay=delay, run_at_ms=run_at_ms, **options)
        self.model.kv_write(kv_writes)
        return ("created", result.id)

    async def op_enqueue_batch(
        self, queue: str, payloads: list[bytes], kv_writes: dict[bytes, bytes | None] | None = None, **options: Any
    ) -> Any:
        now = self.now()
        ids = await self.q.enqueue_batch(queue, payloads, kv_writes=kv_writes, **options)
        assert len(ids) == len(payloads) and ids == sorted(ids)
        for job_id, payload in zip(ids, payloads):
            self.model.insert(job_id, queue, payload, now, **options)
        self.model.kv_write(kv_writes)
        return ("ids", ids)

    # -- claims

    async def op_claim(self, queue: str | None, how: str, n: int = 1, lease: float | None = None) -> Any:
        queue = self.pick_queue(queue)
        now = self.now()
        if how == "next":
            lease = None  # claim_next takes the queue's lease
        expected = self.model.claim(queue, n if how == "batch" else 1, now, self.lease_ms(queue, lease))
        if how == "batch":
            got = await self.q.claim_batch(queue, n, lease)
        elif how == "next":
            got = [await self.q.claim_next(queue)]
        elif how == "wait0":
            got = [await self.q.claim_with_wait(queue, lease, max_wait=0)]
        else:
            got = [await self.q.claim(queue, lease)]
        got = [j for j in got if j is not None]
        return self._claimed(got, expected)

    def _claimed(self, got: list[JobRecord], expected: list[JobRecord]) -> Any:
        assert [g.id for g in got] == [e.id for e in expected], f"claimed {got}\n  model {expected}"
        self.model.claimed_as(got)
        expected = [replace(e, claim_id=g.claim_id) for e, g in zip(expected, got)]
        assert got == expected, f"claimed {got}\n  model {expected}"
        for job in got:
            assert job.cancellation is not None and job.cancellation.is_set() == job.cancel_requested
        self.held = (self.held + got)[-16:]
        return ("claimed", got) if got else ("unchanged", "nothing to claim")

    async def op_claim_woken(self, queue: str, payload: bytes, lease: float | None = None) -> Any:
        """``claim_with_wait`` parked on an empty queue is woken by an enqueue (no polling, real time)."""
        now = self.now()
        if self.model.in_state(queue, JobStatus.PENDING):
            expected = self.model.claim(queue, 1, now, self.lease_ms(queue, lease))
            got = await asyncio.wait_for(self.q.claim_with_wait(queue, lease, max_wait=30), 30)
            return self._claimed([got], expected)
        waiter = asyncio.ensure_future(self.q.claim_with_wait(queue, lease, max_wait=30))
        for _ in range(3):
            await asyncio.sleep(0)
        job_id = await self.q.enqueue(queue, payload)
        self.model.insert(job_id, queue, payload, now)
        expected = self.model.claim(queue, 1, now, self.lease_ms(queue, lease))
        got = await asyncio.wait_for(waiter, 30)
        return self._claimed([got], expected)

    # -- settlements

    async def _held(self, ref: int, prefer_cancelled: bool = False) -> JobRecord | None:
        """A claim handed out earlier, picked by ``ref``.

        For an even ``ref``: a current claim (one whose cancellation was
        requested first, with ``prefer_cancelled``); when none is held but a
        job is pending, a claim is made first (a step of its own, checked like
        any other), so that settlements mostly meet live claims.  For an odd
        ``ref``: any claim handed out, possibly stale (reaped, settled,
        re-claimed, or from before a reopen).
        """
        if ref % 2 == 0:
            current = [j for j in self.held if self.model.claim_is_current(j)]
            if prefer_cancelled and current and ref % 4 == 0:
                if not any(self.model.jobs[j.id].cancel_requested for j in current):
                    await self.step(("cancel_claim", {"job_id": current[0].id}))
                current = [j for j in current if self.model.jobs[j.id].cancel_requested]
            if not current and any(self.model.in_state(q, JobStatus.PENDING) for q in QUEUES):
                await self.step(("claim", {"queue": None, "how": "one"}))
                current = [j for j in self.held if self.model.claim_is_current(j)]
            if current:
                return current[(ref // 2) % len(current)]
        return self.held[ref % len(self.held)] if self.held else None

    async def _lost(self, call: Awaitable[Any], job: JobRecord) -> Any:
        try:
            await call
        except ClaimLost as exc:
            assert job.id in str(exc)
            return ("unchanged", "ClaimLost")
        raise AssertionError(f"settling the stale claim {job} did not raise ClaimLost")

    async def op_ack(self, ref: int, kv_writes: dict[bytes, bytes | None] | None = None) -> Any:
        job = await self._held(ref)
        if job is None:
            return ("unchanged", "no claim held")
        if not self.model.claim_is_current(job):
            return await self._lost(self.q.ack(job, kv_writes=kv_writes), job)
        now = self.now()
        await self.q.ack(job, kv_writes=kv_writes)
        self.model.ack(job.id, now)
        self.model.kv_write(kv_writes)
        return ("acked", job.id)

    async def op_nack(self, ref: int, error: str) -> Any:
        job = await self._held(ref)
        if job is None:
            return ("unchanged", "no claim held")
        if not self.model.claim_is_current(job):
            return await self._lost(self.q.nack(job, error), job)
        expected = self.model.nack(job.id, self.now(), error)
        got = await self.q.nack(job, error)
        assert got == expected, f"nack gave {got}\n  model {expected}"
        return ("nacked-" + got.status.value.lower(), got)

    async def op_dead_letter(self, ref: int, reason: str) -> Any:
        job = await self._held(ref)
        if job is None:
            return ("unchanged", "no claim held")
        if not self.model.claim_is_current(job):
            return await self._lost(self.q.dead_letter(job, reason), job)
        expected = self.model.dead_letter(job.id, self.now(), reason)
        got = await self.q.dead_letter(job, reason)
        assert got == expected, f"dead_letter gave {got}\n  model {expected}"
        return ("dead", got)

    async def op_renew(self, ref: int, lease: float | None = None) -> Any:
        job = await self._held(ref, prefer_cancelled=True)
        if job is None:
            return ("unchanged", "no claim held")
        if not self.model.claim_is_current(job):
            return await self._lost(self.q.renew_lease(job, lease), job)
        if self.model.jobs[job.id].cancel_requested:
            try:
                await self.q.renew_lease(job, lease)
            except CancelRequested as exc:
                assert job.id in str(exc)
                return ("unchanged", "CancelRequested")
            raise AssertionError("renewing a claim whose cancellation was requested must fail")
        expected = self.model.renew(job.id, self.now(), self.lease_ms(job.queue, lease))
        got = await self.q.renew_lease(job, lease)
        assert got == expected.lease_expires_at == job.lease_expires_at
        return ("renewed", got)

    # -- cancel, requeue

    async def op_cancel(self, ref: int) -> Any:
        if ref % 4 == 0:
            job_id = self.target(ref, JobStatus.CLAIMED)
        else:
            job_id = self.target(ref, JobStatus.PENDING, JobStatus.SCHEDULED, JobStatus.CLAIMED)
        expected = self.model.cancel(job_id)
        got = await self.q.cancel(job_id)
        assert got is expected, f"cancel({job_id}) gave {got}, model {expected}"
        if got is CancelOutcome.REQUESTED:
            current = [j for j in self.held if self.model.claim_is_current(j)]
            assert all(j.cancellation.is_set() for j in current if j.id == job_id)
        if got is CancelOutcome.NOT_FOUND:
            return ("unchanged", got.value)
        return (got.value, job_id)

    async def op_cancel_claim(self, job_id: str) -> Any:
        """cancel() of a job known to be claimed (a sub-step of op_renew)."""
        assert self.model.cancel(job_id) is CancelOutcome.REQUESTED
        assert await self.q.cancel(job_id) is CancelOutcome.REQUESTED
        return ("requested", job_id)

    async def op_requeue(self, ref: int) -> Any:
        job_id = self.target(ref, JobStatus.DEAD)
        expected = self.model.requeue(job_id)
        if expected is None:
            try:
                await self.q.requeue_dead_job(job_id)
            except JobNotFound as exc:
                assert job_id in str(exc)
                return ("unchanged", "JobNotFound")
            raise AssertionError(f"requeue of {job_id}, which is not dead, did not raise JobNotFound")
        got = await self.q.requeue_dead_job(job_id)
        assert got == expected
        return ("requeued", got)

    # -- time and sweeps

    async def op_advance(self, ms: int, deadline: str | None = None, offset: int = 0) -> Any:
        """Advance the clock by ``ms`` (negative: backwards); with ``deadline``, move
        it to ``offset`` ms around the next deadline of that kind (else of any
        kind) when there is one ahead: boundaries are where off-by-ones live."""
        if deadline is not None:
            ahead = [t for t in self.deadlines(deadline) if t > self.now()]
            if not ahead:
                kinds = ("run_at", "lease", "done", "dead")
                ahead = [t for kind in kinds for t in self.deadlines(kind) if t > self.now()]
            if ahead:
                self.clock.set(min(ahead) + offset)
                return ("unchanged", "clock-to-deadline")
        self.clock.advance(ms)
        return ("unchanged", "clock", ms)

    def deadlines(self, kind: str) -> list[int]:
        jobs = self.model.jobs.values()
        if kind == "run_at":
            return [j.run_at for j in jobs if j.status is JobStatus.SCHEDULED]
        if kind == "lease":
            return [j.lease_expires_at for j in jobs if j.status is JobStatus.CLAIMED]
        if kind == "done":
            return [
                j.completed_at + to_ms(config_of(j.queue).keep_done_jobs)
                for j in jobs
                if j.status is JobStatus.DONE
            ]
        return [
            j.failed_at + to_ms(config_of(j.queue).dead_retention)
            for j in jobs
            if j.status is JobStatus.DEAD and config_of(j.queue).dead_retention is not None
        ]

    def _to_deadline(self, kinds: tuple[str, ...], offset: int) -> None:
        """Set the clock ``offset`` ms from the next deadline of ``kinds`` ahead, if any."""
        ahead = [t for kind in kinds for t in self.deadlines(kind) if t > self.now()]
        if ahead:
            self.clock.set(min(ahead) + offset)

    async def op_promote(self, offset: int | None = None) -> Any:
        """promote_now; with ``offset``, first move the clock that far from the next run_at."""
        if offset is not None:
            self._to_deadline(("run_at",), offset)
        boundary = self.now() in self.deadlines("run_at")
        expected = self.model.promote(self.now())
        got = await self.q.promote_now()
        assert got == expected, f"promoted {got}, model {expected}"
        return ("promoted-at-run_at" if boundary else "promoted", got)

    async def op_reap(self, offset: int | None = None) -> Any:
        """reap_now; with ``offset``, first move the clock that far from the next lease
        expiry or retention deadline."""
        if offset is not None:
            self._to_deadline(("lease", "done", "dead"), offset)
        now = self.now()
        expected = self.model.expire(now, now, REAP_REASON)
        self.model.sweep_retention(now)
        got = await self.q.reap_now()
        assert got == expected, f"reaped {got}, model {expected}"
        return ("reaped", got)

    async def op_reopen(self) -> Any:
        """Close the queue (and its store), reopen the store, open a new queue: recovery runs."""
        await self.q.close()
        store = await self.handle.reopen(self.q.store)
        self.queue = None
        self.queue = await self._open(store)
        now = self.now()
        self.model.expire(None, now, RECOVERY_REASON)
        return ("reopened",)

    # -- reads

    async def op_get_job(self, ref: int) -> Any:
        job_id = self.target(ref)
        got = await self.q.get_job(job_id)
        assert got == self.model.jobs.get(job_id)
        return ("unchanged", "job", got)

    async def op_wait(self, ref: int) -> Any:
        job_id = self.target(ref)
        got = await self.q.wait_for_completion(job_id, timeout=0)
        job = self.model.jobs.get(job_id)
        if job is None:
            # an unknown or removed id is NOT_FOUND at the call
            assert got.status is WaitStatus.NOT_FOUND and got.record is None
        elif job.status in (JobStatus.DONE, JobStatus.DEAD):
            assert got.status is WaitStatus.COMPLETED and got.record == job
        else:
            assert got.status is WaitStatus.TIMED_OUT
        return ("unchanged", "wait", got.status.value)

    async def op_list_jobs(self, queue: str, status: str, limit: int) -> Any:
        state = JobStatus(status)
        listed: list[JobRecord] = []
        cursor = None
        for _ in range(1000):
            page, cursor = await self.q.list_jobs(queue, state, cursor, limit)
            assert len(page) <= limit
            listed += page
            if cursor is None:
                break
        assert listed == self.model.in_state(queue, state), f"list_jobs({queue!r}, {status})"
        return ("unchanged", "listed", listed)

    async def op_dead_jobs(self, queue: str, limit: int) -> Any:
        listed: list[JobRecord] = []
        after = None
        for _ in range(1000):
            page = await self.q.dead_jobs(queue, after, limit)
            assert len(page) <= limit
            listed += page
            if len(page) < limit:
                break
            after = page[-1].id
        assert listed == self.model.in_state(queue, JobStatus.DEAD)
        return ("unchanged", "dead", listed)

    # -- caller KV

    async def op_kv_put(self, key: bytes, value: bytes) -> Any:
        await self.q.kv_put(key, value)
        self.model.kv_write({key: value})
        return ("kv",)

    async def op_kv_delete(self, key: bytes) -> Any:
        await self.q.kv_delete(key)
        existed = key in self.model.kv
        self.model.kv_write({key: None})
        return ("kv",) if existed else ("unchanged", "kv-delete-absent")

    async def op_kv_write(self, writes: dict[bytes, bytes | None]) -> Any:
        await self.q.kv_write(writes)
        self.model.kv_write(writes)
        return ("kv",)

    async def op_kv_get(self, key: bytes) -> Any:
        got = await self.q.kv_get(key)
        assert got == self.model.kv.get(key), f"kv_get({key!r})"
        return ("unchanged", "kv", got)

    async def op_kv_scan(self, prefix: bytes, limit: int) -> Any:
        rows: list[tuple[bytes, bytes]] = []
        cursor = None
        for _ in range(1000):
            page, cursor = await self.q.kv_scan(prefix, cursor, limit)
            assert len(page) <= limit
            rows += page
            if cursor is None:
                break
        expected = sorted((k, v) for k, v in self.model.kv.items() if k.startswith(prefix))
        assert rows == expected, f"kv_scan({prefix!r}) gave {rows}, model {expected}"
        return ("unchanged", "kv", rows)


# -- strategies of operations ----------------------------------------------------

queues = st.sampled_from(QUEUES)
maybe_queues = st.one_of(st.none(), queues)  # None: a queue with a pending job
payloads = st.binary(max_size=6)
refs = st.integers(-1, 63)  # -1: an unknown id
leases = st.one_of(st.none(), st.sampled_from([0.001, 1, 4, 30]))
kv_keys = st.sampled_from(KV_KEYS)
kv_values = st.binary(max_size=6)
kv_writes = st.one_of(
    st.none(), st.dictionaries(kv_keys, st.one_of(st.none(), kv_values), max_size=2)
)
timings = st.one_of(
    st.none(),
    st.tuples(st.just("delay"), st.sampled_from([0, 0.0004, 0.001, 0.5, 1, 2.5, 30, 90])),
    st.tuples(st.just("run_at"), st.integers(-2_000, 90_000)),
)
options = {
    "priority": st.one_of(st.none(), st.sampled_from([0, 1, 500, 1000, 2**32 - 1])),
    "max_attempts": st.sampled_from([None, 1, 1, 2, 4]),
    "headers": st.one_of(st.none(), st.dictionaries(st.sampled_from(["h", "tenant"]), st.text(max_size=3), max_size=2)),
}
errors = st.sampled_from(["boom", "", "é", "x" * 40])


def make_op(name: str, args: dict[str, Any]) -> Op:
    return (name, args)


def op(name: str, **args: st.SearchStrategy[Any]) -> st.SearchStrategy[Op]:
    return st.builds(make_op, st.just(name), st.fixed_dictionaries(args))


OPS: dict[str, st.SearchStrategy[Op]] = {
    "enqueue": op("enqueue", queue=queues, payload=payloads),
    "enqueue_with": op(
        "enqueue_with",
        queue=queues,
        payload=payloads,
        timing=timings,
        dedup_key=st.sampled_from([None, "k1", "k2"]),
        kv_writes=kv_writes,
        **options,
    ),
    "enqueue_batch": op(
        "enqueue_batch",
        queue=queues,
        payloads=st.lists(payloads, max_size=4),
        kv_writes=kv_writes,
        delay=st.one_of(st.none(), st.sampled_from([0, 1, 30])),
        **options,
    ),
    "claim": op("claim", queue=maybe_queues, how=st.sampled_from(["one", "next", "wait0"]), lease=leases),
    "claim_batch": op("claim", queue=maybe_queues, how=st.just("batch"), n=st.integers(1, 4), lease=leases),
    "claim_woken": op("claim_woken", queue=queues, payload=payloads, lease=leases),
    "ack": op("ack", ref=st.integers(0, 63), kv_writes=kv_writes),
    "nack": op("nack", ref=st.integers(0, 63), error=errors),
    "dead_letter": op("dead_letter", ref=st.integers(0, 63), reason=errors),
    "renew": op("renew", ref=st.integers(0, 63), lease=leases),
    "cancel": op("cancel", ref=refs),
    "requeue": op("requeue", ref=refs),
    "advance": op(
        "advance",
        ms=st.one_of(
            st.sampled_from([1, 500, 1_000, 2_000, 4_000, 5_000, 10_000, 30_000, 61_000, 3_600_000]),
            st.integers(-1_000, 70_000),
        ),
        deadline=st.sampled_from([None, "run_at", "lease", "done", "dead"]),
        offset=st.sampled_from([-1, 0, 0, 1]),
    ),
    "promote": op("promote", offset=st.sampled_from([None, -1, 0])),
    "reap": op("reap", offset=st.sampled_from([None, -1, 0])),
    "reopen": op("reopen"),
    "get_job": op("get_job", ref=refs),
    "wait": op("wait", ref=refs),
    "list_jobs": op(
        "list_jobs", queue=queues, status=st.sampled_from([s.value for s in JobStatus]), limit=st.integers(1, 3)
    ),
    "dead_jobs": op("dead_jobs", queue=queues, limit=st.integers(1, 3)),
    "kv_put": op("kv_put", key=kv_keys, value=kv_values),
    "kv_delete": op("kv_delete", key=kv_keys),
    "kv_write": op("kv_write", writes=st.dictionaries(kv_keys, st.one_of(st.none(), kv_values), max_size=3)),
    "kv_get": op("kv_get", key=kv_keys),
    "kv_scan": op("kv_scan", prefix=st.sampled_from(KV_PREFIXES), limit=st.integers(1, 4)),
}

ANY_OP = st.one_of(*OPS.values())


async def run_ops(kind: str, ops: list[Op]) -> list[Any]:
    """Run ``ops`` on a fresh store of ``kind``; the trace of normalized observations and dumps."""
    harness = Harness(handle_for(kind))
    await harness.start()
    trace: list[Any] = []
    try:
        for operation in ops:
            observed = await harness.step(operation)
            trace.append((operation[0], observed, harness.normalized_dump()))
    finally:
        await harness.close()
    return trace


def describe(ops: list[Op]) -> str:
    return json.dumps([[name, {k: repr(v) for k, v in args.items()}] for name, args in ops], indent=1)
