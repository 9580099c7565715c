"""The ``taquba`` command line.

The store comes from ``--store URL``, else the ``TAQUBA_STORE`` environment
variable, else the local directory ``./.taquba``.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from taquba_core import (
    PRIORITY_NORMAL,
    CancelOutcome,
    EnqueueResult,
    JobRecord,
    JobStatus,
    Queue,
    QueueConfig,
    TaqubaError,
    run_worker_concurrent,
)
from taquba_core.keys import validate_queue_name
from taquba_core.worker import Handler

from . import eventloop
from .demo import default_root, run_demo
from .url import EPHEMERAL_SCHEMES, names_persistent_store, open_store, url_scheme

DEFAULT_STORE = "./.taquba"
T = TypeVar("T")

store_option = click.option(
    "--store",
    envvar="TAQUBA_STORE",
    default=DEFAULT_STORE,
    show_default=True,
    help="Store URL (a path, file:///dir, s3://bucket/prefix, gs://..., az://...; the demo also takes memory://); env TAQUBA_STORE.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


@asynccontextmanager
async def opened(url: str, *, read_only: bool = False, ephemeral_ok: bool = False, **options: Any) -> Any:
    """An open :class:`Queue` on the store at ``url``, closed on exit.

    ``read_only`` opens a persistent store without fencing its writer (a
    running worker keeps going); an in-memory store has no other writer, so
    it is opened normally.  Only ``ephemeral_ok`` callers (the demo) may
    use a store that vanishes when the command exits.
    """
    if not ephemeral_ok and not names_persistent_store(url) and url_scheme(url) in EPHEMERAL_SCHEMES:
        raise click.ClickException(f"store {url!r} keeps nothing after this command exits; use a path or file:// URL")
    view = read_only and names_persistent_store(url)
    queue = await Queue.open(await open_store(url, read_only=view), **options)
    try:
        yield queue
    finally:
        await queue.close()


async def require_queue(q: Queue, name: str) -> None:
    """Fail with one clear line unless ``name`` is a queue of the store (one in ``list_queues``)."""
    validate_queue_name(name)
    if name not in await q.list_queues():
        raise click.ClickException(f"no queue named {name!r} in this store")


async def dry_run(action: Callable[[Queue], Awaitable[object]]) -> None:
    """Run ``action`` on a scratch in-memory queue first: the same checks of the input as the
    real call, so that bad input fails before the command opens the store as its writer
    (which would stop the store's running worker)."""
    scratch = await Queue.open(await open_store("inmemory://"), background=False)
    try:
        await action(scratch)
    finally:
        await scratch.close()


def run(coro: Awaitable[T]) -> T:
    """Run ``coro`` (on uvloop when installed); a :class:`TaqubaError` becomes one clear line and exit status 1."""
    try:
        return eventloop.run(coro)  # type: ignore[arg-type]
    except TaqubaError as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc


@click.group()
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug).")
def main(verbose: int) -> None:
    """taquba: a durable task queue whose whole state lives in one object-storage KV store."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("queue")
@click.argument("payload")
@click.option("--priority", type=int, default=None, help=f"Lower runs first (default {PRIORITY_NORMAL}).")
@click.option("--delay", type=float, default=None, help="Seconds before the job may run.")
@click.option("--max-attempts", type=int, default=None, help="Claims before dead-lettering.")
@click.option("--header", "headers", multiple=True, metavar="K=V", help="A header; repeatable.")
@click.option("--dedup-key", default=None, help="Skip when a queued job carries this key.")
@store_option
def enqueue(
    queue: str,
    payload: str,
    priority: int | None,
    delay: float | None,
    max_attempts: int | None,
    headers: tuple[str, ...],
    dedup_key: str | None,
    store: str,
) -> None:
    """Enqueue PAYLOAD (text; '-' reads bytes from stdin) on QUEUE and print the job id."""
    data = sys.stdin.buffer.read() if payload == "-" else payload.encode()
    parsed = {}
    for item in headers:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"header {item!r} is not K=V", param_hint="--header")
        parsed[key] = value

    options: dict[str, Any] = dict(
        priority=priority, delay=delay, max_attempts=max_attempts, headers=parsed, dedup_key=dedup_key
    )

    def submit(q: Queue) -> Awaitable[EnqueueResult]:
        return q.enqueue_with(queue, data, **options)

    async def go() -> str:
        await dry_run(submit)
        async with opened(store, background=False) as q:
            result = await submit(q)
            if not result.created:
                click.echo(f"already enqueued: job {result.id} carries dedup key {dedup_key!r}", err=True)
            return result.id

    click.echo(run(go()))


def load_handler(spec: str) -> Handler:
    """Import ``module:function`` (the current directory is importable)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise click.BadParameter(f"{spec!r} is not module:function", param_hint="HANDLER")
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
        handler = getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise click.BadParameter(f"cannot load {spec!r}: {exc}", param_hint="HANDLER") from exc
    if not callable(handler):
        raise click.BadParameter(f"{spec!r} is not callable", param_hint="HANDLER")
    return handler


