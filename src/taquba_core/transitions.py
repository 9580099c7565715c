"""State transitions: functions of (transaction, record, now, config).

Each function reads and writes keys inside one transaction and returns what
happened; it never commits.  :class:`taquba_core.queue.Queue` retries them on
conflict, commits, and fires the in-process wake-ups.  Every move between key
spaces rewrites ``jobindex:{id}`` and merges the matching counter deltas.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from . import keys
from .config import QueueConfig
from .errors import CancelRequested, ClaimLost, CorruptRecord, JobNotFound
from .ids import new_job_id
from .kv import Transaction
from .record import JobRecord, JobStatus, decode_record, encode_record

METRICS = ("pending", "scheduled", "claimed", "done", "dead")
_METRIC = {
    JobStatus.PENDING: "pending",
    JobStatus.SCHEDULED: "scheduled",
    JobStatus.CLAIMED: "claimed",
    JobStatus.DONE: "done",
    JobStatus.DEAD: "dead",
}

KvWrites = Mapping[bytes, bytes | None]

log = logging.getLogger("taquba")


def key_for(job: JobRecord) -> bytes:
    """The primary key a record lives under, from its status and fields."""
    status = job.status
    if status is JobStatus.PENDING:
        return keys.pending_key(job.queue, job.priority, job.id)
    if status is JobStatus.SCHEDULED:
        assert job.run_at is not None
        return keys.scheduled_key(job.run_at, job.queue, job.id)
    if status is JobStatus.CLAIMED:
        assert job.lease_expires_at is not None
        return keys.claimed_key(job.lease_expires_at, job.queue, job.id)
    if status is JobStatus.DONE:
        assert job.completed_at is not None
        return keys.done_key(job.completed_at, job.queue, job.id)
    return keys.dead_key(job.queue, job.id)


async def _count(txn: Transaction, queue: str, status: JobStatus, delta: int) -> None:
    await txn.merge_counter(keys.stats_key(queue, _METRIC[status]), delta)


async def _store(txn: Transaction, job: JobRecord) -> bytes:
    """Write ``job`` under its key, point its index entry at it, count it in."""
    key = key_for(job)
    await txn.put(key, encode_record(job))
    await txn.put(keys.jobindex_key(job.id), key)
    await _count(txn, job.queue, job.status, 1)
    return key


async def _remove(txn: Transaction, key: bytes, job: JobRecord) -> None:
    """Delete ``job``'s record at ``key`` and count it out (the index entry stays)."""
    await txn.delete(key)
    await _count(txn, job.queue, job.status, -1)


async def _move(txn: Transaction, old_key: bytes, old: JobRecord, new: JobRecord) -> bytes:
    await _remove(txn, old_key, old)
    return await _store(txn, new)


async def _drop(txn: Transaction, key: bytes, job: JobRecord) -> None:
    """Remove a job entirely: record, index entry, and its counter."""
    await _remove(txn, key, job)
    await txn.delete(keys.jobindex_key(job.id))


async def apply_kv_writes(txn: Transaction, writes: KvWrites | None) -> None:
    """Apply caller KV writes (``None`` value = delete) under the ``usr:`` prefix."""
    for key, value in (writes or {}).items():
        if value is None:
            await txn.delete(keys.user_key(key))
        else:
            await txn.put(keys.user_key(key), value)


# -- undecodable records ----------------------------------------------------------

_SPACE_METRIC = {keys.PENDING: "pending", keys.SCHEDULED: "scheduled", keys.CLAIMED: "claimed", keys.DEAD: "dead"}


async def scan_records(
    txn: Transaction,
    prefix: bytes,
    *,
    start_after: bytes | None = None,
    end: bytes | None = None,
    limit: int,
) -> list[tuple[bytes, JobRecord]]:
    """Up to ``limit`` (key, record) pairs of a job space, as ``txn.scan`` orders them.

    A value that cannot be decoded is moved aside by :func:`quarantine` and
    the scan goes on past it, so one corrupt record neither wedges the head
    of a queue nor stops a sweep, and is reported once (logged with its key).
    """
    out: list[tuple[bytes, JobRecord]] = []
    while len(out) < limit:
        want = limit - len(out)
        rows = await txn.scan(prefix, start_after=start_after, end=end, limit=want)
        for key, value in rows:
            start_after = key
            job = await _decode_or_quarantine(txn, key, value)
            if job is not None:
                out.append((key, job))
        if len(rows) < want:
            break
    return out


