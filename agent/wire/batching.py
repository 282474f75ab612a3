"""Frames that wait together travel together: one ``frames`` message instead of several.

gRPC's cost is per message (a write, then its completion handed from gRPC's poller thread to the
event loop: ~100 µs here), and a stream has one write in flight at a time. On a ``DatagramSessions``
stream the frames of all sessions queue behind each other: a resolver's A and AAAA questions,
another session's ``open``, the answers that reached the agent together. Each side's one writer
takes the frame to write next and those queued right behind it (``gather``: never waits, at most
a message's worth) and writes them as one message (``pack_client``, ``pack_server``); the reader
takes them apart again (``unpack``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar, overload

from . import rpc

MAX_BATCH_FRAMES = 64
MAX_BATCH_BYTES = 1024 * 1024  # of datagram payload; well under MAX_MESSAGE_BYTES


class _Frame(Protocol):
    @property
    def datagram(self) -> rpc.Datagram: ...


F = TypeVar("F", bound=_Frame)


def gather(first: F, next_waiting: Callable[[], F | None]) -> list[F]:
    """``first`` and the frames ``next_waiting`` hands out (None: no more waiting now), in order,
    at most ``MAX_BATCH_FRAMES`` and no more once their payloads reach ``MAX_BATCH_BYTES``."""
    frames = [first]
    size = len(first.datagram.payload)
    while len(frames) < MAX_BATCH_FRAMES and size < MAX_BATCH_BYTES:
        frame = next_waiting()
        if frame is None:
            break
        frames.append(frame)
        size += len(frame.datagram.payload)
    return frames


def pack_client(frames: Sequence[rpc.UdpClientFrame]) -> rpc.UdpClientFrame:
    """One message for ``frames``: the frame itself when it is alone."""
    if len(frames) == 1:
        return frames[0]
    return rpc.UdpClientFrame(frames=rpc.UdpClientFrames(frames=frames))


def pack_server(frames: Sequence[rpc.UdpServerFrame]) -> rpc.UdpServerFrame:
    """One message for ``frames``: the frame itself when it is alone."""
    if len(frames) == 1:
        return frames[0]
    return rpc.UdpServerFrame(frames=rpc.UdpServerFrames(frames=frames))


@overload
def unpack(message: rpc.UdpClientFrame) -> Sequence[rpc.UdpClientFrame]: ...


@overload
def unpack(message: rpc.UdpServerFrame) -> Sequence[rpc.UdpServerFrame]: ...


def unpack(message: rpc.UdpClientFrame | rpc.UdpServerFrame) -> Sequence[rpc.UdpClientFrame | rpc.UdpServerFrame]:
    """The frames a message carries (``frames`` are never nested: one inside is the peer's error)."""
    if message.WhichOneof("kind") == "frames":
        return message.frames.frames
    return (message,)
