"""The demo job: fingerprint every file of a directory tree through the queue.

One job per regular file (symbolic links are not followed; directories named
``__pycache__`` or ``site-packages`` or starting with ``.`` are skipped).
Workers compute each file's SHA-256, size in bytes and line count (``\\n``
bytes) and store the result in the caller KV namespace in the same commit as
the acknowledgement, so a crash loses nothing.  A later run resumes: files
already done are not redone and queued ones are not enqueued twice.

Caller keys used, for a tree tagged ``T`` (a hash of its absolute path) and
run number ``N``::

    demo/T/run             msgpack {"run": N, "complete": bool}
    demo/T/N/queued/PATH   b"" once PATH was enqueued (same commit as the job)
    demo/T/N/result/PATH   msgpack [sha256 hex, size, lines]
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgpack

from taquba_core import AckWith, JobRecord, PermanentFailure, Queue, run_worker_concurrent

SKIP_DIRS = frozenset({"__pycache__", "site-packages"})
ENQUEUE_CHUNK = 500


def default_root() -> Path:
    """The running Python's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_files(root: Path) -> list[str]:
    """Relative, '/'-separated paths of the regular files under ``root``, sorted."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")]
        base = Path(dirpath)
        for name in filenames:
            path = base / name
            if path.is_file() and not path.is_symlink():
                out.append(path.relative_to(root).as_posix())
    out.sort()
    return out


def fingerprint(path: Path) -> tuple[str, int, int]:
    """(SHA-256 hex, size in bytes, number of ``\\n`` bytes) of a file."""
    digest = hashlib.sha256()
    size = lines = 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
            lines += chunk.count(b"\n")
    return digest.hexdigest(), size, lines


def tree_digest(results: dict[str, str]) -> str:
    """SHA-256 over ``{path}\\t{sha256}\\n`` lines in ascending path order."""
    digest = hashlib.sha256()
    for path in sorted(results):
        digest.update(f"{path}\t{results[path]}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class DemoSummary:
    """What a finished demo run measured over every file of the run."""

    files: int
    bytes: int
    lines: int
    jobs_per_second: float
    tree_digest: str
    dead: int

    def lines_out(self) -> list[str]:
        return [
            f"files: {self.files}",
            f"bytes: {self.bytes}",
            f"lines: {self.lines}",
            f"jobs/s: {self.jobs_per_second:.1f}",
            f"tree-digest: {self.tree_digest}",
        ]


class Demo:
    """One demo run over ``root`` on an open ``queue``."""

    def __init__(self, queue: Queue, root: Path) -> None:
        self.queue = queue
        self.root = root.resolve()
        self.tag = hashlib.sha256(str(self.root).encode()).hexdigest()[:16]
        self.queue_name = f"demo-{self.tag}"
        self.run = 0

    def _key(self, *parts: str) -> bytes:
        return "/".join(("demo", self.tag, *parts)).encode()

    def _run_key(self, kind: str, path: str = "") -> bytes:
        return self._key(str(self.run), kind, path)

    async def scan(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        """Every caller (key, value) under ``prefix``."""
        rows: list[tuple[bytes, bytes]] = []
        cursor = None
        while True:
            page, cursor = await self.queue.kv_scan(prefix, cursor, 1000)
            rows.extend(page)
            if cursor is None:
                return rows

    async def start_run(self) -> bool:
        """Resume the unfinished run, or start the next one; True when resuming."""
        raw = await self.queue.kv_get(self._key("run"))
        state = msgpack.unpackb(raw) if raw else {"run": 0, "complete": True}
        self.run = state["run"]
        if not state["complete"]:
            return True
        old = self.run
        self.run += 1
        stale = [k for k, _ in await self.scan(self._key(str(old), ""))] if old else []
        writes: dict[bytes, bytes | None] = dict.fromkeys(stale)
        writes[self._key("run")] = msgpack.packb({"run": self.run, "complete": False})
        await self.queue.kv_write(writes)
        return False

    async def enqueue_missing(self, files: list[str]) -> int:
        """Enqueue every file not yet queued in this run; returns how many were."""
        prefix = self._run_key("queued")
        queued = {k[len(prefix):].decode() for k, _ in await self.scan(prefix)}
        todo = [f for f in files if f not in queued]
        for start in range(0, len(todo), ENQUEUE_CHUNK):
            chunk = todo[start:start + ENQUEUE_CHUNK]
            payloads = [msgpack.packb([self.run, path]) for path in chunk]
            marks = {self._run_key("queued", path): b"" for path in chunk}
            await self.queue.enqueue_batch(self.queue_name, payloads, kv_writes=marks)
        return len(todo)

    def handle(self, job: JobRecord) -> AckWith:
        """Fingerprint the job's file; the result commits with the ack."""
        run, path = msgpack.unpackb(job.payload)
        if run != self.run:
            return AckWith({})  # left over from an abandoned run
        try:
            result = fingerprint(self.root / path)
        except FileNotFoundError as exc:
            raise PermanentFailure(f"{path} vanished") from exc
        return AckWith({self._run_key("result", path): msgpack.packb(list(result))})

    async def remaining(self) -> int:
        stats = await self.queue.stats(self.queue_name)
        return stats.pending + stats.scheduled + stats.claimed

    async def work(
        self, workers: int, progress: Callable[[int], None], stop: asyncio.Event
    ) -> tuple[int, bool]:
        """Run ``workers`` handlers until nothing is left or ``stop`` is set.

        Returns the jobs settled here and whether the run finished.
        """
        shutdown = asyncio.Event()
        task = asyncio.create_task(
            run_worker_concurrent(
                self.queue, self.queue_name, self.handle, concurrency=workers, poll_interval=0.2, shutdown=shutdown
            )
        )
        finished = False
        try:
            while not task.done() and not stop.is_set():
                left = await self.remaining()
                progress(left)
                if left == 0:
                    finished = True
                    break
                await asyncio.wait({task}, timeout=0.1)
        finally:
            shutdown.set()
            stats = await task
        progress(await self.remaining())
        return stats.processed, finished

    async def summary(self, jobs: int, seconds: float) -> DemoSummary:
        """Totals over every result of this run, and mark the run complete."""
        prefix = self._run_key("result")
        digests: dict[str, str] = {}
        size = lines = 0
        for key, value in await self.scan(prefix):
            sha, nbytes, nlines = msgpack.unpackb(value)
            digests[key[len(prefix):].decode()] = sha
            size += nbytes
            lines += nlines
        dead = (await self.queue.stats(self.queue_name)).dead
        await self.queue.kv_put(self._key("run"), msgpack.packb({"run": self.run, "complete": True}))
        rate = jobs / seconds if seconds > 0 else 0.0
        return DemoSummary(len(digests), size, lines, rate, tree_digest(digests), dead)


async def run_demo(
    queue: Queue,
    root: Path,
    workers: int,
    on_start: Callable[[int, int, bool], Callable[[int], None]],
    stop: asyncio.Event | None = None,
) -> DemoSummary | None:
    """Run (or resume) the demo over ``root``; ``None`` when ``stop`` interrupted it.

    ``on_start(total_files, already_done, resumed)`` returns the progress
    callback, called with the number of jobs left.  Once ``stop`` is set no
    new file is started; files in flight finish and are stored, and the next
    run resumes.
    """
    demo = Demo(queue, root)
    resumed = await demo.start_run()
    files = list_files(demo.root)
    await demo.enqueue_missing(files)
    done_before = len(await demo.scan(demo._run_key("result")))
    progress = on_start(len(files), done_before, resumed)
    started = time.perf_counter()
    jobs, finished = await demo.work(workers, progress, stop or asyncio.Event())
    if not finished:
        return None
    return await demo.summary(jobs, time.perf_counter() - started)
