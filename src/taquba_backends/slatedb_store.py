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
import os
import struct
import weakref
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
from ._keyrange import KeyBounds, scan_bounds
from ._writebuffer import WriteBuffer, counter_plus

T = TypeVar("T")

LOCAL_FLUSH_INTERVAL_MS = 5
CLOUD_FLUSH_INTERVAL_MS = 50
MAX_FLUSH_INTERVAL_MS = 60_000
DEFAULT_PREFIX = "taquba"
SCAN_BATCH = 256
"""Rows fetched per ``next_batch`` call across the FFI boundary."""
MAX_FLUSHES = 4
"""Most eager WAL flushes in flight at once (see :meth:`SlateDBStore._flushed_after`)."""
PRUNE_MIN = 4096
"""Conflict-detection entries kept before the first pruning pass."""
WAL_FLUSH = sdb.FlushOptions(flush_type=sdb.FlushType.WAL)
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

    With ``eager_flush`` (local and in-memory object stores), a commit that
    waits for durability asks for a WAL flush at once instead of waiting for
    the flush timer, unless one started after its write already runs; every
    commit that returned before a flush started shares it (group commit),
    and up to :data:`MAX_FLUSHES` run at once (see :meth:`_flushed_after`).
    A lone caller then waits for one WAL write (~0.5 ms on a local disk)
    instead of up to a flush interval.  Cloud stores keep to the flush
    interval, which bounds their PUT requests.

    Transactions are checked for conflicts and committed by this process
    (see :class:`SlateDBTransaction`).
    """

    def __init__(self, db: sdb.Db, url: str, *, eager_flush: bool = False) -> None:
        """Wrap an open database; use :meth:`open` instead."""
        self._db = db
        self.url = url
        self._closed = False
        self._fenced = False
        self._eager_flush = eager_flush
        # Eager flushes are numbered; a commit that returned while ``n`` had
        # started is durable once a flush numbered above ``n`` has ended.
        self._flush_wanted = False  # a flush is owed as soon as one ends
        self._flushes: set[asyncio.Task[None]] = set()  # running
        self._closing: asyncio.Future[None] | None = None  # the shutdown, once close() was called
        self._flushes_started = 0
        self._flushes_done = 0
        self._flush_waiters: list[tuple[int, asyncio.Future[None]]] = []
        # Conflict detection (see SlateDBTransaction): commits are numbered;
        # ``_last_write`` holds, per key put or deleted, the number of the
        # last commit that wrote it (pruned below the oldest open
        # transaction); ``_writing`` is true while commit number ``_seq`` is
        # on its way into SlateDB.
        self._commit_lock = asyncio.Lock()
        self._seq = 0
        self._writing = False
        self._last_write: dict[bytes, int] = {}
        self._prune_at = PRUNE_MIN
        self._open: weakref.WeakSet[SlateDBTransaction] = weakref.WeakSet()
        # Counter values as this process last wrote them (read on first use).
        self._counters: dict[bytes, bytes | None] = {}

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
        return cls(db, location.url, eager_flush=location.scheme in LOCAL_SCHEMES)

    async def begin(self) -> SlateDBTransaction:
        """Start a snapshot-isolated transaction.

        Raises:
            StoreClosed: the store was closed.
            StoreFenced: another writer took the store over.
            StoreError: SlateDB failed.
        """
        self._check_usable()
        start = self._visible_seq()  # before the snapshot: it includes every commit up to here
        txn = SlateDBTransaction(self, start, await self._call(self._db.snapshot()))
        self._open.add(txn)
        return txn

    async def close(self) -> None:
        """Flush and shut the database down; a no-op when already closed.

        A fenced store closes without error.

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
        if self._flushes:
            await asyncio.wait(self._flushes)
        try:
            await self._db.shutdown()
        except sdb.Error.Closed as exc:
            # Fenced or already shut down: nothing left to flush.
            self._end_flush_waits(None, self._translate(exc))
        except sdb.Error as exc:
            error = StoreError(f"store {self.url} did not shut down cleanly: {exc}")
            self._end_flush_waits(None, error)
            raise error from exc
        self._end_flush_waits(None)  # a clean shutdown wrote the WAL out

    def _check_usable(self) -> None:
        if self._fenced:
            raise self._fenced_error()
        if self._closed:
            raise StoreClosed(f"store {self.url} is closed")

    async def sync(self) -> None:
        """Flush the WAL, so that every commit visible to reads is durable.

        Raises:
            StoreFenced, StoreClosed, StoreError: as for a commit.
        """
        self._check_usable()
        if self._eager_flush:
            await self._flushed_after(self._flushes_started)
        else:
            await self._call(self._db.flush_with_options(WAL_FLUSH))

    async def _flushed_after(self, ticket: int) -> None:
        """Return once a WAL flush numbered above ``ticket`` has ended (``eager_flush`` only).

        A caller starts a flush unless one started after its commit already
        runs; every commit that returned before a flush started shares it
        (group commit).  SlateDB writes concurrent WAL flushes in parallel,
        so a commit waits for about one flush, not for the end of one that
        began before it and then its own; at most :data:`MAX_FLUSHES` run
        at once.

        Raises:
            StoreFenced, StoreClosed, StoreError: the flush failed.
        """
        if self._flushes_done > ticket:
            return
        if self._fenced:
            raise self._fenced_error()
        if self._closing is not None:
            # The write happened before the close, whose clean shutdown writes it out.
            await asyncio.shield(self._closing)
            if self._fenced:
                raise self._fenced_error()
            return
        waiter = asyncio.get_running_loop().create_future()
        self._flush_waiters.append((ticket, waiter))
        if self._flushes_started <= ticket:
            self._start_flush()
        await waiter

    def _start_flush(self) -> None:
        if len(self._flushes) >= MAX_FLUSHES:
            self._flush_wanted = True
            return
        self._flushes_started += 1
        task = asyncio.ensure_future(self._flush(self._flushes_started))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flush(self, number: int) -> None:
        """Flush number ``number``: it carries every commit that returned before it was numbered."""
        try:
            await self._db.flush_with_options(WAL_FLUSH)
        except sdb.Error as exc:
            self._end_flush_waits(number, self._translate(exc))
        except BaseException:
            self._end_flush_waits(number, StoreError(f"a WAL flush of store {self.url} was cancelled"))
            raise
        else:
            self._flushes_done = max(self._flushes_done, number)
            self._end_flush_waits(number)
        # This flush no longer counts against MAX_FLUSHES (its done callback
        # would remove it too late for the restart below).
        self._flushes.discard(asyncio.current_task())
        if self._flush_wanted and not self._closed:  # owed to a waiter that found MAX_FLUSHES running
            self._flush_wanted = False
            self._start_flush()

    def _end_flush_waits(self, done: int | None, error: BaseException | None = None) -> None:
        """Release the waiters that flush number ``done`` covers (``None``: all), or fail them with ``error``."""
        waiting = []
        for ticket, waiter in self._flush_waiters:
            if done is not None and ticket >= done:
                waiting.append((ticket, waiter))
            elif not waiter.done():
                if error is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(error)
        self._flush_waiters = waiting

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

    def _visible_seq(self) -> int:
        """The number of the newest commit that a snapshot taken now is sure to include."""
        return self._seq - 1 if self._writing else self._seq

    async def _apply(self, start: int, buffer: WriteBuffer) -> sdb.WriteHandle:
        """Check ``buffer`` against the commits after ``start``; write it as one batch.

        Commits run one at a time under the commit lock, so they reach SlateDB
        in the order they were checked, and each counter is written as the
        value the commits before it left plus this commit's delta.

        Raises:
            StoreConflict: a key ``buffer`` puts or deletes was written by a
                commit numbered above ``start``; nothing is written.
            CorruptRecord: a merged key does not hold a counter; nothing is written.
            StoreFenced, StoreClosed, StoreError: SlateDB failed; the batch may
                or may not have been applied.
        """
        async with self._commit_lock:
            self._check_usable()
            for key in buffer.writes:
                if self._last_write.get(key, -1) > start:
                    raise StoreConflict(f"key {key!r} was written by a concurrent commit in store {self.url}")
            writes, merges = buffer.folded()
            counters = {key: counter_plus(self.url, key, await self._counter(key), d) for key, d in merges.items()}
            batch = self._batch(writes, counters)
            self._seq += 1
            for key in (*writes, *counters):  # a put or delete conflicts with an earlier merge too
                self._last_write[key] = self._seq
            self._writing = True
            # Shielded: a caller cancelled here must not end the commit while
            # SlateDB may still apply the batch; the lock, ``_writing`` and the
            # counter values stay as they are until the write really ended.
            write = asyncio.ensure_future(self._call(self._db.write(batch)))
            try:
                handle = await asyncio.shield(write)
            except BaseException:
                self._counters.clear()  # the batch may or may not be applied: read them again
                await _outlast(write)
                raise
            finally:
                self._writing = False
            for key, value in writes.items():
                if key in self._counters:  # a counter key overwritten by a put or delete
                    self._counters[key] = value
            self._counters.update(counters)
            if len(self._last_write) > self._prune_at:
                self._prune()
            return handle

    def _batch(self, writes: dict[bytes, bytes | None], counters: dict[bytes, bytes]) -> sdb.WriteBatch:
        """One SlateDB write batch of ``writes`` (``None``: delete) and ``counters``.

        Raises:
            StoreError: SlateDB refused a key or value (an empty key, say).
        """
        batch = sdb.WriteBatch()
        try:
            for key, value in writes.items():
                if value is None:
                    batch.delete(key)
                else:
                    batch.put(key, value)
            for key, value in counters.items():
                batch.put(key, value)
        except sdb.Error as exc:
            raise self._translate(exc) from exc
        return batch

    async def _counter(self, key: bytes) -> bytes | None:
        """The counter under ``key`` as the last commit left it (called under the commit lock)."""
        if key not in self._counters:
            self._counters[key] = await self._call(self._db.get(key))
        return self._counters[key]

    def _prune(self) -> None:
        """Forget the commit numbers that no open or future transaction can conflict with."""
        horizon = min((txn._start for txn in self._open), default=self._seq)
        horizon = min(horizon, self._visible_seq())
        self._last_write = {key: seq for key, seq in self._last_write.items() if seq > horizon}
        self._prune_at = max(PRUNE_MIN, 2 * len(self._last_write))