async def read_records(txn: Transaction, candidates: Iterable[bytes], limit: int) -> list[tuple[bytes, JobRecord]]:
    """Up to ``limit`` (key, record) pairs of the ``candidates`` that are stored, in the order given.

    Point reads instead of a scan (a claim on a queue whose live keys are
    known, see :mod:`taquba_core.claim_cursor`); absent keys are skipped and
    undecodable values quarantined as by :func:`scan_records`.
    """
    out: list[tuple[bytes, JobRecord]] = []
    for key in candidates:
        if len(out) == limit:
            break
        value = await txn.get(key)
        job = None if value is None else await _decode_or_quarantine(txn, key, value)
        if job is not None:
            out.append((key, job))
    return out


async def _decode_or_quarantine(txn: Transaction, key: bytes, value: bytes) -> JobRecord | None:
    try:
        return decode_record(value, key)
    except CorruptRecord as exc:
        await quarantine(txn, key, value, exc)
        return None


async def quarantine(txn: Transaction, key: bytes, value: bytes, error: Exception) -> None:
    """Move the undecodable ``value`` stored at job key ``key`` to ``quarantine:{key}``.

    When the job index points at ``key``, the record was indexed and
    counted: its index entry, a dedup entry holding its id, and its count
    (a done record's acknowledgement stays counted) go with it, so the
    invariants hold without it.  Garbage under a key nobody indexed is just
    moved.
    """
    target = keys.QUARANTINE + key
    log.error("%s; moved it aside to %r", error, target)
    await txn.put(target, value)
    await txn.delete(key)
    try:
        parsed = keys.parse_job_key(key)
    except CorruptRecord:
        return
    index = keys.jobindex_key(parsed.job_id)
    if await txn.get(index) != key:
        return
    await txn.delete(index)
    if parsed.space in _SPACE_METRIC:
        await txn.merge_counter(keys.stats_key(parsed.queue, _SPACE_METRIC[parsed.space]), -1)
    if parsed.space in (keys.PENDING, keys.SCHEDULED):
        for dkey, holder in await txn.scan(keys.DEDUP + parsed.queue.encode() + b":"):
            if holder == parsed.job_id.encode():
                await txn.delete(dkey)


# -- enqueue -----------------------------------------------------------------


@dataclass(frozen=True)
class Inserted:
    """The outcome of inserting a job: its id and whether it was new."""

    id: str
    created: bool


async def insert(txn: Transaction, job: JobRecord, kv_writes: KvWrites | None = None) -> Inserted:
    """Insert a new pending or scheduled job.

    With a ``dedup_key`` held by a pending or scheduled job of the same
    queue, nothing is written and that job's id is returned (``created``
    false); ``kv_writes`` are then not applied either.
    """
    if job.dedup_key is not None:
        dkey = keys.dedup_key(job.queue, job.dedup_key)
        holder = await txn.get(dkey)
        if holder is not None:
            holder_id = holder.decode("utf-8", "replace")
            if await txn.get(keys.jobindex_key(holder_id)) is not None:
                return Inserted(holder_id, False)
            log.error("dedup entry %r holds %r, which is no job's id; the new job takes it over", dkey, holder)
        await txn.put(dkey, job.id.encode())
    await _store(txn, job)
    await apply_kv_writes(txn, kv_writes)
    return Inserted(job.id, True)


# -- claim -------------------------------------------------------------------


POINT_READS_MAX = 8
"""Most known pending keys a claim reads one by one; with more it scans from the cursor."""


async def claim_batch(
    txn: Transaction,
    queue: str,
    limit: int,
    now: int,
    lease_ms: int,
    start_after: bytes | None = None,
    candidates: Sequence[bytes] | None = None,
) -> tuple[list[JobRecord], bool]:
    """Move up to ``limit`` jobs from the head of ``pending:{queue}:`` to claimed.

    ``start_after`` is the queue's claim cursor (see
    :mod:`taquba_core.claim_cursor`): no pending key of the queue at or
    below it is live, so the scan starts there instead of walking the
    deleted keys in front of the head.  ``candidates``, when given, are
    the cursor's known keys in order, a superset of the queue's live
    pending keys: when there are at most :data:`POINT_READS_MAX`, they are
    read one by one instead of scanning (more are cheaper to scan).

    Returns the claimed jobs and whether the queue is drained: the
    transaction's snapshot holds no further pending job of ``queue`` (one
    more row is read to tell).

    Each claim consumes an attempt and releases the job's dedup key (the
    record keeps no dedup key afterwards, so a later retry cannot delete a
    dedup entry that by then belongs to another job — the bug fixed upstream
    in the 0.5.0 claim path).
    """
    if candidates is None or len(candidates) > POINT_READS_MAX:
        rows = await scan_records(txn, keys.pending_prefix(queue), start_after=start_after, limit=limit + 1)
    else:
        rows = await read_records(txn, candidates, limit + 1)
    claimed = []
    for key, job in rows[:limit]:
        if job.dedup_key is not None:
            await txn.delete(keys.dedup_key(queue, job.dedup_key))
        new = replace(
            job,
            status=JobStatus.CLAIMED,
            attempts=job.attempts + 1,
            claimed_at=now,
            lease_expires_at=now + lease_ms,
            dedup_key=None,
            claim_id=new_job_id(now),  # (lease, attempts) can repeat after a requeue resets attempts
        )
        await _move(txn, key, job, new)
        claimed.append(new)
    return claimed, len(rows) <= limit


