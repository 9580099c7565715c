"""The production store: SlateDB on object storage, through ``slatedb.uniffi``.

Accepted URLs (see :func:`parse_slatedb_url`):

* ``memory://`` — SlateDB over an in-memory object store.  Every open gets a
  fresh, empty store: nothing survives ``close``.
* ``file:///abs/dir`` — a local directory (created when missing).
* ``s3://bucket/prefix``, ``gs://bucket/prefix``, ``az://container/prefix``
  — object storage; the prefix defaults to ``taquba``.

Every URL may carry ``?flush_interval_ms=N``: how often SlateDB writes its
write-ahead log to the object store, in milliseconds.  A durable commit waits
for the next flush, so on cloud stores this bounds one sequential caller to
about ``1000 / N`` commits a second, while concurrent callers share a flush
(group commit).  On ``memory://`` and ``file://`` a durable commit asks for
the flush at once instead (see :class:`SlateDBStore`, ``eager_flush``).
Defaults: 5 ms for ``memory://`` and ``file://``, 50 ms for cloud schemes
(each flush is a PUT request).

S3 is configured from the environment, the way the ``object_store`` crate
reads it: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` and the other
``AWS_*`` variables.  The endpoint of an S3-compatible server is taken from
``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL`` (boto's names) or
``AWS_ENDPOINT``, first set wins.  An ``http://`` endpoint needs plain HTTP
allowed; it is allowed automatically unless ``AWS_ALLOW_HTTP`` says otherwise
(without it the object store retries for minutes instead of failing).  GCS
and Azure are configured by the ``GOOGLE_*`` and ``AZURE_*`` variables that
``object_store`` reads (for example ``GOOGLE_SERVICE_ACCOUNT``,
``AZURE_STORAGE_ACCOUNT_NAME``, ``AZURE_STORAGE_ACCOUNT_KEY``).

Errors map onto the taquba hierarchy: a lost write-write conflict is
:class:`~taquba_core.errors.StoreConflict`; a writer fenced by a newer one is
:class:`~taquba_core.errors.StoreFenced`; a closed store is
:class:`~taquba_core.errors.StoreClosed`; anything else SlateDB raises is
:class:`~taquba_core.errors.StoreError` with the original as ``__cause__``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import slatedb.uniffi as sdb

from taquba_core.errors import (
    InvalidStoreUrl,
    StoreClosed,
    StoreConflict,
    StoreError,
    StoreFenced,
    TaqubaError,
)
from taquba_core.kv import DURABLE, Durability, KVStore, Transaction, add_counter

from . import _uniffi_fast
from ._eager import Started
from ._keyrange import KeyBounds, scan_bounds
from ._readcache import MISS, Miss, ReadCache
from ._versions import Pins, VersionTable
from ._writebuffer import WriteBuffer, counter_plus

T = TypeVar("T")

log = logging.getLogger("taquba.slatedb")

LOCAL_FLUSH_INTERVAL_MS = 5
CLOUD_FLUSH_INTERVAL_MS = 50
MAX_FLUSH_INTERVAL_MS = 60_000
DEFAULT_PREFIX = "taquba"
SCAN_BATCH = 256
"""Rows fetched per ``next_batch`` call across the FFI boundary."""
WRITE_OUT_BYTES = 4 * 1024 * 1024
"""Changes not yet handed to SlateDB at which a write-out starts without waiting (bytes)."""
READ_CACHE_BYTES = 8 * 1024 * 1024
"""Budget of the values last pruned from the overlay that reads are answered from (see ``_readcache.py``)."""
WAL_FLUSH = sdb.FlushOptions(flush_type=sdb.FlushType.WAL)
SLOW_FLUSH_WARNING_S = 10.0
"""Seconds after which a WAL flush still under way is logged as a warning."""
MAX_FLUSHES = 2
"""WAL flushes a store has in flight at once (see ``_write_out_all``)."""
PIPELINE_BYTES = 64 * 1024
"""Unwritten changes (bytes) up to which the next batch is written while a flush runs.

Writing a small batch at once, instead of after the running flush, cuts a
lone caller's wait; a larger one waits for the flush and keeps growing:
fewer, larger writes leave the event loop more time for the callers' own
work (measured with benchmarks/bench_throughput.py on file://; see
``_write_out_all``)."""
GATHER_TURNS = 3
"""Event-loop turns a write-out waits before its first pass, gathering the commits of tasks already woken.

