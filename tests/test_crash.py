"""Crash safety: SIGKILL a worker process mid-work, recover in-process, lose nothing.

Set ``TAQUBA_CRASH_SEED`` to replay a run; the seed is printed (shown on failure).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from pathlib import Path

import pytest
from crash_worker import MIXED_CONFIG, ack_payload, drain, mixed_handler
from queue_helpers import check_invariants, dump_store, space_keys

from taquba_backends import open_store
from taquba_core import Queue, QueueConfig, keys
from taquba_core.kv import decode_counter
from taquba_core.record import decode_record

N = 2000
QUEUE = "crash"
SCRIPT = Path(__file__).with_name("crash_worker.py")


def done_payloads(dump: dict[bytes, bytes]) -> set[bytes]:
    prefix = keys.user_key(b"done/")
    return {k[len(prefix):] for k in dump if k.startswith(prefix)}


def payloads_in(dump: dict[bytes, bytes], space: bytes) -> set[bytes]:
    return {decode_record(dump[k], k).payload for k in space_keys(dump, space)}


@pytest.mark.slow
async def test_sigkill_mid_work_loses_nothing(tmp_path: Path) -> None:
    seed = int(os.environ.get("TAQUBA_CRASH_SEED", random.randrange(2**32)))
    print(f"crash test seed: {seed} (TAQUBA_CRASH_SEED={seed} replays it)")
    kill_after = random.Random(seed).uniform(0.3, 2.0)
    url = f"file://{tmp_path / 'store'}"

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        url,
        str(N),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        if line.strip() != b"started":
            err = await proc.stderr.read()
            pytest.fail(f"worker did not start (seed {seed}): {line!r} {err.decode()[-2000:]}")
        await asyncio.sleep(kill_after)
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    rest = await proc.stdout.read()
    assert proc.returncode in (0, -signal.SIGKILL), (seed, proc.returncode, (await proc.stderr.read())[-2000:])
    print(f"killed after {kill_after:.2f}s, return code {proc.returncode}, output {rest!r}")

    queue = await Queue.open(await open_store(url), config=QueueConfig(max_attempts=5), reap_interval=0.5)
    async with queue:
        # Recovery ran inside open: no claim survives, and no job whose done
        # marker was committed is still around (ack and marker are one commit).
        dump = await check_invariants(queue.store)
        assert not space_keys(dump, keys.CLAIMED), seed
        done_before = done_payloads(dump)
        assert not done_before & payloads_in(dump, keys.PENDING), seed
        assert decode_counter(dump.get(keys.stats_key(QUEUE, "done"))) == len(done_before), seed
        assert await queue.kv_get(b"crash-test/enqueued") == b"1"
        recovered = [
            job for k in space_keys(dump, keys.PENDING) if (job := decode_record(dump[k], k)).attempts > 0
        ]
        assert all(j.last_error and "interrupted" in j.last_error for j in recovered), seed
        print(f"done by the killed process: {len(done_before)}, claims recovered at open: {len(recovered)}")

        await asyncio.wait_for(drain(queue, ack_payload, concurrency=64), 60)

        dump = await check_invariants(queue.store)
        assert done_payloads(dump) == {b"%05d" % i for i in range(N)}, seed
        for space in (keys.PENDING, keys.SCHEDULED, keys.CLAIMED, keys.DEAD):
            assert space_keys(dump, space) == [], (seed, space)
        counters = {m: decode_counter(dump.get(keys.stats_key(QUEUE, m))) for m in ("pending", "scheduled", "claimed", "dead")}
        spaces = {"pending": keys.PENDING, "scheduled": keys.SCHEDULED, "claimed": keys.CLAIMED, "dead": keys.DEAD}
        for metric, space in spaces.items():
            assert counters[metric] == len(space_keys(dump, space)), (seed, metric)
        done = decode_counter(dump.get(keys.stats_key(QUEUE, "done")))
        assert done >= N, seed
        assert done == N, (seed, done)  # each job acked exactly once: an ack needs the claim it removes
        for key in space_keys(dump, keys.JOBINDEX):
            assert dump[key] in dump, (seed, key)
        assert space_keys(dump, keys.JOBINDEX) == []  # acked jobs are not kept
        stats = await queue.stats(QUEUE)
        assert (stats.pending, stats.scheduled, stats.claimed, stats.done, stats.dead) == (0, 0, 0, N, 0)
    assert dump == await _reopened_dump(url)


async def _reopened_dump(url: str) -> dict[bytes, bytes]:
    """The store's contents as a fresh open sees them (everything above was durable)."""
    store = await open_store(url)
    try:
        return await dump_store(store)
    finally:
        await store.close()


# -- a producer and a worker, killed at a random point, many times --------------------
#
# The subprocess (crash_worker.py --mixed) enqueues while it works and prints
# the ids of every enqueue call that returned.  It is killed with SIGKILL
# after a seeded number of returned enqueues (plus a seeded delay).  This
# process then reopens the store (recovery), checks the invariants, drains
# the queue with the same handler, and requires that every job of a returned
# enqueue was acknowledged (its ``done/<id>`` marker, written with the ack),
# that nothing is left anywhere, and that every job was acknowledged exactly
# once; redeliveries caused by the crash are counted and printed.
#
# TAQUBA_CRASH_SEED=<seed> replays one run; TAQUBA_CRASH_RUNS sets how many
# runs ``make test`` makes (default 20).

from model import check_dump