async def load_claim(txn: Transaction, job: JobRecord) -> tuple[bytes, JobRecord]:
    """The stored record of ``job``'s claim.

    The claim is looked up under the lease ``job`` names; when that key is
    gone, through the job index, so that a copy whose lease is out of date
    (a renewal that landed although its caller saw an error) still finds its
    claim.  Either way the stored claim must carry ``job``'s claim id.

    Raises:
        ClaimLost: the job is not claimed, or its claim (same claim id, same
            attempt) is no longer stored: reaped, settled, or a stale copy.
    """
    if job.status is not JobStatus.CLAIMED or job.lease_expires_at is None:
        raise ClaimLost(f"job {job.id} is not a claimed job (status {job.status.value})")
    key = keys.claimed_key(job.lease_expires_at, job.queue, job.id)
    value = await txn.get(key)
    if value is None and job.claim_id is not None:
        current = await txn.get(keys.jobindex_key(job.id))
        if current is not None and current.startswith(keys.CLAIMED):
            key, value = current, await txn.get(current)
    if value is None:
        raise ClaimLost(f"the claim of job {job.id} no longer exists (lease reaped or already settled)")
    stored = decode_record(value, key)
    if stored.attempts != job.attempts or stored.claim_id != job.claim_id:
        raise ClaimLost(
            f"job {job.id} was claimed again (stored claim {stored.claim_id} at attempt {stored.attempts}, "
            f"this claim {job.claim_id} at attempt {job.attempts})"
        )
    return key, stored


# -- settlement --------------------------------------------------------------


async def ack(
    txn: Transaction, job: JobRecord, now: int, config: QueueConfig, kv_writes: KvWrites | None = None
) -> JobRecord:
    """Settle a claim as done.  Keeps the record when the queue keeps done jobs."""
    key, stored = await load_claim(txn, job)
    done = replace(stored, status=JobStatus.DONE, completed_at=now, lease_expires_at=None)
    if config.keep_done_jobs is None:
        await _drop(txn, key, stored)
        await _count(txn, job.queue, JobStatus.DONE, 1)
    else:
        await _move(txn, key, stored, done)
    await apply_kv_writes(txn, kv_writes)
    return done


def _dead(job: JobRecord, now: int, error: str) -> JobRecord:
    return replace(
        job, status=JobStatus.DEAD, failed_at=now, last_error=error, lease_expires_at=None, run_at=None
    )


def retry_or_dead(job: JobRecord, now: int, error: str, config: QueueConfig) -> JobRecord:
    """The record a failed claim becomes: scheduled (backoff), pending, or dead."""
    if job.attempts >= job.max_attempts:
        return _dead(job, now, error)
    delay = config.backoff_ms(job.attempts)
    base = replace(job, last_error=error, lease_expires_at=None, claimed_at=None)
    if delay == 0:
        return replace(base, status=JobStatus.PENDING, run_at=None)
    return replace(base, status=JobStatus.SCHEDULED, run_at=now + delay)


async def nack(txn: Transaction, job: JobRecord, now: int, error: str, config: QueueConfig) -> JobRecord:
    """Settle a claim as failed: retry with backoff, or dead-letter when out of attempts.

    Works from the stored record, so a cancel request persisted during the
    claim survives (upstream fix in 0.11.0).
    """
    key, stored = await load_claim(txn, job)
    new = retry_or_dead(stored, now, error, config)
    await _move(txn, key, stored, new)
    return new


async def dead_letter(txn: Transaction, job: JobRecord, now: int, reason: str) -> JobRecord:
    """Settle a claim as a permanent failure: straight to the dead-letter set."""
    key, stored = await load_claim(txn, job)
    new = _dead(stored, now, reason)
    await _move(txn, key, stored, new)
    return new


