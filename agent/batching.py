"""Datagrams that wait together travel together: one ``batch`` frame instead of several.

gRPC's cost is per message (a write, then its completion handed from gRPC's poller thread
to the event loop: ~100 µs here), and a stream has one write in flight at a time. A
resolver sends its A and AAAA questions at once, and they queue behind each other on the
stream. ``gather`` takes the frame to write next and the datagram frames queued right
behind it, and makes them one ``batch`` frame. Used on both sides of a ``Datagrams``
stream (the agent's and ktrace's), each only towards a peer that accepts batches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from . import rpc

MAX_BATCH_DATAGRAMS = 64
MAX_BATCH_BYTES = 1024 * 1024  # well under the 4 MiB message limit of both sides


class _Frame(Protocol):
    @property
    def datagram(self) -> rpc.Datagram: ...

    def WhichOneof(self, oneof_group: str) -> str | None: ...


F = TypeVar("F", bound=_Frame)


def gather(first: F, queue: asyncio.Queue[F], make_batch: Callable[[Sequence[rpc.Datagram]], F]) -> list[F]:
    """The frames to write, in order, for ``first`` and what is queued behind it right now.

    Datagram frames queued directly behind a datagram ``first`` join it in one batch (at
    most ``MAX_BATCH_DATAGRAMS`` / ``MAX_BATCH_BYTES``); the first other frame taken from
    the queue ends the batch and is written after it. Never waits.
    """
    if first.WhichOneof("kind") != "datagram":
        return [first]
    datagrams = [first.datagram]
    size = len(first.datagram.payload)
    after: list[F] = []
    while len(datagrams) < MAX_BATCH_DATAGRAMS and size < MAX_BATCH_BYTES:
        try:
            frame = queue.get_nowait()
        except asyncio.QueueEmpty:
            break
        if frame.WhichOneof("kind") != "datagram":
            after.append(frame)
            break
        datagrams.append(frame.datagram)
        size += len(frame.datagram.payload)
    head = first if len(datagrams) == 1 else make_batch(datagrams)
    return [head, *after]
