"""StartedNow (ktrace/tunnel/eager.py): a coroutine's first step run in the caller, the rest by
whoever awaits it, with results, errors, cancellation and close() as a task would give them."""

from __future__ import annotations

import asyncio

import pytest
from agent_helpers import run

from ktrace.tunnel.eager import StartedNow

pytestmark = pytest.mark.timeout(30)


def test_the_first_step_runs_in_the_constructor_and_the_rest_when_awaited() -> None:
    steps: list[str] = []

    async def work(gate: asyncio.Future[int]) -> int:
        steps.append("first")
        value = await gate
        steps.append("second")
        await asyncio.sleep(0)  # a bare yield passes through as well
        steps.append("third")
        return value * 2

    async def scenario() -> None:
        gate: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        started = StartedNow(work(gate))
        assert steps == ["first"]  # no loop turn has happened
        task = asyncio.ensure_future(_awaiting(started))
        await asyncio.sleep(0)
        assert steps == ["first"]
        gate.set_result(21)
        assert await task == 42
        assert steps == ["first", "second", "third"]

    run(scenario())


async def _awaiting(started: StartedNow[int]) -> int:
    return await started


def test_a_coroutine_done_in_its_first_step_gives_its_result_or_its_error() -> None:
    async def done_at_once() -> int:
        return 7

    async def fails_at_once() -> int:
        raise ValueError("no")

    async def scenario() -> None:
        assert await StartedNow(done_at_once()) == 7
        failing = StartedNow(fails_at_once())  # the constructor does not raise
        with pytest.raises(ValueError, match="no"):
            await failing

    run(scenario())


def test_an_error_after_the_first_step_reaches_the_awaiter() -> None:
    async def fails_later(gate: asyncio.Future[None]) -> int:
        await gate
        raise OSError(5, "later")

    async def scenario() -> None:
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        started = StartedNow(fails_later(gate))
        gate.get_loop().call_soon(gate.set_result, None)
        with pytest.raises(OSError, match="later"):
            await started

    run(scenario())


def test_cancelling_the_awaiting_task_cancels_the_coroutine_where_it_waits() -> None:
    cleaned: list[str] = []

    async def waits_forever(gate: asyncio.Future[None]) -> int:
        try:
            await gate
        except asyncio.CancelledError:
            cleaned.append("cancelled")
            raise
        return 0

    async def scenario() -> None:
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(_awaiting(StartedNow(waits_forever(gate))))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert cleaned == ["cancelled"]
        assert gate.cancelled()  # the task's cancel reached the future the coroutine waited on

    run(scenario())


def test_close_before_awaiting_runs_the_coroutines_cleanup() -> None:
    cleaned: list[str] = []

    async def holds(gate: asyncio.Future[None]) -> int:
        try:
            await gate
        finally:
            cleaned.append("finally")
        return 0

    async def scenario() -> None:
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        started = StartedNow(holds(gate))
        assert cleaned == []
        started.close()
        assert cleaned == ["finally"]
        started.close()  # a second close is nothing
        with pytest.raises(RuntimeError, match="awaited once"):
            await started

    run(scenario())


def test_it_can_be_awaited_only_once() -> None:
    async def value() -> int:
        await asyncio.sleep(0)
        return 1

    async def scenario() -> None:
        started = StartedNow(value())
        assert await started == 1
        with pytest.raises(RuntimeError, match="awaited once"):
            await started

    run(scenario())