async def renew(txn: Transaction, job: JobRecord, now: int, lease_ms: int) -> JobRecord:
    """Move a claim to a lease ending at ``now + lease_ms``; returns the new record."""
    key, stored = await load_claim(txn, job)
    if stored.cancel_requested:
        raise CancelRequested(f"job {job.id}'s cancellation was requested; its lease is not renewed")
    new = replace(stored, lease_expires_at=now + lease_ms)
    if new.lease_expires_at != stored.lease_expires_at:
        await _move(txn, key, stored, new)
    return new


# -- background sweeps -------------------------------------------------------


async def promote_due(
    txn: Transaction, now: int, limit: int, start_after: bytes | None = None
) -> tuple[list[JobRecord], bytes | None]:
    """Move up to ``limit`` scheduled jobs whose ``run_at <= now`` to pending.

    The scan is bounded above by ``now``, so it stops at the first future
    key; it starts after ``start_after``, the promotion cursor (see
    :mod:`taquba_core.claim_cursor`).  Returns the promoted records and the
    last key moved (``None`` when none was).
    """
    rows = await scan_records(
        txn, keys.SCHEDULED, start_after=start_after, end=keys.time_bound(keys.SCHEDULED, now), limit=limit
    )
    promoted = []
    for key, job in rows:
        new = replace(job, status=JobStatus.PENDING, run_at=None)
        await _move(txn, key, job, new)
        promoted.append(new)
    return promoted, (rows[-1][0] if rows else None)


async def expire_claims(
    txn: Transaction,
    until: int | None,
    now: int,
    limit: int,
    configs: "QueueConfigs",
    reason: str,
    start_after: bytes | None = None,
) -> tuple[list[JobRecord], bytes | None]:
    """Re-queue (or dead-letter when out of attempts) claims whose lease ends at or before ``until``.

    ``until=None`` takes every claim: used at open, when no claim can belong
    to a running process.  A re-queued job goes straight back to pending; the
    attempt it consumed still counts, so ``max_attempts`` bounds a job that
    keeps crashing its worker.  The scan starts after ``start_after``, the
    reaping cursor.  Returns the moved records and the last key moved.
    """
    end = None if until is None else keys.time_bound(keys.CLAIMED, until)
    rows = await scan_records(txn, keys.CLAIMED, start_after=start_after, end=end, limit=limit)
    moved = []
    for key, job in rows:
        if job.attempts >= job.max_attempts:
            new = _dead(job, now, reason)
        else:
            new = replace(job, status=JobStatus.PENDING, last_error=reason, lease_expires_at=None, claimed_at=None)
        await _move(txn, key, job, new)
        moved.append(new)
    return moved, (rows[-1][0] if rows else None)


async def sweep_done(
    txn: Transaction,
    until: int,
    now: int,
    limit: int,
    configs: "QueueConfigs",
    start_after: bytes | None = None,
) -> tuple[list[JobRecord], bytes | None]:
    """Remove ``done`` records older than their queue's retention, one page of up to ``limit`` rows.

    Keys are time-first, so the scan stops at ``until`` (the oldest possible
    cut-off, from the shortest retention); each record is checked against
    its own queue's retention, so records a longer-keeping queue still
    keeps are stepped over.  Returns the removed records and the key to
    continue after (``None`` once the range up to ``until`` was scanned):
    a page that removed little must not end the sweep.
    """
    rows = await scan_records(
        txn, keys.DONE, start_after=start_after, end=keys.time_bound(keys.DONE, until), limit=limit
    )
    removed = []
    for key, job in rows:
        keep = configs.get(job.queue).keep_done_jobs
        if keep is not None and job.completed_at is not None and job.completed_at + int(keep * 1000) <= now:
            await _drop(txn, key, job)
            await _count(txn, job.queue, JobStatus.DONE, 1)  # the ack stays counted
            removed.append(job)
    return removed, (rows[-1][0] if len(rows) == limit else None)


async def sweep_dead(
    txn: Transaction, queue: str, now: int, retention_ms: int, start_after: bytes | None, limit: int
) -> bytes | None:
    """Remove dead letters of ``queue`` that failed more than ``retention_ms`` ago.

    Dead keys are ordered by id, not by failure time, so the sweep walks the
    set a page at a time from ``start_after``; it returns where the next
    page starts (``None`` once the end was reached).
    """
    rows = await scan_records(txn, keys.dead_prefix(queue), start_after=start_after, limit=limit)
    for key, job in rows:
        if job.failed_at is not None and job.failed_at + retention_ms <= now:
            await _drop(txn, key, job)
    return rows[-1][0] if len(rows) == limit else None


