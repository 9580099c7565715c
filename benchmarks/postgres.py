"""A throw-away local PostgreSQL server for the procrastinate peer benchmark.

Debian's ``postgresql`` package is installed with apt-get when ``initdb`` is
missing (only as root).  The server runs from a fresh data directory in a
temporary folder, listens on 127.0.0.1 only, on a free port, as the
``postgres`` system user when the benchmark runs as root (PostgreSQL refuses
to run as root), and is stopped and deleted afterwards.  It is configured
durable: ``fsync=on``, ``synchronous_commit=on``, ``full_page_writes=on``
(the defaults, set explicitly).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "max_connections": "300",
    "shared_buffers": "128MB",
}


def find_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/*/bin`` holding ``initdb`` and ``pg_ctl``."""
    found = sorted(
        (Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb") if Path(p).with_name("pg_ctl").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1]
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


def ensure_installed(log: callable = print) -> Path:
    """Find PostgreSQL's server binaries, installing Debian's ``postgresql`` when missing."""
    bindir = find_bin()
    if bindir is not None:
        return bindir
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError("PostgreSQL server binaries not found; install Debian's postgresql package")
    log("installing Debian's postgresql package (apt-get)...")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-q", "postgresql"], check=True, env=env, stdout=subprocess.DEVNULL)
    bindir = find_bin()
    if bindir is None:
        raise RuntimeError("postgresql was installed but initdb/pg_ctl are still missing")
    return bindir


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_version(bindir: Path) -> str:
    out = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True).stdout.strip()
    return out or "unknown"


@contextmanager
def server(log: callable = print) -> Iterator[tuple[str, str]]:
    """Run a fresh server; yields ``(conninfo of database 'postgres', version)``."""
    bindir = ensure_installed(log)
    as_root = os.geteuid() == 0
    base = Path(tempfile.mkdtemp(prefix="taquba-bench-pg-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    prefix: list[str] = []
    if as_root:
        user = pwd.getpwnam("postgres")
        os.chmod(base, 0o755)
        for path in (base, sock):
            os.chown(path, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    options = " ".join(f"-c {k}={v}" for k, v in SETTINGS.items()) + f" -c port={port} -c unix_socket_directories={sock}"
    try:
        subprocess.run(
            prefix + [str(bindir / "initdb"), "-D", str(data), "-U", "bench", "--auth=trust", "-E", "UTF8", "--no-instructions"],
            check=True, capture_output=True,
        )
        subprocess.run(
            prefix + [str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(base / "server.log"), "-w", "start"],
            check=True, capture_output=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        yield f"host=127.0.0.1 port={port} user=bench dbname=postgres", server_version(bindir)
    finally:
        subprocess.run(
            prefix + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
            capture_output=True,
        )
        shutil.rmtree(base, ignore_errors=True)


def create_database(conninfo: str, name: str) -> str:
    """Create database ``name``; returns its conninfo."""
    import psycopg

    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return conninfo.replace("dbname=postgres", f"dbname={name}")