@main.command()
@click.argument("queue")
@click.argument("handler")
@click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True, help="Jobs handled at once.")
@click.option(
    "--keep-done",
    type=float,
    default=None,
    metavar="SECONDS",
    help="Keep the records of acked jobs this long (for get, jobs --status done); default: delete at ack.",
)
@store_option
def worker(queue: str, handler: str, concurrency: int, keep_done: float | None, store: str) -> None:
    """Run HANDLER (module:function, async or sync, taking the job record) on QUEUE until Ctrl-C.

    On Ctrl-C or SIGTERM no new job is claimed; jobs in flight finish and
    settle, then the command exits 0.
    """
    func = load_handler(handler)
    try:
        validate_queue_name(queue)
    except TaqubaError as exc:
        raise click.BadParameter(str(exc), param_hint="QUEUE") from exc
    try:
        config = QueueConfig(keep_done_jobs=keep_done)
    except TaqubaError as exc:
        raise click.BadParameter(str(exc), param_hint="--keep-done") from exc

    async def go() -> None:
        shutdown = stop_on_signals("finishing the jobs in flight")
        async with opened(store, config=config) as q:
            if queue not in await q.list_queues():
                click.echo(f"queue {queue!r} has no jobs yet; waiting for some", err=True)
            click.echo(f"worker on {queue!r} ({concurrency} at once); Ctrl-C to stop", err=True)
            stats = await run_worker_concurrent(q, queue, func, concurrency=concurrency, shutdown=shutdown)
        click.echo(
            f"stopped: {stats.acked} acked, {stats.nacked} failed (retry scheduled), "
            f"{stats.dead_lettered} dead-lettered",
            err=True,
        )

    run(go())