# -- reads -------------------------------------------------------------------


async def find(txn: Transaction, job_id: str) -> tuple[bytes, JobRecord] | None:
    """The current key and record of ``job_id``, or ``None`` when unknown."""
    key = await txn.get(keys.jobindex_key(job_id))
    if key is None:
        return None
    value = await txn.get(key)
    if value is None:
        raise CorruptRecord(f"jobindex:{job_id} points at {key!r}, which does not exist")
    return key, decode_record(value, key)


async def require(txn: Transaction, job_id: str) -> tuple[bytes, JobRecord]:
    """Like :func:`find`, raising :class:`JobNotFound` for an unknown id."""
    found = await find(txn, job_id)
    if found is None:
        raise JobNotFound(f"no job with id {job_id!r}")
    return found


class QueueConfigs:
    """The per-queue configurations with a default for unnamed queues."""

    def __init__(self, default: QueueConfig, per_queue: Mapping[str, QueueConfig] | None = None) -> None:
        self.default = default
        self._per_queue = dict(per_queue or {})

    def get(self, queue: str) -> QueueConfig:
        return self._per_queue.get(queue, self.default)

    def set(self, queue: str, config: QueueConfig) -> None:
        self._per_queue[queue] = config

    def named(self) -> Iterable[str]:
        return self._per_queue.keys()


# -- cancellation, dead letters, listings -------------------------------------


async def release_dedup(txn: Transaction, job: JobRecord) -> None:
    """Delete ``job``'s dedup entry when it still belongs to ``job``."""
    if job.dedup_key is not None:
        dkey = keys.dedup_key(job.queue, job.dedup_key)
        if await txn.get(dkey) == job.id.encode():
            await txn.delete(dkey)


async def cancel(txn: Transaction, job_id: str) -> JobRecord | None:
    """Cancel ``job_id``: remove it when pending or scheduled, flag it when claimed.

    Returns the record as it was (pending/scheduled: removed) or as it is now
    (claimed: ``cancel_requested`` set), or ``None`` when the job is done,
    dead or unknown.
    """
    found = await find(txn, job_id)
    if found is None:
        return None
    key, job = found
    if job.status in (JobStatus.PENDING, JobStatus.SCHEDULED):
        await release_dedup(txn, job)
        await _drop(txn, key, job)
        return job
    if job.status is JobStatus.CLAIMED:
        flagged = replace(job, cancel_requested=True)
        await txn.put(key, encode_record(flagged))
        return flagged
    return None


async def requeue_dead(txn: Transaction, job_id: str) -> JobRecord:
    """Move a dead job back to pending with a fresh attempt budget.

    ``last_error``, ``failed_at`` and the cancel flag are cleared;
    ``enqueued_at`` is kept.

    Raises:
        JobNotFound: the job is not (or no longer) dead; nothing is written.
    """
    key, job = await require(txn, job_id)
    if job.status is not JobStatus.DEAD:
        raise JobNotFound(f"job {job_id!r} is not dead (status {job.status.value})")
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
    await _move(txn, key, job, fresh)
    return fresh


def _space_prefix(queue: str, status: JobStatus) -> bytes:
    """The prefix a listing of ``status`` scans: per queue, or the global time-first space."""
    if status is JobStatus.PENDING:
        return keys.pending_prefix(queue)
    if status is JobStatus.DEAD:
        return keys.dead_prefix(queue)
    return keys.SPACES[status.value]


async def list_space(
    txn: Transaction, queue: str, status: JobStatus, after: bytes | None, limit: int
) -> tuple[list[JobRecord], bytes | None]:
    """Up to ``limit`` jobs of ``queue`` in ``status``, in that space's key order.

    Returns the jobs and the key to resume after (``None`` at the end).
    Time-first spaces are shared by all queues; other queues' keys are
    skipped.
    """
    prefix = _space_prefix(queue, status)
    per_queue = status in (JobStatus.PENDING, JobStatus.DEAD)
    jobs: list[JobRecord] = []
    while len(jobs) < limit:
        rows = await txn.scan(prefix, start_after=after, limit=limit if per_queue else max(limit, 256))
        for key, value in rows:
            after = key
            if per_queue or keys.parse_job_key(key).queue == queue:
                jobs.append(decode_record(value, key))
                if len(jobs) == limit:
                    return jobs, key
        if len(rows) < (limit if per_queue else max(limit, 256)):
            return jobs, None
    return jobs, after
