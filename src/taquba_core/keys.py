"""Key encodings of the store layout (see the design notes' key table).

All keys are UTF-8 text; numbers are zero-padded decimal so that byte order
equals numeric order.  Time-first spaces (``claimed``, ``scheduled``,
``done``) let the background sweeps stop at the first key in the future.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import CorruptRecord, InvalidArgument, InvalidQueueName

PRIORITY_MIN = 0
PRIORITY_MAX = 2**32 - 1
TIME_MAX = 10**20 - 1
MAX_QUEUE_NAME_BYTES = 255

PENDING = b"pending:"
CLAIMED = b"claimed:"
SCHEDULED = b"scheduled:"
DONE = b"done:"
DEAD = b"dead:"
JOBINDEX = b"jobindex:"
DEDUP = b"dedup:"
STATS = b"stats:"
USER = b"usr:"
QUARANTINE = b"quarantine:"
"""``quarantine:{original key}``: bytes that were stored under a job key but could not be decoded,
moved aside by the claim or sweep that met them (see ``transitions.scan_records``)."""

SPACES = {
    "Pending": PENDING,
    "Claimed": CLAIMED,
    "Scheduled": SCHEDULED,
    "Done": DONE,
    "Dead": DEAD,
}


def validate_queue_name(queue: object) -> str:
    """Return ``queue`` when it is a valid queue name.

    A valid name is a ``str`` of 1–255 bytes of UTF-8 with no ``:`` and no
    control character (so a queue ``a`` never sees the keys of ``a:b``).

    Raises:
        InvalidQueueName: naming the bad value.
    """
    if not isinstance(queue, str):
        raise InvalidQueueName(f"queue name must be a str, got {type(queue).__name__} {queue!r}")
    try:
        size = len(queue.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidQueueName(f"queue name {queue!r} is not valid UTF-8") from exc
    if size == 0 or size > MAX_QUEUE_NAME_BYTES:
        raise InvalidQueueName(f"queue name {queue!r} must be 1-255 bytes of UTF-8, got {size}")
    if ":" in queue:
        raise InvalidQueueName(f"queue name {queue!r} must not contain ':'")
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in queue):
        raise InvalidQueueName(f"queue name {queue!r} must not contain control characters")
    return queue


def check_priority(priority: object) -> int:
    """Return ``priority`` when it is an int in 0..2^32-1, else raise :class:`InvalidArgument`."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidArgument(f"priority must be an int, got {priority!r}")
    if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise InvalidArgument(f"priority {priority} is outside 0..{PRIORITY_MAX}")
    return priority


def _time(ms: int) -> bytes:
    if not 0 <= ms <= TIME_MAX:
        raise InvalidArgument(f"time {ms} ms is outside 0..{TIME_MAX}")
    return b"%020d" % ms


def pending_prefix(queue: str) -> bytes:
    return PENDING + queue.encode() + b":"


def pending_key(queue: str, priority: int, job_id: str) -> bytes:
    return b"%s%010d:%s" % (pending_prefix(queue), priority, job_id.encode())


def claimed_key(lease_expires_at: int, queue: str, job_id: str) -> bytes:
    return b"%s%s:%s:%s" % (CLAIMED, _time(lease_expires_at), queue.encode(), job_id.encode())


def scheduled_key(run_at: int, queue: str, job_id: str) -> bytes:
    return b"%s%s:%s:%s" % (SCHEDULED, _time(run_at), queue.encode(), job_id.encode())


def done_key(completed_at: int, queue: str, job_id: str) -> bytes:
    return b"%s%s:%s:%s" % (DONE, _time(completed_at), queue.encode(), job_id.encode())


def dead_prefix(queue: str) -> bytes:
    return DEAD + queue.encode() + b":"


def dead_key(queue: str, job_id: str) -> bytes:
    return dead_prefix(queue) + job_id.encode()


def time_bound(space: bytes, until_ms: int) -> bytes:
    """Exclusive upper bound of a time-first space: every key with time <= ``until_ms``."""
    return space + _time(until_ms) + b";"  # ';' sorts right after ':'


def jobindex_key(job_id: str) -> bytes:
    return JOBINDEX + job_id.encode()


def dedup_key(queue: str, key: str) -> bytes:
    return b"%s%s:%s" % (DEDUP, queue.encode(), key.encode())


def stats_prefix(queue: str) -> bytes:
    return STATS + queue.encode() + b":"


def stats_key(queue: str, metric: str) -> bytes:
    return stats_prefix(queue) + metric.encode()


def user_key(key: bytes) -> bytes:
    return USER + key


@dataclass(frozen=True)
class ParsedKey:
    """The fields of a job key: its space, queue, id, and the number it sorts by.

    ``number`` is the priority for ``pending``, the time for the time-first
    spaces, and ``None`` for ``dead``.
    """

    space: bytes
    queue: str
    job_id: str
    number: int | None


def parse_job_key(key: bytes) -> ParsedKey:
    """Parse a ``pending``/``claimed``/``scheduled``/``done``/``dead`` key.

    Raises:
        CorruptRecord: when ``key`` is not a job key of the layout.
    """
    try:
        text = key.decode("utf-8")
        space, rest = text.split(":", 1)
        if space == "pending":
            queue, prio, job_id = rest.rsplit(":", 2)
            return ParsedKey(PENDING, queue, job_id, int(prio))
        if space in ("claimed", "scheduled", "done"):
            at, queue, job_id = rest.split(":", 2)
            return ParsedKey(SPACES[space.capitalize()], queue, job_id, int(at))
        if space == "dead":
            queue, job_id = rest.rsplit(":", 1)
            return ParsedKey(DEAD, queue, job_id, None)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptRecord(f"malformed job key {key!r}") from exc
    raise CorruptRecord(f"{key!r} is not a job key")
