"""The two directions of one relay, run together: the shape every relay of both processes shares.

A relay (ktrace's splice of a program's connection onto a ``Connect`` stream, the agent's relay of
that stream onto its remote connection, the port-forward bridge to the API server) copies each
direction in a task of its own. A direction returns when it is done (its end-of-stream passed on)
and raises when the whole relay must end (a reset, a peer gone, a protocol error).

``run_both`` waits until both returned, or until the first raised: then the other is cancelled and
awaited, so that neither still has the socket registered with the event loop when the caller closes
it (a descriptor number closed while registered could be reused by a new socket), and the first
exception is raised as itself, not wrapped in an ``ExceptionGroup``: callers catch their own types.
A cancel of the caller cancels both and is awaited the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

Direction = Coroutine[Any, Any, None]


async def run_both(first: Direction, second: Direction) -> None:
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(first)
            group.create_task(second)
    except BaseExceptionGroup as raised:
        raise _earliest(raised) from None


def _earliest(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The exception that ended the relay: a TaskGroup lists them in the order the tasks ended."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