At concurrency 1 a flush wakes the producer and the worker together; with
the wait, the next enqueue, the claim and the ack share one write and one
flush instead of 1.5 of each per job (loop CPU per job -6 to -20%, jobs/s
-1 to +15% at concurrency 1 and +6 to +8% at 16 and 256 in alternating
runs on file://)."""
L0_SST_SIZE_BYTES = 32 * 1024 * 1024
"""Memtable size at which SlateDB writes an L0 SST (its default is 64 MiB).

A queue's data churns: most of what enters the memtable (records, their
index entries, then the tombstones of both) is soon deleted again, and
SlateDB keeps it in memory until the memtable is flushed.  Measured with
benchmarks/bench_memory.py (100k jobs of 64 B enqueued, then drained by 16
workers): peak RSS ~240 MB with 64 MiB memtables, ~180 MB with 32 MiB,
~165 MB with 16 MiB; but with 16 KiB payloads 16 MiB memtables made SlateDB
flush and compact so often that the peak rose to ~300 MB (32 MiB: ~210 MB).
Throughput was the same within noise."""

CLOUD_SCHEMES = frozenset({"s3", "gs", "az"})
LOCAL_SCHEMES = frozenset({"memory", "file"})
SCHEMES = LOCAL_SCHEMES | CLOUD_SCHEMES
S3_ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT")


@dataclass(frozen=True, slots=True)
class StoreLocation:
    """Where a SlateDB store lives, parsed from its URL.

    ``bucket`` is the bucket or container (empty for ``memory`` and ``file``);
    ``path`` is the database path inside the object store (for ``file``, the
    absolute directory); ``flush_interval_ms`` is the WAL flush interval in
    milliseconds.
    """

    url: str
    scheme: str
    bucket: str
    path: str
    flush_interval_ms: int

    def object_store(self) -> sdb.ObjectStore:
        """Build the object store for this location.

        Raises:
            slatedb.uniffi.Error: the object store cannot be configured.
        """
        if self.scheme == "memory":
            return sdb.ObjectStore.resolve("memory://")
        if self.scheme == "file":
            return sdb.ObjectStore.resolve("file:///")
        if self.scheme == "s3":
            return _s3_object_store(self.bucket)
        return sdb.ObjectStore.resolve(f"{self.scheme}://{self.bucket}")


def _s3_object_store(bucket: str) -> sdb.ObjectStore:
    """An S3 store configured from ``AWS_*`` variables (see the module notes)."""
    builder = sdb.ObjectStoreBuilder.from_env(sdb.ObjectStoreType.S3)
    builder.with_url(f"s3://{bucket}")
    endpoint = next((os.environ[v] for v in S3_ENDPOINT_VARIABLES if os.environ.get(v)), None)
    if endpoint is not None:
        builder.with_config("endpoint", endpoint)
        if endpoint.lower().startswith("http://") and "AWS_ALLOW_HTTP" not in os.environ:
            builder.with_config("allow_http", "true")
    return builder.build()


def parse_slatedb_url(url: str) -> StoreLocation:
    """Parse a SlateDB store URL (forms in the module notes).

    Raises:
        InvalidStoreUrl: unknown scheme, missing bucket, relative ``file``
            path, unknown query parameter or bad ``flush_interval_ms``; the
            message names the URL.
    """

    def bad(why: str) -> InvalidStoreUrl:
        return InvalidStoreUrl(f"invalid store URL {url!r}: {why}")

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise bad(str(exc)) from exc
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES or not url[len(scheme) + 1 :].startswith("//"):
        raise bad("expected memory://, file:///abs/dir, s3://bucket/prefix, gs://bucket/prefix or az://container/prefix")
    if parts.fragment:
        raise bad("a fragment (#...) is not allowed")
    if port is not None or "@" in parts.netloc or ":" in parts.netloc:
        raise bad("credentials and ports do not belong in the URL; use environment variables")
    flush_interval_ms = _flush_interval(parts.query, scheme, bad)
    path = unquote(parts.path)
    if scheme == "memory":
        if parts.netloc or path not in ("", "/"):
            raise bad("memory:// takes no location")
        return StoreLocation(url, scheme, "", "db", flush_interval_ms)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise bad("a file URL needs an absolute path: file:///abs/dir (three slashes)")
        directory = os.path.normpath(path) if path else ""
        if not directory.startswith("/") or directory == "/":
            raise bad("a file URL needs an absolute directory path: file:///abs/dir")
        return StoreLocation(url, scheme, "", directory, flush_interval_ms)
    if not parts.netloc:
        raise bad(f"{scheme}:// needs a bucket: {scheme}://bucket/prefix")
    prefix = path.strip("/") or DEFAULT_PREFIX
    return StoreLocation(url, scheme, parts.netloc, prefix, flush_interval_ms)


def _flush_interval(query: str, scheme: str, bad: Callable[[str], InvalidStoreUrl]) -> int:
    """The ``flush_interval_ms`` query parameter, or the scheme's default, in milliseconds."""
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise bad(f"malformed query {query!r}") from exc
    unknown = set(params) - {"flush_interval_ms"}
    if unknown:
        raise bad(f"unknown query parameter(s) {sorted(unknown)}; only flush_interval_ms is accepted")
    if "flush_interval_ms" not in params:
        return CLOUD_FLUSH_INTERVAL_MS if scheme in CLOUD_SCHEMES else LOCAL_FLUSH_INTERVAL_MS
    values = params["flush_interval_ms"]
    if len(values) != 1 or not (values[0].isascii() and values[0].isdigit()) or not 1 <= int(values[0]) <= MAX_FLUSH_INTERVAL_MS:
        raise bad(f"flush_interval_ms must be one integer from 1 to {MAX_FLUSH_INTERVAL_MS}")
    return int(values[0])


class CounterMergeOperator(sdb.MergeOperator):
    """SlateDB merge operator for taquba counters: signed 64-bit little-endian addition.

    This process writes counters as plain values (see :class:`SlateDBTransaction`);
    the operator stays registered so that merge operands written by earlier
    versions still read as counters.
    """

    def merge(self, key: bytes, existing_value: bytes | None, operand: bytes) -> bytes:
        """``existing_value + operand``; an absent value counts as 0.

        Raises:
            slatedb.uniffi.MergeOperatorCallbackError.Failed: a value is not 8 bytes.
        """
        try:
            return add_counter(existing_value, operand)
        except struct.error as exc:
            raise sdb.MergeOperatorCallbackError.Failed(f"key {key!r} does not hold a counter: {exc}") from exc


class SlateDBStore(KVStore):
    """A taquba store in one SlateDB database.  Create it with :meth:`open`.

    The process that opens a database becomes its only writer and fences any
    earlier writer; once fenced, every later call raises :class:`StoreFenced`.

    Transactions are checked and committed in this process, then written
    to SlateDB behind the commits by one write-out task (see
    :meth:`_write_out_all`): each pass writes every commit made since the
    previous one as one batch and, when a caller waits for durability,
    starts a WAL flush.  A small batch is written while an earlier flush
    still runs; a larger one (``PIPELINE_BYTES``) waits for it and keeps
    growing, so concurrent callers share writes and flushes (group commit).
    With ``eager_flush`` (local and in-memory object
    stores) the pass asks SlateDB for the WAL flush along with its write, so a
    lone caller waits for one WAL write instead of up to a flush interval
    (:class:`~taquba_backends._eager.Started` sends both before either
    returns); cloud stores
    wait for SlateDB's own flush every ``flush_interval_ms``, which bounds
    their PUT requests.  Commits that nobody waits for are written within
    ``write_out_delay_ms`` (the URL's flush interval).

    When a write-out fails, commits this process already reported may be
    lost: the store stops taking work, and every later call raises the
    failure (:class:`StoreFenced` when another writer took over).
    Transactions are checked for conflicts and committed by this process
    (see :class:`SlateDBTransaction`).
    """

    def __init__(self, db: sdb.Db, url: str, *, eager_flush: bool = False, write_out_delay_ms: int = 5) -> None:
        """Wrap an open database; use :meth:`open` instead."""
        self._db = db
        self.url = url
        self._closed = False
        self._fenced = False
        self._eager_flush = eager_flush
        self._closing: asyncio.Future[None] | None = None  # the shutdown, once close() was called
        # Commits (see SlateDBTransaction) are numbered; ``_overlay`` holds
        # their versions until every open transaction's snapshot holds them,
        # ``_unwritten`` the changes of those not yet handed to SlateDB,
        # ``_applied`` the number of the last commit SlateDB has and
        # ``_durable`` that of the last one in the object store.
        self._seq = 0
        self._applied = 0
        self._durable = 0
        self._overlay = VersionTable(keep_base=False)
        self._pins = Pins()  # what the snapshots of open transactions hold at least
        self._shared: tuple[sdb.DbSnapshot, int] | None = None  # see _snapshot()
        self._cache = ReadCache(READ_CACHE_BYTES)
        self._unwritten: list[dict[bytes, bytes | None]] = []
        self._unwritten_bytes = 0
        self._write_out: asyncio.Future[None] | None = None
        self._write_out_timer: asyncio.TimerHandle | None = None
        self._write_out_delay = write_out_delay_ms / 1000
        self._durable_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._last_handle: sdb.WriteHandle | None = None
        self._flushes: set[asyncio.Future[None]] = set()  # WAL flushes in flight
        self._flushing = 0  # the last commit a flush was started for
        self._broken: TaqubaError | None = None  # a write-out failed
        # Counter values as the last commit left them (read on first use);
        # ``_loading`` holds the reads of them under way.
        self._counters: dict[bytes, bytes | None] = {}
        self._loading: dict[bytes, asyncio.Future[bytes | None]] = {}

    @classmethod
    async def open(cls, url: str, *, object_store: sdb.ObjectStore | None = None) -> SlateDBStore:
        """Open (or create) the database at ``url`` and fence any other writer.

        ``object_store`` replaces the object store the URL names (its path
        and settings still apply); tests pass the same in-memory object
        store twice to close and reopen a ``memory://`` database.

        Raises:
            InvalidStoreUrl: ``url`` is malformed (see :func:`parse_slatedb_url`).
            StoreError: the object store is unreachable or misconfigured.
        """
        location = parse_slatedb_url(url)
        _uniffi_fast.install()
        settings = sdb.Settings.default()
        settings.set("flush_interval", json.dumps(f"{location.flush_interval_ms}ms"))
        settings.set("l0_sst_size_bytes", json.dumps(L0_SST_SIZE_BYTES))
        try:
            if location.scheme == "file":
                os.makedirs(location.path, exist_ok=True)
            store = object_store if object_store is not None else location.object_store()
            builder = sdb.DbBuilder(location.path, store)
            builder.with_merge_operator(CounterMergeOperator())
            builder.with_settings(settings)
            db = await builder.build()
        except sdb.Error as exc:
            raise StoreError(f"cannot open store {url}: {exc}") from exc
        except OSError as exc:
            raise StoreError(f"cannot open store {url}: {exc}") from exc
        return cls(
            db,
            location.url,
            eager_flush=location.scheme in LOCAL_SCHEMES,
            write_out_delay_ms=location.flush_interval_ms,
        )

    async def begin(self) -> SlateDBTransaction:
        """Start a snapshot-isolated transaction.

        Raises:
            StoreClosed: the store was closed.
            StoreFenced: another writer took the store over.
            StoreError: SlateDB failed.
        """
        self._check_usable()
        snapshot, pinned = await self._snapshot()
        # After the snapshot: it holds no commit above this number.
        return SlateDBTransaction(self, self._seq, snapshot, pinned)

    async def close(self) -> None:
        """Write out every commit made so far, flush and shut the database down.

        A no-op when already closed.  A fenced store closes without error;
        its commits that were not yet durable are lost (callers that waited
        for their durability got :class:`StoreFenced`).

        Raises:
            StoreError: SlateDB failed to shut down cleanly.
        """
        if self._closing is None:
            self._closed = True
            self._closing = asyncio.ensure_future(self._shut_down())
        # Shielded: a caller cancelled here leaves the shutdown running, and
        # a second close() waits for the same one.
        await asyncio.shield(self._closing)

    async def _shut_down(self) -> None:
        # The commits made before close() was called go to SlateDB first.
        while True:
            self._start_write_out()
            running = [task for task in (self._write_out, *self._flushes) if task is not None]
            if not running:
                break
            await asyncio.wait(running)
        try:
            await self._db.shutdown()
        except sdb.Error.Closed as exc:
            # Fenced or already shut down: nothing left to flush.
            self._break(self._translate(exc))
        except sdb.Error as exc:
            error = StoreError(f"store {self.url} did not shut down cleanly: {exc}")
            self._break(error)
            raise error from exc
        if self._broken is None:
            self._durable = self._applied  # a clean shutdown wrote the WAL out
        self._end_durable_waits(self._broken)

    def _check_usable(self) -> None:
        if self._fenced:
            raise self._fenced_error()
        if self._broken is not None:
            raise self._broken
        if self._closed:
            raise StoreClosed(f"store {self.url} is closed")

    async def sync(self) -> None:
        """Flush the WAL, so that every commit visible to reads is durable.

        Raises:
            StoreFenced, StoreClosed, StoreError: as for a commit.
        """
        self._check_usable()
        await self._durable_after(self._seq)

    def _fenced_error(self) -> StoreFenced:
        return StoreFenced(
            f"store {self.url} was opened by another writer (another process, or another "
            "open_store of the same location in this one); "
            "this handle may no longer write to it: reopen the store or stop"
        )

    async def _call(self, awaitable: Awaitable[T]) -> T:
        """Await a SlateDB call, translating its errors into the taquba hierarchy."""
        try:
            return await awaitable
        except sdb.Error as exc:
            raise self._translate(exc) from exc

    def _translate(self, exc: sdb.Error) -> TaqubaError:
        if isinstance(exc, sdb.Error.Transaction):
            return StoreConflict(f"write-write conflict in store {self.url}: {exc}")
        if isinstance(exc, sdb.Error.Closed):
            if exc.reason == sdb.CloseReason.FENCED:
                self._fenced = True
                return self._fenced_error()
            if exc.reason == sdb.CloseReason.CLEAN:
                return StoreClosed(f"store {self.url} is closed")
        return StoreError(f"store {self.url} failed: {exc}")

    # -- commits (for SlateDBTransaction) ---------------------------------

    async def _load_counter(self, key: bytes) -> None:
        """Make sure ``_counters`` holds the value the last commit left under ``key``.

        While a key is in ``_loading``, every commit that writes it records
        the value in ``_counters`` (see :meth:`_commit`), which then wins over
        the value read.  The key leaves ``_loading`` in the same step as the
        value read is stored, so no commit can slip between the two.
        """
        if key in self._counters:
            return
        value = self._read(key, self._seq)
        if value is not MISS:
            self._counters[key] = value  # type: ignore[assignment]
            return
        loading = self._loading.get(key)
        if loading is None:
            loading = self._loading[key] = asyncio.ensure_future(self._call(self._db.get(key)))
        try:
            stored = await asyncio.shield(loading)
        except BaseException:
            if loading.done() and (loading.cancelled() or loading.exception() is not None):
                if self._loading.get(key) is loading:
                    del self._loading[key]  # a failed read: the next caller reads again
            raise
        self._counters.setdefault(key, stored)
        if self._loading.get(key) is loading:
            del self._loading[key]

    async def _commit(self, start: int, buffer: WriteBuffer) -> int:
        """Check ``buffer`` against the commits after ``start`` and apply it; return its number.

        The commit is applied to the overlay (visible to every transaction
        that begins from now on); the write-out task takes it to SlateDB.

        Raises:
            StoreConflict: a key ``buffer`` puts or deletes was written by a
                commit numbered above ``start``; nothing is written.
            CorruptRecord: a merged key does not hold a counter; nothing is written.
            StoreFenced, StoreClosed, StoreError: the store cannot take writes.
        """
        writes, merges = buffer.folded()
        for key in merges:
            await self._load_counter(key)
        # From here on no await: the check and the apply are atomic.
        self._check_usable()
        overlay = self._overlay
        for key in writes:
            if overlay.last_commit(key) > start:
                raise StoreConflict(f"key {key!r} was written by a concurrent commit in store {self.url}")
        counters = {key: counter_plus(self.url, key, self._counters[key], d) for key, d in merges.items()}
        self._seq += 1
        seq = self._seq
        changes: dict[bytes, bytes | None] = {**writes, **counters}
        for key, value in changes.items():
            overlay.add(key, seq, value)
            if key in self._counters or key in self._loading:  # a counter key
                self._counters[key] = value
        self._unwritten.append(changes)
        self._unwritten_bytes += sum(len(k) + (len(v) if v else 0) for k, v in changes.items())
        if self._unwritten_bytes >= WRITE_OUT_BYTES:
            self._start_write_out()
        elif self._write_out_timer is None and self._write_out is None:
            loop = asyncio.get_running_loop()
            self._write_out_timer = loop.call_later(self._write_out_delay, self._start_write_out)
        return seq

    async def _durable_after(self, seq: int) -> None:
        """Return once commit ``seq`` (and every one before it) reached the object store.

        Raises:
            StoreFenced, StoreClosed, StoreError: the commit may not be durable.
        """
        if self._durable >= seq:
            return
        if self._broken is not None:
            raise self._broken
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._durable_waiters.append((seq, waiter))
        if self._closing is None:
            self._start_write_out()
        await waiter  # the shutdown releases it when closing

    def _start_write_out(self) -> None:
        """Start writing the unwritten commits now, or leave them to the end of the running flush.

        They wait for the flush when they hold more than ``PIPELINE_BYTES``
        (see :meth:`_write_out_all`).  With nothing to write, start the flush
        the waiters need, if any.
        """
        if self._write_out_timer is not None:
            self._write_out_timer.cancel()
            self._write_out_timer = None
        if self._write_out is not None or self._broken is not None:
            return
        if self._unwritten:
            if self._may_write_now():
                self._write_out = asyncio.ensure_future(self._write_out_all())
        elif self._durable_waiters and self._closing is None:
            self._start_flush()

    async def _write_out_all(self) -> None:
        """Write the overlay's commits to SlateDB in commit order, and start WAL flushes for the waiters.

        Each pass writes every commit made since the last one as one batch
        and, when a caller waits for durability, starts a flush of SlateDB's
        WAL (see :meth:`_start_flush`).  While a flush runs, commits
        accumulate for the next pass once they hold more than
        ``PIPELINE_BYTES`` (group commit); until then the next pass starts at
        once and its flush follows the running one (up to ``MAX_FLUSHES``).

        The task lets the event loop turn ``GATHER_TURNS`` times before its
        first pass: the tasks that the last flush woke (a worker's claim and
        ack, say) then commit into the same pass as the commit that started
        it, rather than into a write and a flush of their own.
        """
        try:
            for _ in range(GATHER_TURNS):
                await asyncio.sleep(0)
            while self._broken is None and self._unwritten:
                await self._write_unwritten()
                if self._durable_waiters and self._closing is None:
                    self._start_flush()
                if not self._may_write_now():
                    return  # the flush's end starts the next pass
        except BaseException as exc:
            self._fail_write_out(exc)
            if not isinstance(exc, (sdb.Error, TaqubaError)):
                raise
        finally:
            self._write_out = None
            if self._broken is None and self._closing is None and self._unwritten:
                self._start_write_out()

    def _may_write_now(self) -> bool:
        """Whether the unwritten commits go to SlateDB now rather than after the running flush."""
        return not self._flushes or self._unwritten_bytes <= PIPELINE_BYTES

    def _start_flush(self, requested: Started[None] | None = None) -> None:
        """Start a WAL flush of every commit written so far, unless one covers them or too many run.

        ``requested``: the flush already asked of SlateDB while the last
        write was queued (see :meth:`_write_unwritten`).
        """
        if len(self._flushes) < MAX_FLUSHES and self._flushing < self._applied:
            self._flushing = self._applied
            flush = asyncio.ensure_future(self._flush_upto(self._applied, self._last_handle, requested))
            self._flushes.add(flush)

    def _may_request_flush(self) -> bool:
        """Whether the pass being written asks SlateDB for its WAL flush along with the write."""
        # Through the stock binding, the probe in _flush never answers at once.
        wanted = self._eager_flush and bool(self._durable_waiters) and self._closing is None
        return wanted and len(self._flushes) < MAX_FLUSHES and _uniffi_fast.installed()

    async def _flush_upto(self, upto: int, handle: sdb.WriteHandle | None, requested: Started[None] | None) -> None:
        """Make commits up to ``upto`` durable (``handle``: the write that ended with it) and release their waiters.

        ``requested``: see :meth:`_start_flush`.

        A flush still waiting after ``SLOW_FLUSH_WARNING_S`` is logged (SlateDB
        retries an unreachable object store without end), and so is its end.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        warning = loop.call_later(SLOW_FLUSH_WARNING_S, self._warn_slow_flush, started)
        try:
            await self._flush(handle, requested)
        except BaseException as exc:
            self._fail_write_out(exc)
            if not isinstance(exc, (sdb.Error, TaqubaError)):
                raise
            return
        finally:
            warning.cancel()
            self._flushes.discard(asyncio.current_task())
        waited = loop.time() - started
        if waited >= SLOW_FLUSH_WARNING_S:
            log.warning("store %s: the WAL flush went through after %.1f s; durable commits resume", self.url, waited)
        # SlateDB takes writes and flush requests from one queue and writes
        # its WAL files in id order (batch_write.rs, SlateDbWalWriter), so
        # this flush covers every write made before it was asked for.
        self._durable = max(self._durable, upto)
        self._end_durable_waits(None, self._durable)
        if self._closing is None:
            self._start_write_out()

    def _warn_slow_flush(self, started: float) -> None:
        waited = asyncio.get_running_loop().time() - started
        log.warning(
            "store %s: a WAL flush has waited %.0f s for the object store (unreachable?); "
            "durable commits wait until it goes through",
            self.url, waited,
        )  # fmt: skip

    async def _flush(self, handle: sdb.WriteHandle | None, requested: Started[None] | None) -> None:
        """Wait until the write of ``handle`` is in the object store, through ``requested`` if given."""
        if requested is not None:
            await requested
            if handle is None:
                return
            durable = Started(handle.await_durable())
            if durable.done():  # it was durable: SlateDB answered without waiting
                await durable
                return
            # SlateDB held the write back (backpressure) until after the flush
            # request, which then did not cover it: flush once more.
            durable.close()
        if self._eager_flush:
            await self._db.flush_with_options(WAL_FLUSH)
        elif handle is not None:
            await handle.await_durable()

    def _fail_write_out(self, exc: BaseException) -> None:
        """A write or flush failed (or was cancelled): stop the store, failing every waiter."""
        if isinstance(exc, sdb.Error):
            self._break(self._translate(exc))
        elif isinstance(exc, TaqubaError):
            self._break(exc)
        else:  # cancelled, or a bug: never leave waiters hanging
            self._break(StoreError(f"store {self.url}: writing commits to SlateDB failed: {exc!r}"))

    async def _write_unwritten(self) -> None:
        commits, upto = self._unwritten, self._seq
        self._unwritten, self._unwritten_bytes = [], 0
        changes: dict[bytes, bytes | None] = {}
        for commit in commits:
            changes.update(commit)
        # SlateDB queues the batch during the first poll of the write, so a
        # flush asked for right after it follows it in the writer's queue:
        # the write and the flush cost one round trip instead of two.
        write = Started(self._db.write(self._batch(changes)))
        requested = Started(self._db.flush_with_options(WAL_FLUSH)) if self._may_request_flush() else None
        self._last_handle = await write
        self._applied = upto
        self._prune()
        if requested is not None:
            self._start_flush(requested)

    def _end_durable_waits(self, error: BaseException | None, upto: int | None = None) -> None:
        """Release the waiters for commits up to ``upto`` (``None``: all), or fail them with ``error``."""
        waiting = []
        for seq, waiter in self._durable_waiters:
            if upto is not None and seq > upto:
                waiting.append((seq, waiter))
            elif not waiter.done():
                if error is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(error)
        self._durable_waiters = waiting

    def _break(self, error: TaqubaError) -> None:
        """A write-out failed: commits this process reported may be lost, so take no more."""
        if self._broken is None:
            self._broken = error
        self._end_durable_waits(error)

    def _batch(self, changes: dict[bytes, bytes | None]) -> sdb.WriteBatch:
        """One SlateDB write batch of ``changes`` (``None``: delete).

        Raises:
            StoreError: SlateDB refused a key or value (an empty key, say).
        """
        batch = sdb.WriteBatch()
        try:
            for key, value in changes.items():
                if value is None:
                    batch.delete(key)
                else:
                    batch.put(key, value)
        except sdb.Error as exc:
            raise self._translate(exc) from exc
        return batch

    def _unpin(self, pinned: int) -> None:
        """A transaction whose snapshot held commit ``pinned`` ended: prune what nobody needs now."""
        self._pins.unpin(pinned)
        self._prune()

    def _prune(self) -> None:
        """Drop the overlay versions that every open transaction's snapshot holds."""
        oldest = self._pins.oldest()
        horizon = self._applied if oldest is None else min(oldest, self._applied)
        self._overlay.prune(horizon, self._cache.remember)

    async def _snapshot(self) -> tuple[sdb.DbSnapshot, int]:
        """A SlateDB snapshot and the commit number it holds at least, pinned against pruning.

        One snapshot serves every transaction that begins until the next
        write-out lands.  The caller unpins the number when done.
        """
        shared = self._shared
        if shared is not None and shared[1] == self._applied:
            self._pins.pin(shared[1])
            return shared
        applied = self._applied
        self._pins.pin(applied)  # before the call: pruning must keep what it may miss
        try:
            snapshot = await self._call(self._db.snapshot())
        except BaseException:
            self._pins.unpin(applied)
            raise
        if self._shared is None or self._shared[1] <= applied:
            self._shared = (snapshot, applied)
        return snapshot, applied

    def _read(self, key: bytes, seq: int) -> bytes | None | Miss:
        """The value of ``key`` as of commit ``seq`` when known without SlateDB, else ``MISS``."""
        value = self._overlay.read(key, seq)
        if value is MISS:
            # Older than every version the overlay holds: the newest version pruned.
            value = self._cache.get(key)
        return value


class CommitDurability(Durability):
    """The durability of a commit that returned before it reached the object store."""

    __slots__ = ("_seq", "_store")

    def __init__(self, store: SlateDBStore, seq: int) -> None:
        self._store = store
        self._seq = seq

    async def wait(self) -> None:
        """Return once the commit reached the object store.

        Raises:
            StoreFenced, StoreClosed, StoreError: the commit may not be durable.
        """
        await self._store._durable_after(self._seq)


class SlateDBTransaction(Transaction):
    """A snapshot-isolated transaction on a SlateDB database.

    SlateDB's own transactions cost one FFI call per put, delete and merge,
    and SlateDB runs the (Python) counter merge operator on its own threads
    for every merge it is handed, twice.  This process is the store's only
    writer (opening a store fences every earlier writer), so it commits in
    Python and writes the commits to SlateDB behind them:

    * a commit is checked and applied to the store's overlay, a table of
      versions (:class:`~taquba_backends._versions.VersionTable`), without
      a call into SlateDB; the write-out task then writes every commit made
      meanwhile as one ``WriteBatch``, in commit order.  A durable commit
      returns once that batch's WAL write reached the object store;
    * reads see the commits made before the transaction began, with its
      own writes laid on top: the newest version at or below its start
      from the overlay, else the value last pruned from the overlay
      (:class:`~taquba_backends._readcache.ReadCache`), else a SlateDB
      snapshot.  The snapshot was taken at begin (one serves every
      transaction begun before the next write-out lands), and the overlay
      keeps every version the snapshot may lack until the transaction ends;
    * first committer wins, as in SlateDB's snapshot isolation: at commit,
      when a key this transaction put or deleted has a version committed
      after it began, it raises :class:`StoreConflict` and writes nothing;
    * counter merges take no part in conflicts; each commit writes a counter
      as its new value (the process keeps the values it last wrote), so
      SlateDB never calls the merge operator on the write path.

    After commit or rollback every method but :meth:`rollback` raises
    :class:`StoreClosed`; every method may raise :class:`StoreFenced` or
    :class:`StoreError` when SlateDB fails.
    """

    def __init__(self, store: SlateDBStore, start: int, snapshot: sdb.DbSnapshot, pinned: int) -> None:
        self._store = store
        self._start = start  # the newest commit this transaction sees
        self._snapshot: sdb.DbSnapshot | None = snapshot
        self._pinned = pinned  # what the snapshot holds at least; pruning keeps newer versions
        self._buffer = WriteBuffer()
        self._done = False

    def __del__(self) -> None:
        # Dropped without commit or rollback: stop pinning the overlay.  Only
        # queue the release (an atomic append), as this may run at any point.
        if not getattr(self, "_done", True):
            self._store._pins.abandon(self._pinned)

    def _check_usable(self) -> None:
        if self._done:
            raise StoreClosed(f"transaction on store {self._store.url} already committed or rolled back")
        self._store._check_usable()

    def _view(self) -> sdb.DbSnapshot:
        snapshot = self._snapshot
        if snapshot is None:
            raise StoreClosed(f"transaction on store {self._store.url} already committed or rolled back")
        return snapshot

    async def get(self, key: bytes) -> bytes | None:
        """The value under ``key`` in this transaction's view, or ``None``."""
        self._check_usable()
        if key in self._buffer.writes:
            return self._buffer.visible(key, None)
        committed = self._store._read(key, self._start)
        if committed is MISS:
            committed = await self._store._call(self._view().get(key))
        return self._buffer.visible(key, committed)  # type: ignore[arg-type]

    async def scan(
        self,
        prefix: bytes,
        *,
        start_after: bytes | None = None,
        end: bytes | None = None,
        limit: int | None = None,
    ) -> list[tuple[bytes, bytes]]:
        """Up to ``limit`` (key, value) pairs under ``prefix`` in this transaction's view, ascending.

        ``start_after`` and ``end`` are exclusive full keys.  Rows cross the
        FFI boundary in batches of at most :data:`SCAN_BATCH`.
        """
        self._check_usable()
        bounds = scan_bounds(prefix, start_after, end)
        if bounds is None or (limit is not None and limit <= 0):
            return []
        overlay = self._store._overlay
        layered: dict[bytes, bytes | None] = {}
        for key in overlay.keys_from(bounds.start, bounds.start_inclusive, bounds.end):
            value = overlay.read(key, self._start)
            if value is not MISS:
                layered[key] = value  # type: ignore[assignment]
        own = self._buffer.keys_in(bounds)
        # Each layered key hides or replaces at most one row of the snapshot: read that many more.
        want = None if limit is None else limit + len(layered) + len(own)
        rows = await self._scan_committed(bounds, want)
        if not layered and not own:
            return rows
        known_up_to = None if want is None or len(rows) < want else rows[-1][0]
        merged: dict[bytes, bytes | None] = dict(rows)
        for key, value in layered.items():
            if known_up_to is None or key <= known_up_to:
                merged[key] = value
        for key in own:
            if known_up_to is None or key <= known_up_to:
                merged[key] = self._buffer.visible(key, merged.get(key))
        out = sorted((key, value) for key, value in merged.items() if value is not None)
        return out if limit is None else out[:limit]

    async def _scan_committed(self, bounds: KeyBounds, want: int | None) -> list[tuple[bytes, bytes]]:
        """Up to ``want`` rows inside ``bounds`` from the snapshot."""
        call = self._store._call
        view = self._view()
        key_range = sdb.KeyRange(
            start=bounds.start, start_inclusive=bounds.start_inclusive, end=bounds.end, end_inclusive=False
        )
        iterator = await call(view.scan(key_range))
        out: list[tuple[bytes, bytes]] = []
        while True:
            size = SCAN_BATCH if want is None else min(SCAN_BATCH, want - len(out))
            batch = await call(iterator.next_batch(size))
            out.extend((row.key, row.value) for row in batch)
            if len(batch) < size or len(out) == want:
                return out

    async def put(self, key: bytes, value: bytes) -> None:
        """Buffer a write of ``value`` under ``key``."""
        self._check_usable()
        self._buffer.put(key, value)

    async def delete(self, key: bytes) -> None:
        """Buffer a delete of ``key`` (conflict-checked even when absent)."""
        self._check_usable()
        self._buffer.delete(key)

    async def merge_counter(self, key: bytes, delta: int) -> None:
        """Buffer adding ``delta`` (signed 64-bit) to the counter under ``key``.

        Raises:
            InvalidArgument: ``delta`` is not a signed 64-bit int.
        """
        self._check_usable()
        self._buffer.merge(key, delta)

    async def commit(self, *, durable: bool = True) -> Durability:
        """Commit; with ``durable`` wait until the commit reached the object store.

        Without ``durable`` the returned handle's ``wait()`` waits for that.
        A transaction that wrote nothing returns
        :data:`~taquba_core.kv.DURABLE` at once.

        Raises:
            StoreConflict: a concurrent commit wrote a key this one put or deleted.
            CorruptRecord: a merged key does not hold a counter.
            StoreFenced: another writer took the store over (at commit or
                while waiting for durability).
            StoreClosed: the transaction ended or the store was closed.
            StoreError: SlateDB failed.
        """
        self._check_usable()
        buffer = self._buffer
        self._finish(keep_pinned=bool(buffer))
        if not buffer:
            return DURABLE
        try:
            seq = await self._store._commit(self._start, buffer)
        finally:
            # Only now: until its check has run, pruning must keep what it checks against.
            self._store._unpin(self._pinned)
        pending = CommitDurability(self._store, seq)
        if not durable:
            return pending
        await pending.wait()
        return DURABLE

    async def rollback(self) -> None:
        """Discard the buffered writes; a no-op when the transaction already ended."""
        if not self._done:
            self._finish()

    def _finish(self, keep_pinned: bool = False) -> None:
        self._done = True
        self._snapshot = None
        self._buffer = WriteBuffer()
        if not keep_pinned:
            self._store._unpin(self._pinned)
