"""Started: a coroutine run to its first suspension at once, the rest when awaited."""

from __future__ import annotations

import asyncio

import pytest

from taquba_backends._eager import Started


async def test_runs_up_to_the_first_suspension_at_construction() -> None:
    steps: list[str] = []

    async def two_steps() -> int:
        steps.append("first")
        await asyncio.sleep(0)
        steps.append("second")
        return 7

    started = Started(two_steps())
    steps.append("constructed")
    assert await started == 7
    assert steps == ["first", "constructed", "second"]


async def test_a_coroutine_that_never_suspends_is_done_at_construction() -> None:
    steps: list[str] = []

    async def at_once() -> str:
        steps.append("ran")
        return "done"

    started = Started(at_once())
    assert steps == ["ran"]
    assert await started == "done"


async def test_an_error_before_the_first_suspension_comes_from_the_constructor() -> None:
    async def fails() -> None:
        raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"):
        Started(fails())


async def test_an_error_after_it_comes_from_the_await() -> None:
    async def fails_later() -> None:
        await asyncio.sleep(0)
        raise ValueError("write failed")

    started = Started(fails_later())
    with pytest.raises(ValueError, match="write failed"):
        await started


async def test_two_started_calls_overlap_in_the_order_they_started() -> None:
    order: list[str] = []
    gate = asyncio.Event()

    async def call(name: str) -> str:
        order.append(f"{name} sent")
        await gate.wait()
        order.append(f"{name} done")
        return name

    first, second = Started(call("write")), Started(call("flush"))
    asyncio.get_running_loop().call_soon(gate.set)
    assert (await first, await second) == ("write", "flush")
    assert order == ["write sent", "flush sent", "write done", "flush done"]


async def test_cancelling_the_awaiting_task_cancels_the_coroutine() -> None:
    cleaned = asyncio.Event()

    async def waits_forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.set()

    started = Started(waits_forever())

    async def awaiter() -> None:
        await started

    task = asyncio.ensure_future(awaiter())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned.is_set()
