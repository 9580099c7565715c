"""The FFI fast path for slatedb.uniffi (taquba_backends/_uniffi_fast.py) changes no result."""

from __future__ import annotations

import asyncio
import ctypes
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from taquba_backends import _uniffi_fast, open_store
from taquba_backends.slatedb_store import SlateDBStore

ROOT = Path(__file__).resolve().parent.parent
VALUES = [b"", b"k", b"\x00\x01\x00", bytes(range(256)), os.urandom(70_000), bytearray(b"mutable"), memoryview(b"view")]


@pytest.fixture
async def store() -> SlateDBStore:
    s = await open_store("memory://")
    assert isinstance(s, SlateDBStore)
    yield s
    await s.close()


async def test_installed_on_the_pinned_binding(store: SlateDBStore) -> None:
    if os.environ.get(_uniffi_fast.ENV_SWITCH, "1") == "0":
        pytest.skip("fast path disabled in this environment")
    assert _uniffi_fast.installed()


@pytest.mark.parametrize("value", VALUES, ids=lambda v: f"{type(v).__name__}-{len(v)}")
def test_bytes_lowering_is_the_uniffi_wire_format(value: bytes) -> None:
    from slatedb.uniffi._slatedb_uniffi import slatedb as gen

    _uniffi_fast.install()
    buf = gen._UniffiFfiConverterBytes.lower(value)
    try:
        assert ctypes.string_at(buf.data, buf.len) == struct.pack(">i", len(value)) + bytes(value)
    finally:
        buf.free()


async def test_values_round_trip_through_the_store(store: SlateDBStore) -> None:
    txn = await store.begin()
    for i, value in enumerate(VALUES):
        await txn.put(b"key-%d" % i, bytes(value))
    await txn.commit()
    txn = await store.begin()
    for i, value in enumerate(VALUES):
        assert await txn.get(b"key-%d" % i) == bytes(value)
    rows = await txn.scan(b"key-")
    assert [v for _, v in rows] == [bytes(v) for v in VALUES]
    await txn.rollback()


async def test_many_concurrent_calls_resolve(store: SlateDBStore) -> None:
    async def one(i: int) -> bytes | None:
        txn = await store.begin()
        await txn.put(b"c%d" % i, b"%d" % i)
        await txn.commit()
        txn = await store.begin()
        try:
            return await txn.get(b"c%d" % i)
        finally:
            await txn.rollback()

    assert await asyncio.gather(*(one(i) for i in range(200))) == [b"%d" % i for i in range(200)]


async def test_a_cancelled_wait_leaves_the_store_usable(store: SlateDBStore) -> None:
    txn = await store.begin()
    await txn.put(b"x", b"1")
    durability = await txn.commit(durable=False)
    waiter = asyncio.ensure_future(durability.wait())
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    txn = await store.begin()
    assert await txn.get(b"x") == b"1"
    await txn.rollback()


async def test_write_batch_operations_keep_their_results_and_errors(store: SlateDBStore) -> None:
    import slatedb.uniffi as sdb

    batch = sdb.WriteBatch()
    batch.put(b"k1", b"v1")
    batch.put(b"k2", bytes(range(256)) * 64)
    batch.delete(b"k1")
    batch.put(bytearray(b"k3"), memoryview(b"v3"))  # not bytes: the generated method
    await store._db.write(batch)
    assert [await store._db.get(k) for k in (b"k1", b"k2", b"k3")] == [None, bytes(range(256)) * 64, b"v3"]
    with pytest.raises(sdb.Error.Invalid, match="consumed"):
        batch.put(b"a", b"b")
    with pytest.raises(sdb.Error.Invalid, match="consumed"):
        batch.delete(b"a")
    with pytest.raises(sdb.Error.Invalid, match="empty"):
        sdb.WriteBatch().put(b"", b"x")
    with pytest.raises(TypeError, match="bytes-like"):
        sdb.WriteBatch().put("text", b"x")  # type: ignore[arg-type]


def test_the_stock_binding_still_works() -> None:
    """With TAQUBA_SLATEDB_FAST_FFI=0 nothing is patched and the queue works the same."""
    code = (
        "import asyncio\n"
        "from taquba_backends import _uniffi_fast, open_store\n"
        "from taquba_core import Queue\n"
        "async def main():\n"
        "    q = await Queue.open(await open_store('memory://'), background=False)\n"
        "    ids = await asyncio.gather(*(q.enqueue('q', b'x' * n) for n in (0, 1, 5000)))\n"
        "    jobs = await q.claim_batch('q', 3)\n"
        "    assert [j.id for j in jobs] == ids, (jobs, ids)\n"
        "    assert [len(j.payload) for j in jobs] == [0, 1, 5000]\n"
        "    await asyncio.gather(*(q.ack(j) for j in jobs))\n"
        "    assert (await q.stats('q')).done == 3\n"
        "    await q.close()\n"
        "    print('installed', _uniffi_fast.installed())\n"
        "asyncio.run(main())\n"
    )
    env = dict(os.environ, **{_uniffi_fast.ENV_SWITCH: "0"})
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "installed False" in out.stdout


def test_slatedb_threads_keep_their_python_thread_state(tmp_path: Path) -> None:
    """Continuations from SlateDB's threads pin each busy thread once, not once per callback.

    In a process of its own: the count covers only this store's work.
    """
    code = (
        "import asyncio, sys\n"
        "from taquba_backends import _uniffi_fast, open_store\n"
        "async def main():\n"
        "    s = await open_store(sys.argv[1])\n"
        "    for i in range(300):\n"
        "        txn = await s.begin()\n"
        "        await txn.put(b'k%d' % i, b'v')\n"
        "        await txn.commit()  # durable: a WAL flush per commit\n"
        "    await s.close()\n"
        "    print(_uniffi_fast.installed(), _uniffi_fast.kept_thread_states())\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, (tmp_path / "db").as_uri()], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    installed, kept = out.stdout.split()
    if installed != "True":
        pytest.skip("fast path disabled in this environment")
    # SlateDB's few tokio workers, not every short-lived thread that called back a few times
    assert 1 <= int(kept) <= 4


def _call_back_from_threads(threads: int, calls: int) -> int:
    """``threads`` live threads (distinct ids) each call ``_keep_thread_state`` ``calls`` times: threads kept after."""
    import threading

    all_done = threading.Barrier(threads)

    def call_back() -> None:
        for _ in range(calls):
            _uniffi_fast._keep_thread_state()
        all_done.wait()

    started = [threading.Thread(target=call_back) for _ in range(threads)]
    for t in started:
        t.start()
    for t in started:
        t.join()
    return _uniffi_fast.kept_thread_states()


def test_a_thread_is_kept_at_its_pin_after_th_call_and_at_most_max_kept_are(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_uniffi_fast, "_kept", 0)
    monkeypatch.setattr(_uniffi_fast, "_calls", {})
    assert _call_back_from_threads(8, _uniffi_fast.PIN_AFTER - 1) == 0
    monkeypatch.setattr(_uniffi_fast, "_calls", {})
    assert _call_back_from_threads(_uniffi_fast.MAX_KEPT + 6, _uniffi_fast.PIN_AFTER) == _uniffi_fast.MAX_KEPT
