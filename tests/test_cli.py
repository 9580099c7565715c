"""The ``taquba`` command line, run in-process with click's CliRunner on a file:// store."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from taquba_backends import open_store
from taquba_backends.cli import main
from taquba_core import Queue, QueueConfig

UNKNOWN_ID = "01ARZ3NDEKTSV4RRFFQ69G5FAV"


@pytest.fixture
def store(tmp_path: Path) -> str:
    return f"file://{tmp_path}/store"


def cli(store: str, *args: str, ok: bool = True) -> Result:
    result = CliRunner().invoke(main, [*args, "--store", store], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, (args, result.output)
    return result


def cli_json(store: str, *args: str) -> Any:
    return json.loads(cli(store, *args, "--json").stdout)


def fails_with_one_line(store: str, *args: str, match: str) -> str:
    result = cli(store, *args, ok=False)
    assert result.exit_code != 0, (args, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("Error: ") and match in lines[0], lines[0]
    assert result.stdout == ""
    return lines[0]


def in_store(store: str, action: Callable[[Queue], Awaitable[Any]], **options: Any) -> Any:
    """Run ``action`` on a queue opened on ``store`` (outside the CLI), then close it."""

    async def go() -> Any:
        queue = await Queue.open(await open_store(store), background=False, **options)
        try:
            return await action(queue)
        finally:
            await queue.close()

    return asyncio.run(go())


def test_enqueue_get_and_jobs(store: str) -> None:
    first = cli(store, "enqueue", "emails", "hello", "--header", "tenant=acme").stdout.strip()
    second = cli(store, "enqueue", "emails", "urgent", "--priority", "1").stdout.strip()
    later = cli(store, "enqueue", "emails", "later", "--delay", "600").stdout.strip()
    assert len({first, second, later}) == 3

    job = cli_json(store, "get", first)
    assert (job["id"], job["queue"], job["payload"], job["status"]) == (first, "emails", "hello", "Pending")
    assert job["headers"] == {"tenant": "acme"}
    table = cli(store, "get", first).stdout
    assert first in table and "tenant" in table and "hello" in table
    enqueued = datetime.fromtimestamp(job["enqueued_at"] / 1000, timezone.utc)
    assert enqueued.strftime("%Y-%m-%dT%H:%M:%S") in table  # a time, not milliseconds

    page = cli_json(store, "jobs", "emails")
    assert [j["id"] for j in page["jobs"]] == [second, first] and page["cursor"] is None
    table = cli(store, "jobs", "emails").stdout
    assert second in table and first in table and table.index(second) < table.index(first)

    one = cli_json(store, "jobs", "emails", "--limit", "1")
    assert [j["id"] for j in one["jobs"]] == [second] and one["cursor"]
    rest = cli_json(store, "jobs", "emails", "--limit", "1", "--cursor", one["cursor"])
    assert [j["id"] for j in rest["jobs"]] == [first]
    paged = cli(store, "jobs", "emails", "--limit", "1")
    assert f"--cursor {one['cursor']}" in paged.stderr

    scheduled = cli_json(store, "jobs", "emails", "--status", "scheduled")
    assert [(j["id"], j["status"]) for j in scheduled["jobs"]] == [(later, "Scheduled")]
    run_at = datetime.fromtimestamp(scheduled["jobs"][0]["run_at"] / 1000, timezone.utc)
    assert 590 < (run_at - datetime.now(timezone.utc)).total_seconds() <= 600
    table = cli(store, "jobs", "emails", "--status", "SCHEDULED").stdout  # any case
    assert "run_at" in table and run_at.strftime("%Y-%m-%dT%H:%M:%S") in table  # when it may run
    assert cli_json(store, "jobs", "emails", "--status", "dead") == {"jobs": [], "cursor": None}


def test_binary_payload_is_shown_as_base64(store: str) -> None:
    job_id = in_store(store, lambda q: q.enqueue("bin", b"\xff\x00"))
    assert cli_json(store, "get", job_id)["payload_base64"] == "/wA="
    assert "base64:/wA=" in cli(store, "jobs", "bin").stdout


def test_stats(store: str) -> None:
    fails_with_one_line(store, "stats", match="no store at")  # reading never creates a store
    cli(store, "enqueue", "a", "1")
    cli(store, "enqueue", "b", "2", "--delay", "60")
    rows = cli_json(store, "stats")
    assert [(r["queue"], r["pending"], r["scheduled"]) for r in rows] == [("a", 1, 0), ("b", 0, 1)]
    assert cli_json(store, "stats", "b") == [{"queue": "b", "pending": 0, "scheduled": 1, "claimed": 0, "done": 0, "dead": 0}]
    table = cli(store, "stats").stdout
    assert "a" in table and "b" in table and "pending" in table


@pytest.mark.parametrize("command", ["stats", "jobs", "dead"])
def test_unknown_queue_exits_non_zero_with_one_line(store: str, command: str) -> None:
    cli(store, "enqueue", "real", "x")
    fails_with_one_line(store, command, "nosuch", match="no queue named 'nosuch'")
    fails_with_one_line(store, command, "bad:name", match="InvalidQueueName")


@pytest.mark.parametrize("command", [["get"], ["requeue"], ["cancel"]])
def test_unknown_job_id_exits_non_zero_with_one_line(store: str, command: list[str]) -> None:
    cli(store, "enqueue", "q", "x")
    fails_with_one_line(store, *command, UNKNOWN_ID, match=UNKNOWN_ID)


def test_dead_and_requeue(store: str) -> None:
    async def make_dead(q: Queue) -> list[str]:
        ids = []
        for i in range(3):
            res = await q.enqueue_with("work", b"job %d" % i, max_attempts=1)
            await q.nack(await q.claim("work"), f"boom {i}")
            ids.append(res.id)
        return ids

    ids = in_store(store, make_dead)
    page = cli_json(store, "dead", "work")
    assert [j["id"] for j in page["jobs"]] == ids and page["cursor"] is None
    assert [j["last_error"] for j in page["jobs"]] == ["boom 0", "boom 1", "boom 2"]
    first = cli_json(store, "dead", "work", "--limit", "2")
    assert [j["id"] for j in first["jobs"]] == ids[:2] and first["cursor"] == ids[1]
    assert [j["id"] for j in cli_json(store, "dead", "work", "--after", ids[1])["jobs"]] == ids[2:]
    table = cli(store, "dead", "work", "--limit", "2")
    assert ids[0] in table.stdout and "boom 0" in table.stdout and f"--after {ids[1]}" in table.stderr

    out = cli(store, "requeue", ids[1]).stdout
    assert out.strip() == f"requeued {ids[1]} on work"
    job = cli_json(store, "get", ids[1])
    assert (job["status"], job["attempts"], job["last_error"]) == ("Pending", 0, None)
    fails_with_one_line(store, "requeue", ids[1], match="is Pending, not dead")
    stats = cli_json(store, "stats", "work")[0]
    assert (stats["pending"], stats["dead"]) == (1, 2)


def test_cancel(store: str) -> None:
    job_id = cli(store, "enqueue", "q", "x", "--dedup-key", "k").stdout.strip()
    assert cli(store, "enqueue", "q", "y", "--dedup-key", "k").stdout.strip() == job_id
    assert cli(store, "cancel", job_id).stdout.strip() == "removed"
    fails_with_one_line(store, "get", job_id, match=job_id)
    fails_with_one_line(store, "cancel", job_id, match=job_id)
    assert cli(store, "enqueue", "q", "z", "--dedup-key", "k").stdout.strip() != job_id


def test_done_jobs_listing(store: str) -> None:
    async def ack_two(q: Queue) -> list[str]:
        ids = [await q.enqueue("q", b"a"), await q.enqueue("q", b"b")]
        for job in await q.claim_batch("q", 2):
            await q.ack(job)
        return ids

    ids = in_store(store, ack_two, config=QueueConfig(keep_done_jobs=3600))
    page = cli_json(store, "jobs", "q", "--status", "done")
    assert [j["id"] for j in page["jobs"]] == ids
    assert all(j["status"] == "Done" and j["completed_at"] for j in page["jobs"])
    fails_with_one_line(store, "cancel", ids[0], match=ids[0])


def test_kv_commands(store: str) -> None:
    cli(store, "kv", "put", "user/1", "alice")
    cli(store, "kv", "put", "user/2", "bob")
    cli(store, "kv", "put", "other", "x")
    assert cli(store, "kv", "get", "user/1").stdout == "alice\n"
    page = cli_json(store, "kv", "scan", "user/")
    assert page == {"items": [{"key": "user/1", "value": "alice"}, {"key": "user/2", "value": "bob"}], "cursor": None}
    first = cli_json(store, "kv", "scan", "user/", "--limit", "1")
    assert first["items"] == [{"key": "user/1", "value": "alice"}] and first["cursor"] == "user/1"
    rest = cli_json(store, "kv", "scan", "user/", "--limit", "1", "--cursor", first["cursor"])
    assert rest["items"] == [{"key": "user/2", "value": "bob"}]
    table = cli(store, "kv", "scan")
    assert "alice" in table.stdout and "other" in table.stdout
    cli(store, "kv", "del", "user/1")
    fails_with_one_line(store, "kv", "get", "user/1", match="user/1")
    assert [i["key"] for i in cli_json(store, "kv", "scan")["items"]] == ["other", "user/2"]
    # the caller namespace never shows queue keys
    cli(store, "enqueue", "q", "x")
    assert [i["key"] for i in cli_json(store, "kv", "scan")["items"]] == ["other", "user/2"]


def test_bad_arguments_exit_with_one_line(store: str) -> None:
    cli(store, "enqueue", "q", "x")
    fails_with_one_line(store, "jobs", "q", "--limit", "0", match="limit")
    fails_with_one_line(store, "jobs", "q", "--cursor", "zz", match="cursor")
    fails_with_one_line(store, "enqueue", "q", "x", "--priority", "-1", match="priority")


async def test_writing_commands_with_bad_input_do_not_fence_a_running_writer(tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'live'}"
    writer = await Queue.open(await open_store(url), background=False)
    try:
        job = await writer.enqueue("live", b"one")
        await writer.store.sync()
        mistakes = [
            ["enqueue", "live", "x", "--delay", "-1"],
            ["enqueue", "a:b", "x"],
            ["requeue", job],  # pending, not dead
            ["requeue", "NOSUCHID"],
            ["cancel", "NOSUCHID"],
            ["worker", "live", "json:dumps", "--concurrency", "0"],
            ["worker", "a:b", "json:dumps"],
            ["worker", "live", "builtins:repr", "--keep-done", "-1"],
        ]
        for args in mistakes:
            result = await asyncio.to_thread(CliRunner().invoke, main, [*args, "--store", url])
            assert result.exit_code != 0, (args, result.output)
            assert "Error" in result.stderr, (args, result.stderr)
        await writer.enqueue("live", b"two")  # still the writer: no StoreFenced
        assert (await writer.stats("live")).pending == 2
    finally:
        await writer.close()


def test_the_worker_command_acks_keeps_done_jobs_when_asked_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'store'}"
    job_id = cli(url, "enqueue", "work", "payload").stdout.strip()
    command = [sys.executable, "-m", "taquba_backends.cli", "worker", "work", "builtins:repr", "--keep-done", "60"]
    proc = subprocess.Popen([*command, "--store", url], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while cli_json(url, "get", job_id)["status"] != "Done" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cli_json(url, "get", job_id)["status"] == "Done"  # kept, with --keep-done
        assert [j["id"] for j in cli_json(url, "jobs", "work", "--status", "done")["jobs"]] == [job_id]
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert "stopped: 1 acked" in stderr


@pytest.mark.parametrize("url", ["fil:///tmp/x", "file:/tmp/x"])
def test_a_mistyped_store_url_is_named_as_such(url: str) -> None:
    result = CliRunner().invoke(main, ["stats", "--store", url])
    assert result.exit_code == 1
    assert "InvalidStoreUrl" in result.stderr and "keeps nothing" not in result.stderr


async def test_read_commands_do_not_fence_a_running_writer(tmp_path) -> None:
    url = f"file://{tmp_path / 'live'}"
    writer = await Queue.open(await open_store(url), background=False)
    try:
        await writer.enqueue("live", b"one")
        job = await writer.enqueue("live", b"two")
        claimed = await writer.claim("live")
        assert claimed is not None
        await writer.store.sync()  # a claim returns before its WAL write; readers see durable state

        def read(*args: str) -> Any:
            result = CliRunner().invoke(main, [*args, "--json", "--store", url], catch_exceptions=False)
            assert result.exit_code == 0, result.output
            return json.loads(result.stdout)

        stats = await asyncio.to_thread(read, "stats", "live")
        assert (stats[0]["pending"], stats[0]["claimed"]) == (1, 1)
        listed = await asyncio.to_thread(read, "jobs", "live", "--status", "claimed")
        assert [j["id"] for j in listed["jobs"]] == [claimed.id]
        assert (await asyncio.to_thread(read, "get", job))["status"] == "Pending"

        await writer.ack(claimed)  # still the writer: no StoreFenced
        assert (await writer.stats("live")).done == 1
    finally:
        await writer.close()


@pytest.mark.parametrize("url", ["memory://", "inmemory://"])
def test_commands_refuse_a_store_that_vanishes_on_exit(url: str) -> None:
    result = CliRunner().invoke(main, ["enqueue", "q", "x", "--store", url])
    assert result.exit_code == 1
    assert "keeps nothing after this command exits" in result.stderr


def test_dedup_hit_says_nothing_was_enqueued(store: str) -> None:
    first = cli(store, "enqueue", "q", "x", "--dedup-key", "k").stdout.strip()
    again = cli(store, "enqueue", "q", "y", "--dedup-key", "k")
    assert again.stdout.strip() == first
    assert "already enqueued" in again.stderr
