"""The one error hierarchy of taquba.

Every error a caller can see derives from :class:`TaqubaError`.  Each class
says, through ``is_permanent``, whether retrying the same call can help:
``True`` means the call is wrong (bad input, unknown id) and will fail the
same way again; ``False`` means a later retry may succeed (contention, a
store that is busy).
"""

from __future__ import annotations


class TaqubaError(Exception):
    """Base of every taquba error.

    ``is_permanent`` is ``True`` when retrying the same call cannot succeed.
    """

    is_permanent: bool = True


class InvalidArgument(TaqubaError, ValueError):
    """An argument is malformed or out of range; nothing was written.

    Permanent: retrying with the same arguments fails the same way.
    """


class InvalidQueueName(InvalidArgument):
    """A queue name is not 1–255 bytes of UTF-8 without ``:`` or control characters.

    Permanent: retrying with the same name fails the same way.
    """


class InvalidStoreUrl(InvalidArgument):
    """A store URL has an unknown scheme or a malformed location.

    Permanent: retrying with the same URL fails the same way.
    """


class JobNotFound(TaqubaError, LookupError):
    """No job with that id is in the state the call needs; nothing was written.

    Permanent: retrying the same call cannot find it (it may be gone, or
    already moved on, for good).
    """


class ClaimLost(TaqubaError):
    """The claim being settled no longer exists.

    Its lease was reaped, the job was settled already, or the record passed in
    is a stale copy.  The settlement changed nothing.  Permanent: retrying
    the same settlement cannot succeed.
    """


class CancelRequested(TaqubaError):
    """The job's cancellation was requested, so its lease is not renewed.

    Permanent: the request stays on the claim, so retrying the renewal
    fails the same way; the handler should stop and settle the job.
    """


class KvValueTooLarge(InvalidArgument):
    """A caller KV value is above ``MAX_KV_VALUE_SIZE`` bytes; nothing was written.

    Permanent: retrying with the same value fails the same way.
    """


class CorruptRecord(TaqubaError):
    """Bytes stored under an internal key cannot be decoded; the key is named.

    Permanent: the stored bytes do not change by retrying.
    """


class StoreError(TaqubaError):
    """The underlying store failed (I/O, object storage).

    Transient: retrying later may succeed.
    """

    is_permanent = False


class StoreConflict(StoreError):
    """A commit lost a write-write conflict.

    Transient: retrying the transaction may succeed.  Raised by store
    adapters; the queue retries it itself and never lets it reach a caller.  When retries run out the queue raises
    :class:`Contention`.
    """


class Contention(StoreError):
    """A transition kept conflicting with concurrent writers and gave up.

    Transient: retrying later may succeed.
    """


class StoreFenced(TaqubaError):
    """Another writer opened the same store; this process may no longer write.

    Permanent for this process: retrying cannot succeed; reopen the store
    (which fences the other writer) or stop.
    """


class ReadOnlyStore(TaqubaError):
    """A write was attempted through a read-only view of a store; nothing was written.

    Permanent: retrying through the same view cannot succeed; open the store
    as its writer to change it.
    """


class StoreClosed(TaqubaError):
    """The queue or store was closed.

    Permanent: retrying on the same queue cannot succeed; open it again.
    """
