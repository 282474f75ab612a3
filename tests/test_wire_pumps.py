"""run_both: the two directions of a relay, and the order in which they end."""

from __future__ import annotations

import asyncio

import pytest
from ktrace_agent.wire.pumps import run_both

pytestmark = pytest.mark.timeout(10)


class Reset(Exception):
    pass


class Other(Exception):
    pass


def test_returns_when_both_directions_return() -> None:
    ended: list[str] = []

    async def direction(name: str, gate: asyncio.Event) -> None:
        await gate.wait()
        ended.append(name)

    async def main() -> None:
        up_gate, down_gate = asyncio.Event(), asyncio.Event()
        relay = asyncio.create_task(run_both(direction("up", up_gate), direction("down", down_gate)))
        up_gate.set()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert ended == ["up"] and not relay.done()  # one direction done does not end the relay
        down_gate.set()
        await asyncio.wait_for(relay, 5)

    asyncio.run(main())
    assert ended == ["up", "down"]


def test_first_raise_cancels_the_other_and_is_raised_unwrapped() -> None:
    other_state: list[str] = []

    async def resets() -> None:
        await asyncio.sleep(0)
        raise Reset("peer reset")

    async def waits_forever() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            other_state.append("cancelled")
            raise
        finally:
            other_state.append("unwound")

    async def main() -> None:
        with pytest.raises(Reset, match="peer reset"):
            await run_both(waits_forever(), resets())

    asyncio.run(main())
    # Awaited before run_both raised: the caller may close the socket now.
    assert other_state == ["cancelled", "unwound"]


def test_the_earliest_exception_wins_when_the_other_raises_while_cancelled() -> None:
    async def resets() -> None:
        await asyncio.sleep(0)
        raise Reset("first")

    async def fails_on_cancel() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise Other("while unwinding") from None

    async def main() -> None:
        with pytest.raises(Reset, match="first"):
            await run_both(fails_on_cancel(), resets())

    asyncio.run(main())


def test_a_cancelled_caller_cancels_and_awaits_both() -> None:
    unwound: list[str] = []

    async def direction(name: str, started: asyncio.Event) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            unwound.append(name)

    async def main() -> None:
        a, b = asyncio.Event(), asyncio.Event()
        relay = asyncio.create_task(run_both(direction("up", a), direction("down", b)))
        await a.wait()
        await b.wait()
        relay.cancel()
        with pytest.raises(asyncio.CancelledError):
            await relay

    asyncio.run(main())
    assert sorted(unwound) == ["down", "up"]


def test_a_direction_that_ends_cancelled_by_itself_does_not_end_the_relay() -> None:
    """grpc raises CancelledError inside a call's read after the call is cancelled; such a task ends
    cancelled, which a TaskGroup ignores: the relay goes on until the other direction ends."""

    async def ends_cancelled() -> None:
        raise asyncio.CancelledError

    async def returns_later(gate: asyncio.Event) -> None:
        await gate.wait()

    async def main() -> None:
        gate = asyncio.Event()
        relay = asyncio.create_task(run_both(ends_cancelled(), returns_later(gate)))
        for _ in range(3):
            await asyncio.sleep(0)
        assert not relay.done()
        gate.set()
        await asyncio.wait_for(relay, 5)

    asyncio.run(main())
