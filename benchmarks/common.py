"""Shared helpers: timing statistics, tables, the machine description, child processes."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
README = ROOT / "README.md"


# -- statistics ------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def spread(values: Sequence[float]) -> float:
    """max/min of positive values (the flatness measure of the key-ordering targets)."""
    return max(values) / min(values)


# -- tables ----------------------------------------------------------------------


@dataclass
class Table:
    """A titled table printed to the terminal and written as Markdown."""

    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        self.rows.append([fmt(c) for c in cells])

    def text(self) -> str:
        widths = [max(len(h), *(len(r[i]) for r in self.rows)) if self.rows else len(h) for i, h in enumerate(self.headers)]
        line = "  ".join(h.ljust(w) for h, w in zip(self.headers, widths))
        out = [self.title, line, "  ".join("-" * w for w in widths)]
        out += ["  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(r, widths)) for r in self.rows]
        out += [f"  ({n})" for n in self.notes]
        return "\n".join(out)

    def markdown(self) -> str:
        out = [f"**{self.title}**", "", "| " + " | ".join(self.headers) + " |"]
        out.append("|" + "|".join("---:" if _numeric_col(self.rows, i) else "---" for i in range(len(self.headers))) + "|")
        out += ["| " + " | ".join(r) + " |" for r in self.rows]
        if self.notes:
            out.append("")
            out += [f"- {n}" for n in self.notes]
        return "\n".join(out)

    def print(self) -> None:
        print()
        print(self.text(), flush=True)


def _numeric(cell: str) -> bool:
    try:
        float(cell.replace(",", "").rstrip("x%"))
        return True
    except ValueError:
        return False


def _numeric_col(rows: list[list[str]], i: int) -> bool:
    return bool(rows) and all(_numeric(r[i]) or r[i] in ("—", "n/a") for r in rows)


def fmt(value: object) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "—"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if value is None:
        return "—"
    return str(value)


# -- targets ---------------------------------------------------------------------


@dataclass
class Target:
    """One target of the performance issue and what was measured for it."""

    name: str
    goal: str  # e.g. "<= 1.5"
    measured: float | None
    ok: bool | None  # None: not measured in this profile
    detail: str = ""

    @classmethod
    def at_most(cls, name: str, measured: float | None, limit: float, detail: str = "") -> Target:
        return cls(name, f"≤ {limit:g}", measured, None if measured is None else measured <= limit, detail)

    @classmethod
    def at_least(cls, name: str, measured: float | None, limit: float, detail: str = "") -> Target:
        return cls(name, f"≥ {limit:g}", measured, None if measured is None else measured >= limit, detail)

    @classmethod
    def above(cls, name: str, measured: float | None, limit: float, detail: str = "") -> Target:
        return cls(name, f"> {limit:g}", measured, None if measured is None else measured > limit, detail)

    @classmethod
    def below(cls, name: str, measured: float | None, limit: float, detail: str = "") -> Target:
        return cls(name, f"< {limit:g}", measured, None if measured is None else measured < limit, detail)

    @property
    def verdict(self) -> str:
        return {True: "met", False: "MISSED", None: "not measured"}[self.ok]


def targets_table(targets: list[Target]) -> Table:
    table = Table("Targets", ["target", "goal", "measured", "verdict", "detail"])
    for t in targets:
        table.add(t.name, t.goal, t.measured, t.verdict, t.detail)
    return table


# -- the machine and the software ---------------------------------------------------


def git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        return sha + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return float("nan")


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


PACKAGES = ("taquba", "slatedb", "msgpack", "python-ulid", "uvloop", "huey", "procrastinate", "psycopg", "psycopg-binary")


def environment() -> dict[str, Any]:
    from taquba_backends import _uniffi_fast

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": git_commit(),
        "cores": os.cpu_count(),
        "ram_gib": round(ram_gib(), 1),
        "cpu": cpu_model(),
        "os": platform.platform(),
        "python": platform.python_version() + " (" + platform.python_implementation() + ")",
        "packages": {name: package_version(name) for name in PACKAGES},
        "fast_ffi": os.environ.get(_uniffi_fast.ENV_SWITCH, "1") not in ("0", "false", "no", "off"),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


# -- child processes -----------------------------------------------------------------


def run_child(module: str, args: dict[str, Any], *, env: dict[str, str] | None = None, timeout: float = 900) -> dict[str, Any]:
    """Run ``python -m module`` with ``args`` as JSON on stdin; return the JSON it prints last."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", module],
        input=json.dumps(args),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=full_env,
        timeout=timeout,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"benchmark child {module} {args} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    return json.loads(lines[-1])


def child_main(handler: Any) -> None:
    """Entry point of a child: JSON args on stdin, JSON result on stdout."""
    args = json.loads(sys.stdin.read() or "{}")
    result = handler(**args)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


SCRATCH_ENV = "TAQUBA_BENCH_SCRATCH"
"""Set by :func:`scratch_session` for the session's child processes: where their files go."""


@contextmanager
def scratch_session() -> Iterator[Path]:
    """One directory for every file the benchmarks write in this session, deleted at its end.

    A measurement's store is not deleted right after it: on ext4 without a
    journal (this project's benchmark machine) creating a file scans the
    inodes freed in the last minute or so, and a file:// run deleting its
    thousands of SSTs made the next run's WAL object creation cost up to
    ~0.5 ms a file instead of ~40 µs, halving its jobs/s at concurrency 1.
    """
    root = Path(tempfile.mkdtemp(prefix="taquba-bench-"))
    os.environ[SCRATCH_ENV] = str(root)
    try:
        yield root
    finally:
        os.environ.pop(SCRATCH_ENV, None)
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def temp_dir(prefix: str) -> Iterator[Path]:
    """A fresh directory for one measurement's files.

    Inside a :func:`scratch_session` it is made in the session's directory
    and left for the session to delete; otherwise it is deleted on exit.
    """
    session = os.environ.get(SCRATCH_ENV)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=session))
    try:
        yield path
    finally:
        if not session:
            shutil.rmtree(path, ignore_errors=True)


def peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM), in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
