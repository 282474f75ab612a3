"""SendBudget (agent/wire/budget.py): bounds bytes queued in gRPC across streams, serves waiters in
order, and never holds a write back longer than max_wait without budget coming back."""

from __future__ import annotations

import asyncio

from agent_helpers import run
from ktrace_agent.wire.budget import SendBudget


def test_takes_and_gives_back() -> None:
    async def scenario() -> None:
        budget = SendBudget(100, max_wait=5)
        assert await budget.take(60) == 60
        assert await budget.take(40) == 40
        assert budget.free == 0
        budget.give(60)
        budget.give(40)
        assert budget.free == 100

    run(scenario())


def test_a_write_larger_than_the_budget_takes_all_of_it() -> None:
    async def scenario() -> None:
        budget = SendBudget(100, max_wait=5)
        assert await budget.take(1000) == 100
        assert budget.free == 0

    run(scenario())


def test_waiters_are_served_in_order_as_bytes_come_back() -> None:
    async def scenario() -> None:
        budget = SendBudget(100, max_wait=5)
        assert await budget.take(100) == 100
        order: list[str] = []

        async def writer(name: str, size: int) -> None:
            await budget.take(size)
            order.append(name)

        first = asyncio.create_task(writer("first", 80))
        second = asyncio.create_task(writer("second", 10))  # fits sooner, but waits its turn
        await asyncio.sleep(0)
        assert order == []
        budget.give(50)
        await asyncio.sleep(0)
        assert order == []  # 50 free: not enough for the head of the queue
        budget.give(50)
        await asyncio.gather(first, second)
        assert order == ["first", "second"]
        assert budget.free == 10

    run(scenario())


def test_a_write_waits_at_most_max_wait_then_goes_ahead_unbudgeted() -> None:
    async def scenario() -> None:
        budget = SendBudget(100, max_wait=0.05)
        assert await budget.take(100) == 100  # held by a stream whose peer stopped reading
        assert await asyncio.wait_for(budget.take(10), 5) == 0
        assert budget.overdrafts == 1
        assert budget.free == 0  # nothing was taken for it
        budget.give(100)
        assert await budget.take(10) == 10  # the queue is not left blocked

    run(scenario())


def test_a_cancelled_waiter_leaves_the_queue_and_its_grant_comes_back() -> None:
    async def scenario() -> None:
        budget = SendBudget(100, max_wait=5)
        await budget.take(100)
        waiting = asyncio.create_task(budget.take(30))
        behind = asyncio.create_task(budget.take(30))
        await asyncio.sleep(0)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        budget.give(100)
        assert await asyncio.wait_for(behind, 5) == 30
        assert budget.free == 70

    run(scenario())


def test_a_waiter_keeps_its_turn_while_budget_keeps_coming_back() -> None:
    """max_wait counts from the last time budget came back: a queue that moves is not a stall,
    and waiters do not go ahead unbudgeted (which would defeat the bound under heavy load)."""

    async def scenario() -> None:
        budget = SendBudget(100, max_wait=0.5)
        assert await budget.take(100) == 100
        waiter = asyncio.create_task(budget.take(90))
        loop = asyncio.get_running_loop()
        started = loop.time()
        # Well past max_wait, one byte back every 20 ms: at most ~63 bytes, never the 90 asked.
        while loop.time() - started < 2.5 * budget.max_wait:
            budget.give(1)
            await asyncio.sleep(0.02)
            assert not waiter.done(), "went ahead although budget kept coming back"
        assert budget.waiting == 1 and budget.free < 90
        budget.give(90 - budget.free)
        assert await asyncio.wait_for(waiter, 5) == 90
        assert budget.overdrafts == 0
        assert budget.free == 0

    run(scenario(), timeout=30)