async def _outlast(task: asyncio.Future[object]) -> None:
    """Wait until ``task`` is done, through any number of cancellations of the caller."""
    while not task.done():
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError:
            continue


class SlateDBDurability(Durability):
    """The durability of a SlateDB commit that returned before its WAL write was flushed."""

    __slots__ = ("_handle", "_store", "_ticket")

    def __init__(self, store: SlateDBStore, handle: sdb.WriteHandle) -> None:
        self._store = store
        self._handle = handle
        # With eager flushes: the number of the last flush started before the
        # write returned; the first flush after it carries the write.
        self._ticket = store._flushes_started if store._eager_flush else None

    async def wait(self) -> None:
        """Return once the commit's WAL write reached the object store.

        Raises:
            StoreFenced, StoreClosed, StoreError: the write may not be durable.
        """
        if self._ticket is not None:
            await self._store._flushed_after(self._ticket)
        else:
            await self._store._call(self._handle.await_durable())


class SlateDBTransaction(Transaction):
    """A snapshot-isolated transaction on a SlateDB database.

    SlateDB's own transactions cost one FFI call per put, delete and merge,
    and SlateDB runs the (Python) counter merge operator on its own threads
    for every merge it is handed, twice.  This transaction keeps its writes
    in Python instead and commits them as one ``WriteBatch``:

    * reads come from a SlateDB snapshot taken at :meth:`SlateDBStore.begin`,
      with the transaction's own writes laid on top;
    * first committer wins, as in SlateDB's snapshot isolation: at commit,
      when a key this transaction put or deleted was written by a commit
      that its snapshot may not include, it raises :class:`StoreConflict`
      and writes nothing (the check runs under the store's commit lock);
    * counter merges take no part in conflicts; each commit writes a counter
      as its new value (the process keeps the values it last wrote), so
      SlateDB never calls the merge operator on the write path.

    The check covers the transactions of this process, which is the store's
    only writer (opening a store fences every earlier writer).  After commit
    or rollback every method but :meth:`rollback` raises
    :class:`StoreClosed`; every method may raise :class:`StoreFenced` or
    :class:`StoreError` when SlateDB fails.
    """

    def __init__(self, store: SlateDBStore, start: int, snapshot: sdb.DbSnapshot) -> None:
        self._store = store
        self._start = start  # the newest commit that ``snapshot`` is sure to include
        self._snapshot: sdb.DbSnapshot | None = snapshot
        self._buffer = WriteBuffer()
        self._done = False

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
        return self._buffer.visible(key, await self._store._call(self._view().get(key)))

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
        own = self._buffer.keys_in(bounds)
        # Each buffered key hides at most one committed row: read that many more.
        want = None if limit is None else limit + len(own)
        rows = await self._scan_committed(bounds, want)
        if not own:
            return rows
        known_up_to = None if want is None or len(rows) < want else rows[-1][0]
        merged = dict(rows)
        for key in own:
            if known_up_to is None or key <= known_up_to:
                merged[key] = self._buffer.visible(key, merged.get(key))  # type: ignore[assignment]
        out = sorted((key, value) for key, value in merged.items() if value is not None)
        return out if limit is None else out[:limit]

    async def _scan_committed(self, bounds: KeyBounds, want: int | None) -> list[tuple[bytes, bytes]]:
        """Up to ``want`` committed rows inside ``bounds`` from the snapshot."""
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
        """Commit; with ``durable`` wait until the WAL write reached the object store.

        Without ``durable`` the returned handle's ``wait()`` waits for the WAL
        write.  A transaction that wrote nothing returns
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
        self._finish(keep_open=bool(buffer))
        if not buffer:
            return DURABLE
        try:
            handle = await self._store._apply(self._start, buffer)
        finally:
            # Only now: until its check has run, pruning must keep what it checks against.
            self._store._open.discard(self)
        pending = SlateDBDurability(self._store, handle)
        if not durable:
            return pending
        await pending.wait()
        return DURABLE

    async def rollback(self) -> None:
        """Discard the buffered writes; a no-op when the transaction already ended."""
        if not self._done:
            self._finish()

    def _finish(self, keep_open: bool = False) -> None:
        self._done = True
        self._snapshot = None
        self._buffer = WriteBuffer()
        if not keep_open:
            self._store._open.discard(self)