def stop_on_signals(draining: str) -> asyncio.Event:
    """An event set by the first Ctrl-C or SIGTERM; a second one quits at once.

    Quitting at once abandons the jobs in flight: their claims are re-queued
    when the store is next opened (at-least-once delivery).
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            click.echo("quitting now; the jobs in flight run again at the next open", err=True)
            os._exit(130)
        stop.set()
        click.echo(f"stopping: {draining} (Ctrl-C again to quit now)", err=True)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    return stop


def _table(title: str, columns: list[str], rows: Iterator[list[Any]] | list[list[Any]]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, min_width=26 if column == "id" else None)
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    console = Console()
    if not console.is_terminal:
        console = Console(width=1000)  # piped: size the table to its content instead of cropping at 80
    console.print(table)


@main.command()
@click.argument("queue", required=False)
@json_option
@store_option
def stats(queue: str | None, as_json: bool, store: str) -> None:
    """Per-queue job counts (every queue, or QUEUE)."""

    async def go() -> list[dict[str, Any]]:
        async with opened(store, read_only=True) as q:
            if queue:
                await require_queue(q, queue)
            names = [queue] if queue else await q.list_queues()
            return [asdict(await q.stats(name)) for name in names]

    rows = run(go())
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    columns = ["queue", "pending", "scheduled", "claimed", "done", "dead"]
    _table("taquba stats", columns, [[row[c] for c in columns] for row in rows])


@main.command()
@click.argument("directory", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--workers", type=click.IntRange(min=1), default=4, show_default=True, help="Concurrent workers.")
@store_option
def demo(directory: Path | None, workers: int, store: str) -> None:
    """Fingerprint every file under DIRECTORY (default: Python's standard library) through the queue.

    Each file's SHA-256, size and line count is stored durably with its
    job's acknowledgement.  After Ctrl-C or kill -9, running the same
    command again resumes where it stopped.
    """
    root = directory or default_root()
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]fingerprinting"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )

    def on_start(total: int, done: int, resumed: bool) -> Callable[[int], None]:
        word = "resuming" if resumed else "starting"
        console.print(f"{word}: {total} files under {root} ({done} already done), store {store}", soft_wrap=True)
        task = progress.add_task("files", total=total, completed=done)
        progress.start()
        return lambda left: progress.update(task, completed=total - left)

    async def go() -> Any:
        stop = stop_on_signals("storing the files in flight")
        async with opened(store, ephemeral_ok=True) as q:
            try:
                return await run_demo(q, root, workers, on_start, stop)
            finally:
                progress.stop()

    summary = run(go())
    if summary is None:
        console.print("interrupted: run the same command again to resume", soft_wrap=True)
        sys.exit(130)
    if summary.dead:
        console.print(f"[yellow]{summary.dead} files could not be read (dead-lettered)")
    for line in summary.lines_out():
        click.echo(line)


def _job_dict(job: JobRecord) -> dict[str, Any]:
    """A JSON-ready view of a record: payload as text when it is UTF-8, else base64."""
    out = {k: v for k, v in asdict(job).items() if k != "cancellation"}
    out["status"] = job.status.value
    try:
        out["payload"] = job.payload.decode("utf-8")
    except UnicodeDecodeError:
        out["payload_base64"] = base64.b64encode(job.payload).decode()
        del out["payload"]
    return out


JOB_COLUMNS = ["id", "status", "priority", "attempts", "last_error", "payload"]
STATUS_TIME = {
    JobStatus.PENDING: "enqueued_at",
    JobStatus.SCHEDULED: "run_at",
    JobStatus.CLAIMED: "lease_expires_at",
    JobStatus.DONE: "completed_at",
    JobStatus.DEAD: "failed_at",
}
"""The time a table of jobs in one state shows: when each may run, its lease ends..."""
TIME_FIELDS = frozenset({*STATUS_TIME.values(), "claimed_at"})
"""Record fields that tables show as UTC times (JSON keeps milliseconds)."""


def _job_row(row: dict[str, Any], columns: list[str]) -> list[str]:
    cells = dict(row, attempts=f"{row['attempts']}/{row['max_attempts']}")
    cells.setdefault("payload", "base64:" + row.get("payload_base64", ""))
    for name in TIME_FIELDS:
        if cells.get(name) is not None:
            cells[name] = _utc(cells[name])
    return ["" if cells[c] is None else _printable(str(cells[c]))[:40] for c in columns]


def _utc(ms: int) -> str:
    """Milliseconds since the epoch as an ISO 8601 UTC time to the millisecond."""
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _printable(text: str) -> str:
    """``text`` with control characters escaped, so a table stays aligned."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _print_jobs(
    title: str,
    status: JobStatus,
    jobs: list[JobRecord],
    as_json: bool,
    cursor: str | None = None,
    cursor_option: str = "--cursor",
) -> None:
    """A table of ``jobs`` in ``status``, or with ``--json`` ``{"jobs": [...], "cursor": next page or null}``."""
    rows = [_job_dict(job) for job in jobs]
    if as_json:
        click.echo(json.dumps({"jobs": rows, "cursor": cursor}, indent=2))
        return
    columns = [*JOB_COLUMNS[:2], STATUS_TIME[status], *JOB_COLUMNS[2:]]
    _table(title, columns, [_job_row(r, columns) for r in rows])
    if cursor is not None:
        click.echo(f"more: {cursor_option} {cursor}", err=True)


@main.command()
@click.argument("queue")
@click.option(
    "--status",
    type=click.Choice([s.value.lower() for s in JobStatus], case_sensitive=False),
    default="pending",
    show_default=True,
)
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--cursor", default=None, help="Resume after a previous page.")
@json_option
@store_option
def jobs(queue: str, status: str, limit: int, cursor: str | None, as_json: bool, store: str) -> None:
    """List QUEUE's jobs in one state, in that state's order."""

    async def go() -> tuple[list[JobRecord], str | None]:
        async with opened(store, read_only=True) as q:
            await require_queue(q, queue)
            return await q.list_jobs(queue, status.capitalize(), cursor, limit)

    page, next_cursor = run(go())
    _print_jobs(f"{queue}: {status}", JobStatus(status.capitalize()), page, as_json, next_cursor)


@main.command()
@click.argument("queue")
@click.option("--after", default=None, help="List dead jobs after this id.")
@click.option("--limit", type=int, default=50, show_default=True)
@json_option
@store_option
def dead(queue: str, after: str | None, limit: int, as_json: bool, store: str) -> None:
    """List QUEUE's dead letters in id order."""

    async def go() -> list[JobRecord]:
        async with opened(store, read_only=True) as q:
            await require_queue(q, queue)
            return await q.dead_jobs(queue, after, limit)

    page = run(go())
    next_after = page[-1].id if len(page) == limit else None
    _print_jobs(f"{queue}: dead", JobStatus.DEAD, page, as_json, next_after, "--after")


def _one_job_command(
    action: Callable[[Queue, str], Awaitable[Any]], *, read_only: bool = False
) -> Callable[[str, str], Any]:
    """Run ``action(queue, job_id)`` on an opened store and return its result."""

    def call(job_id: str, store: str) -> Any:
        async def go() -> Any:
            async with opened(store, read_only=read_only, background=False) as q:
                return await action(q, job_id)

        return run(go())

    return call


