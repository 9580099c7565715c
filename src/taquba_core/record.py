"""The job record and its msgpack codec (field names as in the design notes)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

import msgpack

from .errors import CorruptRecord


class JobStatus(str, Enum):
    """Where a job is in its lifecycle; the value is what is stored."""

    PENDING = "Pending"
    SCHEDULED = "Scheduled"
    CLAIMED = "Claimed"
    DONE = "Done"
    DEAD = "Dead"


@dataclass
class JobRecord:
    """One job as stored.

    Times are integer milliseconds since the Unix epoch.  ``priority``: lower
    numbers are claimed first.  ``attempts`` counts claims so far and never
    exceeds ``max_attempts``.  ``lease_expires_at`` is set while claimed; a
    renewal through :meth:`taquba_core.Queue.renew_lease` updates it in place.
    On a claimed record, ``cancellation`` is an ``asyncio.Event`` that fires
    when the job's cancellation is requested; a handler checks or awaits it.
    """

    id: str
    queue: str
    payload: bytes
    status: JobStatus
    max_attempts: int
    enqueued_at: int
    priority: int
    attempts: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    claimed_at: int | None = None
    lease_expires_at: int | None = None
    run_at: int | None = None
    last_error: str | None = None
    dedup_key: str | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    claim_id: str | None = None
    """Unique id of the job's latest claim (set by each claim); settlements of another claim are refused."""
    cancel_requested: bool = False
    cancellation: asyncio.Event | None = field(default=None, compare=False, repr=False)
    """Set when :meth:`taquba_core.Queue.cancel` asks this claim to stop; not stored."""


_FIELDS = tuple(f.name for f in fields(JobRecord) if f.name != "cancellation")
_REQUIRED = ("id", "queue", "payload", "status", "max_attempts", "enqueued_at", "priority")


def encode_record(job: JobRecord) -> bytes:
    """msgpack map keyed by field name; absent optional fields are omitted."""
    out: dict[str, Any] = {}
    for name in _FIELDS:
        value = getattr(job, name)
        if value is None or (name == "headers" and not value) or (name == "cancel_requested" and not value):
            continue
        out[name] = value.value if name == "status" else value
    return msgpack.packb(out, use_bin_type=True)


def decode_record(data: bytes, key: bytes = b"") -> JobRecord:
    """Decode a stored record.

    Raises:
        CorruptRecord: naming ``key`` when the bytes are not a job record.
    """
    try:
        raw = msgpack.unpackb(data, raw=False)
        if not isinstance(raw, dict) or any(name not in raw for name in _REQUIRED):
            raise ValueError("not a job record map")
        values = {name: raw[name] for name in _FIELDS if name in raw}
        values["status"] = JobStatus(values["status"])
        job = JobRecord(**values)
        if not isinstance(job.payload, bytes) or not isinstance(job.id, str):
            raise ValueError("bad field types")
        return job
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise CorruptRecord(f"cannot decode the job record stored under {key!r}: {exc or type(exc).__name__}") from exc