MIXED_TOTAL = 300
_RUNS = int(os.environ.get("TAQUBA_CRASH_RUNS", "20"))
_SEEDS = (
    [int(os.environ["TAQUBA_CRASH_SEED"])]
    if os.environ.get("TAQUBA_CRASH_SEED")
    else [random.randrange(2**32) for _ in range(_RUNS)]
)


@pytest.mark.slow
@pytest.mark.parametrize("seed", _SEEDS, ids=[f"seed={s}" for s in _SEEDS])
async def test_producer_and_worker_killed_at_a_random_point(seed: int, tmp_path: Path) -> None:
    report = await crash_and_recover(f"file://{tmp_path / 'store'}", seed, MIXED_TOTAL)
    print(report)


@pytest.mark.slow
async def test_producer_and_worker_killed_on_s3(s3_url: str) -> None:
    seed = int(os.environ.get("TAQUBA_CRASH_SEED", random.randrange(2**32)))
    print(await crash_and_recover(f"{s3_url}?flush_interval_ms=10", seed, 120, s3=True))


def _kill_point(seed: int, total: int) -> tuple[int, float]:
    """How many returned enqueues to wait for, and how long after, before SIGKILL."""
    rng = random.Random(seed)
    if rng.random() < 0.15:  # after production, while the backlog drains
        return total, rng.uniform(0.0, 0.1)
    return rng.randrange(1, total), rng.uniform(0.0, 0.02)


async def crash_and_recover(url: str, seed: int, total: int, s3: bool = False) -> str:
    replay = f"(seed {seed}; TAQUBA_CRASH_SEED={seed} replays it)"
    print(f"crash run {replay}")
    after, delay = _kill_point(seed, total)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPT), "--mixed", url, str(seed), str(total),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    returned: set[str] = set()
    calls = 0
    try:
        while calls < after:
            line = await asyncio.wait_for(proc.stdout.readline(), 120 if s3 else 60)
            if not line:
                break  # finished before the kill point
            if line.startswith(b"enq ") and line.endswith(b"\n"):
                returned.update(x.decode() for x in line.split()[1:])
                calls += 1
        await asyncio.sleep(delay)
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    for line in (await proc.stdout.read()).split(b"\n"):
        if line.startswith(b"enq "):  # printed (whole lines, flushed) before the kill
            returned.update(x.decode() for x in line.split()[1:])
            calls += 1
    err = (await proc.stderr.read()).decode(errors="replace")
    assert proc.returncode in (0, -signal.SIGKILL), f"{replay} exit {proc.returncode}: {err[-2000:]}"

    queue = await Queue.open(await open_store(url), config=MIXED_CONFIG, promote_interval=0.02, reap_interval=0.2)
    async with queue:
        dump = await dump_store(queue.store)
        check_dump(dump)  # recovery ran inside open
        assert not space_keys(dump, keys.CLAIMED), replay
        acked_before = done_markers(dump)
        recovered = [
            job for k in space_keys(dump, keys.PENDING)
            if (job := decode_record(dump[k], k)).last_error and "interrupted" in job.last_error
        ]
        await asyncio.wait_for(drain(queue, mixed_handler), 120 if s3 else 60)
        dump = await dump_store(queue.store)
        stored = check_dump(dump)
        acked = done_markers(dump)
        missing = returned - set(acked)
        assert not missing, f"{replay}: {len(missing)} jobs of returned enqueues never acknowledged: {sorted(missing)[:5]}"
        assert not stored, f"{replay}: jobs left in the store: {sorted(stored)[:5]}"
        done = decode_counter(dump.get(keys.stats_key(QUEUE, "done")))
        assert done == len(acked), f"{replay}: {done} acknowledgements for {len(acked)} jobs"
        assert acked_before.keys() <= acked.keys() and all(acked[k] == v for k, v in acked_before.items())
        # Every delivery beyond the first is explained: a first attempt failed
        # on purpose, or a claim was interrupted by the kill (at most once each).
        redeliveries = sum(attempts - 1 for attempts, _ in acked.values())
        failing = sum(1 for _, payload in acked.values() if payload.startswith(b"fail-"))
        for job_id, (attempts, payload) in acked.items():
            assert attempts >= (2 if payload.startswith(b"fail-") else 1), (replay, job_id, attempts, payload)
        assert len(recovered) <= redeliveries <= len(recovered) + failing, (replay, redeliveries, len(recovered), failing)
        stats = await queue.stats(QUEUE)
        assert (stats.pending, stats.scheduled, stats.claimed, stats.done, stats.dead) == (0, 0, 0, done, 0), replay
    return (
        f"crash run seed {seed}: killed after {calls} returned enqueue calls (+{delay * 1000:.0f} ms), "
        f"exit {proc.returncode}; jobs of returned calls {len(returned)}, acked in all {len(acked)} "
        f"({len(acked_before)} before the kill, {len(set(acked) - returned)} from calls that never returned); "
        f"redeliveries {redeliveries}: {len(recovered)} claims interrupted by the kill, "
        f"up to {failing} first attempts failed on purpose"
    )


def done_markers(dump: dict[bytes, bytes]) -> dict[str, tuple[int, bytes]]:
    """``done/<id>`` markers written with each ack: job id -> (attempts at the ack, payload)."""
    prefix = keys.user_key(b"done/")
    out = {}
    for key, value in dump.items():
        if key.startswith(prefix):
            attempts, payload = value.split(b" ", 1)
            out[key[len(prefix):].decode()] = (int(attempts), payload)
    return out