@main.command()
@click.argument("job_id")
@json_option
@store_option
def get(job_id: str, as_json: bool, store: str) -> None:
    """Show one job."""
    job = _one_job_command(Queue.get_job, read_only=True)(job_id, store)
    if job is None:
        raise click.ClickException(f"no job with id {job_id!r}")
    fields = _job_dict(job)
    if as_json:
        click.echo(json.dumps(fields, indent=2))
        return
    shown = {k: _utc(v) if k in TIME_FIELDS and v is not None else v for k, v in fields.items()}
    _table(f"job {job_id}", ["field", "value"], [[k, "" if v is None else v] for k, v in shown.items()])


def _require_job(job_id: str, store: str, statuses: set[JobStatus], what: str) -> None:
    """Fail unless the job is in one of ``statuses``, looking through the read-only view
    (so that a mistyped id does not take the store over from its running worker)."""
    job = _one_job_command(Queue.get_job, read_only=True)(job_id, store)
    if job is None:
        raise click.ClickException(f"no {what} job with id {job_id!r}")
    if job.status not in statuses:
        raise click.ClickException(f"job {job_id!r} is {job.status.value}, not {what}")


@main.command()
@click.argument("job_id")
@store_option
def requeue(job_id: str, store: str) -> None:
    """Move a dead job back to pending with a fresh attempt budget."""
    _require_job(job_id, store, {JobStatus.DEAD}, "dead")
    job = _one_job_command(Queue.requeue_dead_job)(job_id, store)
    click.echo(f"requeued {job.id} on {job.queue}")


@main.command()
@click.argument("job_id")
@store_option
def cancel(job_id: str, store: str) -> None:
    """Cancel a job: removed when waiting, a request when claimed."""
    _require_job(job_id, store, {JobStatus.PENDING, JobStatus.SCHEDULED, JobStatus.CLAIMED}, "pending, scheduled or claimed")
    outcome = _one_job_command(Queue.cancel)(job_id, store)
    if outcome is CancelOutcome.NOT_FOUND:
        raise click.ClickException(f"no pending, scheduled or claimed job with id {job_id!r}")
    click.echo(outcome.value)


@main.group()
def kv() -> None:
    """The caller key-value namespace (keys and values as UTF-8 text)."""


def _kv_call(
    store: str, action: Callable[[Queue], Awaitable[T]], *, read_only: bool = False, checked: bool = False
) -> T:
    """Run ``action`` on the store; ``checked`` writes first run it as a :func:`dry_run`."""

    async def go() -> T:
        if checked:
            await dry_run(action)
        async with opened(store, read_only=read_only, background=False) as q:
            return await action(q)

    return run(go())


@kv.command("get")
@click.argument("key")
@store_option
def kv_get(key: str, store: str) -> None:
    """Print the value under KEY."""
    value = _kv_call(store, lambda q: q.kv_get(key.encode()), read_only=True)
    if value is None:
        raise click.ClickException(f"no value under key {key!r}")
    click.echo(value.decode("utf-8", errors="backslashreplace"))


@kv.command("put")
@click.argument("key")
@click.argument("value")
@store_option
def kv_put(key: str, value: str, store: str) -> None:
    """Store VALUE under KEY."""
    _kv_call(store, lambda q: q.kv_put(key.encode(), value.encode()), checked=True)


@kv.command("del")
@click.argument("key")
@store_option
def kv_del(key: str, store: str) -> None:
    """Delete KEY."""
    _kv_call(store, lambda q: q.kv_delete(key.encode()), checked=True)


@kv.command("scan")
@click.argument("prefix", default="")
@click.option("--limit", type=int, default=100, show_default=True)
@click.option("--cursor", default=None, help="Resume after this key.")
@json_option
@store_option
def kv_scan(prefix: str, limit: int, cursor: str | None, as_json: bool, store: str) -> None:
    """List keys under PREFIX in ascending order."""
    after = None if cursor is None else cursor.encode()
    page, next_key = _kv_call(store, lambda q: q.kv_scan(prefix.encode(), after, limit), read_only=True)
    rows = [[k.decode("utf-8", "backslashreplace"), v.decode("utf-8", "backslashreplace")] for k, v in page]
    if as_json:
        nxt = None if next_key is None else next_key.decode("utf-8", "backslashreplace")
        click.echo(json.dumps({"items": [dict(zip(("key", "value"), r)) for r in rows], "cursor": nxt}, indent=2))
        return
    _table(f"kv {prefix!r}", ["key", "value"], rows)
    if next_key is not None:
        click.echo(f"more: --cursor {next_key.decode('utf-8', 'backslashreplace')}", err=True)


if __name__ == "__main__":
    main()
