"""Key-ordering benchmarks 2-5: sweeps and claims whose cost must not grow with the store.

All run on SlateDB in a local directory (``file://``, the WAL flushed every
5 ms), with a :class:`~taquba_core.ManualClock`, no background tasks, and the
memtable flushed to SSTs after the bulk load (so the bulk, and the band of
deleted keys, sits in the store's sorted runs as it would after a while).
Each size gets its own store; measurements alternate between the sizes
(round robin) so that a noisy neighbour hits all of them alike, and the
median of the repetitions is compared.

2. Promotion: 100 due scheduled jobs while N other scheduled jobs lie in the
   future: time of ``promote_now()`` (moves the 100).
3. Reaping: 100 expired claims while N live claims lie in the future: time
   of ``reap_now()`` (moves the 100, then runs the retention sweeps).
4. Claim on a shallow queue (one pending job at a time) after M jobs were
   claimed and acknowledged on it: claim latency p50/p99 (a claim returns
   once committed, without waiting for its WAL write).  Also measured with the claim
   cursor and its known keys switched off, to show what they save.
5. Dead-letter paging: a page of 100 (``dead_jobs``) at the start of the set
   vs. after D dead jobs (the ``after`` cursor seeks).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import slatedb.uniffi as sdb

from taquba_backends import open_store
from taquba_core import ManualClock, Queue, QueueConfig, keys

from .common import Table, Target, median, percentile, spread, temp_dir

START_MS = 1_760_000_000_000
PAYLOAD = b"x" * 64
BATCH = 1000
DUE = 100  # jobs promoted / reaped per measurement
CONFIG = QueueConfig(max_attempts=1_000_000, lease=60)


async def open_queue(path: Path, clock: ManualClock, config: QueueConfig = CONFIG) -> Queue:
    return await Queue.open(await open_store(path.as_uri()), config=config, clock=clock, background=False)


async def flush_memtable(queue: Queue) -> None:
    """Write the memtable to an SST (benchmark-only use of the adapter's database handle)."""
    db = getattr(queue.store, "_db", None)
    if db is not None:
        await queue.store.sync()  # every commit written to SlateDB first
        await db.flush_with_options(sdb.FlushOptions(flush_type=sdb.FlushType.MEM_TABLE))


async def loaded_queues(
    root: Path, name: str, sizes: list[int], clock: ManualClock, load: Callable[[Queue, int], Awaitable[None]]
) -> dict[int, Queue]:
    """One queue per size, each on its own store, filled by ``load(queue, k)`` in batches of ``BATCH``
    up to that size, its memtable then flushed to an SST."""
    queues = {}
    for n in sizes:
        q = queues[n] = await open_queue(root / f"{name}-{n}", clock)
        for start in range(0, n, BATCH):
            await load(q, min(BATCH, n - start))
        await flush_memtable(q)
    return queues


async def timed(call: Callable[[], Awaitable[object]]) -> tuple[float, object]:
    start = time.perf_counter()
    result = await call()
    return (time.perf_counter() - start) * 1000, result


async def flatness(
    queues: dict[int, Queue],
    clock: ManualClock,
    reps: int,
    make_due: Callable[[Queue], Awaitable[None]],
    sweep: Callable[[Queue], Awaitable[int]],
) -> dict[int, list[float]]:
    """Per size, the times (ms) of ``sweep`` moving the ``DUE`` jobs ``make_due`` made due.

    Sizes are measured round robin, each repetition starting at the next one,
    so a noisy neighbour hits all of them alike.  The queues are closed after.
    """
    sizes = list(queues)
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for rep in range(reps):
        for n in sizes:
            await make_due(queues[n])
        clock.advance(2_000)
        for n in sizes[rep % len(sizes):] + sizes[: rep % len(sizes)]:
            ms, moved = await timed(lambda: sweep(queues[n]))
            assert moved == DUE, (n, moved)
            times[n].append(ms)
            # The sweep's commits reach SlateDB up to a flush interval later:
            # written here, they cannot land inside the next size's timing.
            await queues[n].store.sync()
    for q in queues.values():
        await q.close()
    return times


def flatness_result(
    title: str, column: str, target: str, times: dict[int, list[float]], note: str = ""
) -> tuple[Table, Target]:
    """The table of a flatness measurement and its max/min target (≤ 1.5)."""
    sizes = list(times)
    table = Table(title, [column, "median ms", "min ms", "max ms"])
    for n in sizes:
        table.add(n, median(times[n]), min(times[n]), max(times[n]))
    ratio = spread([median(times[n]) for n in sizes])
    table.notes.append(f"max/min of the medians over N: {ratio:.2f}{note}")
    return table, Target.at_most(f"{target} flat in N ({', '.join(f'{n:,}' for n in sizes)}): max/min", ratio, 1.5)


# -- 2. promotion ------------------------------------------------------------------------


async def promotion(root: Path, sizes: list[int], reps: int) -> tuple[Table, Target]:
    clock = ManualClock(START_MS)

    async def future_jobs(q: Queue, size: int) -> None:
        await q.enqueue_batch("q", [PAYLOAD] * size, delay=86_400)

    queues = await loaded_queues(root, "promote", sizes, clock, future_jobs)

    async def make_due(q: Queue) -> None:
        await q.enqueue_batch("q", [PAYLOAD] * DUE, delay=1)

    times = await flatness(queues, clock, reps, make_due, lambda q: q.promote_now())
    return flatness_result(
        f"2. Promotion: time to promote {DUE} due jobs with N future scheduled jobs (file://, {reps} reps)",
        "N future",
        "2. promotion",
        times,
    )


# -- 3. reaping --------------------------------------------------------------------------


async def reaping(root: Path, sizes: list[int], reps: int) -> tuple[Table, Target]:
    clock = ManualClock(START_MS)

    async def live_claims(q: Queue, size: int) -> None:
        await q.enqueue_batch("q", [PAYLOAD] * size)
        assert len(await q.claim_batch("q", size, lease=86_400)) == size

    queues = await loaded_queues(root, "reap", sizes, clock, live_claims)

    async def make_due(q: Queue) -> None:
        await q.enqueue_batch("q", [PAYLOAD] * DUE)
        assert len(await q.claim_batch("q", DUE, lease=1)) == DUE
        # Claims return before SlateDB has them; without this, writing them
        # out (after up to the flush interval) could land inside the timed sweep.
        await q.store.sync()

    times = await flatness(queues, clock, reps, make_due, lambda q: q.reap_now())
    return flatness_result(
        f"3. Reaping: time to re-queue {DUE} expired claims with N live claims (file://, {reps} reps)",
        "N live",
        "3. reaping",
        times,
        "; reap_now includes the retention sweeps of each tick",
    )


# -- 4. claims behind a band of deleted keys ----------------------------------------------


def _without_cursor(queue: Queue) -> None:
    """Make every claim of ``queue`` scan from the start of its pending keys: no cursor, no known keys."""
    cursors = queue._cursors
    after = cursors.after

    def from_start(prefix: bytes) -> bytes | None:
        return None if prefix.startswith(keys.PENDING) else after(prefix)

    cursors.after = from_start  # type: ignore[method-assign]
    cursors.candidates = lambda prefix: None  # type: ignore[method-assign]
    cursors.known_empty = lambda prefix: False  # type: ignore[method-assign]


async def shallow_claims(root: Path, sizes: list[int], rounds: int, compare: bool) -> tuple[Table, Target]:
    clock = ManualClock(START_MS)

    async def acked_jobs(q: Queue, size: int) -> None:
        await q.enqueue_batch("q", [PAYLOAD] * size)
        jobs = await q.claim_batch("q", size)
        await asyncio.gather(*(q.ack(j) for j in jobs))

    queues = await loaded_queues(root, "claim", sizes, clock, acked_jobs)
    variants = [("cursor", False)] + ([("no cursor", True)] if compare else [])
    results: dict[tuple[str, int], list[float]] = {}
    for variant, off in variants:
        if off:
            for q in queues.values():
                _without_cursor(q)
        lat: dict[int, list[float]] = {m: [] for m in sizes}
        for i in range(rounds if not off else max(rounds // 3, 30)):
            order = sizes[i % len(sizes):] + sizes[: i % len(sizes)]
            for m in order:
                q = queues[m]
                await q.enqueue("q", PAYLOAD)
                ms, job = await timed(lambda q=q: q.claim("q"))
                assert job is not None
                lat[m].append(ms)
                await q.ack(job)  # type: ignore[arg-type]
        for m in sizes:
            results[(variant, m)] = lat[m]
    for q in queues.values():
        await q.close()
    table = Table(
        f"4. Claim on a shallow queue after M claimed+acked jobs (file://, {rounds} claims per M)",
        ["M deleted", "claim p50 ms", "claim p99 ms"] + (["no cursor p50 ms", "no cursor p99 ms"] if compare else []),
    )
    for m in sizes:
        row = [m, percentile(results[("cursor", m)], 50), percentile(results[("cursor", m)], 99)]
        if compare:
            row += [percentile(results[("no cursor", m)], 50), percentile(results[("no cursor", m)], 99)]
        table.add(*row)
    ratio = spread([percentile(results[("cursor", m)], 99) for m in sizes])
    table.notes.append(f"p99 max/min over M: {ratio:.2f}; a claim returns once committed (it does not wait for its WAL write)")
    if compare:
        table.notes.append(
            "'no cursor': the same claims scanning from the start of pending:{queue}:, "
            "without the cursor or its known keys (what they save)"
        )
    return table, Target.at_most(f"4. shallow claim p99 flat in M ({', '.join(f'{m:,}' for m in sizes)}): max/min", ratio, 1.5)


# -- 5. dead-letter paging ---------------------------------------------------------------


async def dead_paging(root: Path, depth: int, reps: int) -> tuple[Table, Target]:
    clock = ManualClock(START_MS)
    q = await open_queue(root / "dead", clock)
    ids: list[str] = []
    total = depth + 200
    for start in range(0, total, BATCH):
        size = min(BATCH, total - start)
        ids += await q.enqueue_batch("q", [PAYLOAD] * size, max_attempts=1)
        assert len(await q.claim_batch("q", size, lease=0.001)) == size
    clock.advance(1_000)
    reap_ms, _ = await timed(q.reap_now)  # every claim expired at its last attempt: all dead
    stats = await q.stats("q")
    assert stats.dead == total, stats
    await flush_memtable(q)
    after_deep = ids[depth - 1]  # dead keys are ordered by id, and ids by enqueue order
    start_ms: list[float] = []
    deep_ms: list[float] = []
    for after in (None, after_deep, None, after_deep):  # warm the block cache for both pages
        await q.dead_jobs("q", after=after, limit=100)
    for rep in range(reps):
        pair = [(start_ms, None), (deep_ms, after_deep)]
        if rep % 2:
            pair.reverse()
        for sink, after in pair:
            ms, page = await timed(lambda after=after: q.dead_jobs("q", after=after, limit=100))
            assert len(page) == 100  # type: ignore[arg-type]
            sink.append(ms)
    first = (await q.dead_jobs("q", after=after_deep, limit=1))[0]
    assert first.id == ids[depth]
    await q.close()
    table = Table(f"5. Dead-letter paging: a page of 100 (file://, {total:,} dead jobs, {reps} reps)",
                  ["page", "median ms", "min ms", "max ms"])
    table.add("at the start", median(start_ms), min(start_ms), max(start_ms))
    table.add(f"after {depth:,}", median(deep_ms), min(deep_ms), max(deep_ms))
    ratio = spread([median(start_ms), median(deep_ms)])
    table.notes.append(f"max/min of the medians: {ratio:.2f}")
    table.notes.append(
        f"building the set: one reap_now() dead-lettered {total:,} expired claims in {reap_ms / 1000:.1f} s "
        f"({reap_ms * 1000 / total:.0f} µs each, batches of 256 each starting at the reaping cursor)"
    )
    return table, Target.at_most(f"5. dead-letter page after {depth:,} vs start: max/min", ratio, 1.5)


# -- entry point ------------------------------------------------------------------------


async def _run_all(profile: dict) -> tuple[list[Table], list[Target]]:
    tables, targets = [], []
    with temp_dir("taquba-bench-scans-") as root:
        for coro in (
            promotion(root, profile["promote_sizes"], profile["reps"]),
            reaping(root, profile["promote_sizes"], profile["reps"]),
            shallow_claims(root, profile["claim_sizes"], profile["claim_rounds"], profile["compare_cursor"]),
            dead_paging(root, profile["dead_depth"], profile["reps"] * 3),
        ):
            table, target = await coro
            table.print()
            tables.append(table)
            targets.append(target)
    return tables, targets


def run(profile: dict) -> tuple[list[Table], list[Target]]:
    return asyncio.run(_run_all(profile))
