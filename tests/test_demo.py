"""The demo: its tree digest matches an independent computation, also after kill -9 and resume."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from taquba_backends import open_store
from taquba_backends.demo import Demo
from taquba_core import Queue

TAQUBA = [sys.executable, "-m", "taquba_backends.cli"]
KILL_TREE_FILES = 4000
"""Files in the trees of the interruption tests: enough that the demo still runs
when the test interrupts it, 0.3 to 1.5 s after it started (~2.5 s on 2 cores)."""


def make_tree(root: Path, files: int, seed: int) -> None:
    """Files in nested directories, plus entries the demo must skip."""
    rng = random.Random(seed)
    for i in range(files):
        sub = root / f"d{i % 7}" / f"e{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        lines = rng.randrange(0, 50)
        (sub / f"f{i}.txt").write_bytes(b"".join(b"line %d %d\n" % (i, j) for j in range(lines)) + b"tail")
    (root / "d0" / "empty").write_bytes(b"")
    for skipped in (".hidden", "__pycache__", "d1/site-packages"):
        (root / skipped).mkdir(parents=True, exist_ok=True)
        (root / skipped / "x.txt").write_text("skip me")
    os.symlink(root / "d0", root / "link-to-dir")
    os.symlink(root / "d0" / "empty", root / "link-to-file")


def expected(root: Path) -> dict[str, str]:
    """An independent walk: file count, bytes, lines and tree digest."""
    entries = []
    size = lines = 0
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        skipped_dir = any(p.startswith(".") or p in ("__pycache__", "site-packages") for p in rel.parts[:-1])
        if path.is_symlink() or not path.is_file() or skipped_dir or any(p.is_symlink() for p in path.parents):
            continue
        data = path.read_bytes()
        size += len(data)
        lines += data.count(b"\n")
        entries.append((rel.as_posix(), hashlib.sha256(data).hexdigest()))
    digest = hashlib.sha256("".join(f"{p}\t{h}\n" for p, h in sorted(entries)).encode()).hexdigest()
    return {"files": str(len(entries)), "bytes": str(size), "lines": str(lines), "tree-digest": digest}


def parse(output: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in output.splitlines() if ": " in line)


def run_demo(root: Path, store: str) -> dict[str, str]:
    done = subprocess.run([*TAQUBA, "demo", str(root), "--store", store], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return parse(done.stdout)


def test_demo_digest_matches_independent_walk(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    make_tree(root, 150, seed=1)
    result = run_demo(root, f"file://{tmp_path / 'store'}")
    want = expected(root)
    assert {k: result[k] for k in want} == want
    assert float(result["jobs/s"]) > 0

    again = run_demo(root, f"file://{tmp_path / 'store'}")  # a finished run starts afresh
    assert {k: again[k] for k in want} == want


async def _done_count(store: str, root: Path) -> int:
    queue = await Queue.open(await open_store(store), background=False)
    try:
        stats = await queue.stats(Demo(queue, root).queue_name)
        assert (stats.pending, stats.scheduled, stats.claimed, stats.dead) == (0, 0, 0, 0)
        return stats.done
    finally:
        await queue.close()


@pytest.mark.slow
def test_demo_resumes_after_kill_9(tmp_path: Path) -> None:
    seed = int(os.environ.get("TAQUBA_DEMO_SEED", random.randrange(1 << 30)))
    print(f"demo kill seed: {seed}")
    rng = random.Random(seed)
    root = tmp_path / "tree"
    make_tree(root, KILL_TREE_FILES, seed=seed)
    store = f"file://{tmp_path / 'store'}"
    proc = subprocess.Popen(
        [*TAQUBA, "demo", str(root), "--store", store, "--workers", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert "starting" in line, line
    time.sleep(rng.uniform(0.3, 1.5))
    assert proc.poll() is None, "the demo finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    result = run_demo(root, store)
    want = expected(root)
    assert {k: result[k] for k in want} == want
    # Every file was acknowledged exactly once: none enqueued twice, none redone after its ack.
    assert asyncio.run(_done_count(store, root)) == int(want["files"])


@pytest.mark.slow
def test_demo_ctrl_c_stores_in_flight_files_and_resumes(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    make_tree(root, KILL_TREE_FILES, seed=7)
    store = f"file://{tmp_path / 'store'}"
    proc = subprocess.Popen(
        [*TAQUBA, "demo", str(root), "--store", store, "--workers", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stderr is not None
    assert "starting" in proc.stderr.readline()
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "run the same command again to resume" in err and "Error" not in err
    assert "tree-digest" not in out

    result = run_demo(root, store)
    want = expected(root)
    assert {k: result[k] for k in want} == want
    assert asyncio.run(_done_count(store, root)) == int(want["files"])
