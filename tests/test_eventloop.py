"""taquba_backends.run: the event loop the command line uses (uvloop when installed)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from taquba_backends import open_store, run
from taquba_backends.eventloop import uses_uvloop
from taquba_core import Queue, run_worker_concurrent
from taquba_core.errors import InvalidArgument


def test_run_uses_uvloop_when_installed_and_returns_the_result() -> None:
    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    module = run(loop_module())
    assert module.startswith("uvloop") == uses_uvloop()


def test_run_propagates_errors() -> None:
    async def bad() -> None:
        raise InvalidArgument("bad value 7")

    with pytest.raises(InvalidArgument, match="bad value 7"):
        run(bad())


def test_a_queue_on_slatedb_runs_end_to_end_on_that_loop(tmp_path: Path) -> None:
    url = (tmp_path / "store").as_uri()

    async def main() -> list[bytes]:
        queue = await Queue.open(await open_store(url))
        done: list[bytes] = []
        stop = asyncio.Event()

        async def handler(job):  # type: ignore[no-untyped-def]
            done.append(job.payload)
            if len(done) == 20:
                stop.set()

        worker = asyncio.create_task(run_worker_concurrent(queue, "q", handler, concurrency=4, shutdown=stop))
        await asyncio.gather(*(queue.enqueue("q", b"%d" % i) for i in range(20)))
        await worker
        assert (await queue.stats("q")).done == 20
        await queue.close()
        return done

    assert sorted(run(main())) == sorted(b"%d" % i for i in range(20))
