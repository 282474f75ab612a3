"""Frames waiting together travel together on ``DatagramSessions`` streams (ktrace_agent.wire.batching):
the shared gather logic, the agent with a raw stream, and ktrace's stream writer."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import socket
from collections import deque
from collections.abc import Callable
from typing import TypeVar, cast

import grpc
import grpc.aio
from agent_helpers import TOKEN, agent, run
from ktrace_agent.wire import batching, codec, rpc

from ktrace.tunnel.types import Endpoint
from ktrace.tunnel.udp_mux import UdpMux

DEADLINE = 10.0
PEER = rpc.Address(ip=bytes([127, 0, 0, 1]), port=9)
F = TypeVar("F")


def datagram(payload: bytes, session: int = 1, peer: rpc.Address = PEER) -> rpc.UdpClientFrame:
    return rpc.UdpClientFrame(datagram=rpc.Datagram(peer=peer, payload=payload), session=session)


def waiting(*frames: F) -> tuple[deque[F], Callable[[], F | None]]:
    queue = deque(frames)
    return queue, lambda: queue.popleft() if queue else None


def payloads(frames: list[rpc.UdpClientFrame] | list[rpc.UdpServerFrame]) -> list[bytes]:
    return [frame.datagram.payload for frame in frames]


def test_gather_takes_what_waits_behind_the_first() -> None:
    opening = rpc.UdpClientFrame(open=rpc.UdpOpen(family=rpc.FAMILY_INET), session=2)
    queue, take = waiting(datagram(b"b"), opening, datagram(b"c", session=2))
    frames = batching.gather(datagram(b"a"), take)
    assert [f.WhichOneof("kind") for f in frames] == ["datagram", "datagram", "open", "datagram"]  # any kind
    assert not queue
    lone = datagram(b"x")
    assert batching.gather(lone, waiting()[1]) == [lone]  # nothing behind it: as it was


def test_gather_stays_within_one_message() -> None:
    queue, take = waiting(*(datagram(b"%d" % i) for i in range(1, 100)))
    frames = batching.gather(datagram(b"0"), take)
    assert payloads(frames) == [b"%d" % i for i in range(batching.MAX_BATCH_FRAMES)]
    assert len(queue) == 100 - batching.MAX_BATCH_FRAMES  # the rest waits for the next write
    big = b"x" * (batching.MAX_BATCH_BYTES // 2)
    queue, take = waiting(datagram(big), datagram(big), datagram(b"next"))
    assert len(batching.gather(datagram(big), take)) == 2 and len(queue) == 2  # large enough: stops
    assert batching.MAX_BATCH_BYTES * 2 < 4 * 1024 * 1024  # what may pass the limit still fits a message


def test_pack_and_unpack() -> None:
    lone = datagram(b"a")
    assert batching.pack_client([lone]) is lone  # alone: the frame itself, no wrapping
    frames = [datagram(b"a"), datagram(b"b", session=2)]
    message = batching.pack_client(frames)
    assert message.WhichOneof("kind") == "frames"
    received = rpc.UdpClientFrame.FromString(message.SerializeToString())
    assert list(batching.unpack(received)) == frames
    assert list(batching.unpack(lone)) == [lone]
    answers = [rpc.UdpServerFrame(opened=rpc.UdpOpened(), session=n) for n in (1, 2)]
    assert list(batching.unpack(batching.pack_server(answers))) == answers
    assert batching.pack_server(answers[:1]) is answers[0]


def test_agent_sends_datagrams_that_arrived_together_as_one_message(tmp_path: pathlib.Path) -> None:
    """A resolver's A and AAAA answers reach the agent's socket back to back: both are read
    before the writer runs, so they go to ktrace as one message."""

    async def scenario() -> None:
        async with (
            agent(f"unix:{tmp_path}/a.sock", token=TOKEN) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            call = rpc.Stub(channel).datagram_sessions(metadata=rpc.bearer_metadata(TOKEN))
            await call.write(rpc.UdpClientFrame(open=rpc.UdpOpen(family=rpc.FAMILY_INET), session=1))
            opened = await asyncio.wait_for(call.read(), DEADLINE)
            assert isinstance(opened, rpc.UdpServerFrame) and opened.WhichOneof("kind") == "opened"
            port = opened.opened.local.port
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server_side:
                # The agent runs on this event loop: both are queued before it reads the first.
                server_side.sendto(b"answer A", ("127.0.0.1", port))
                server_side.sendto(b"answer AAAA", ("127.0.0.1", port))
                source_port = server_side.getsockname()[1]
                message = await asyncio.wait_for(call.read(), DEADLINE)
            assert isinstance(message, rpc.UdpServerFrame) and message.WhichOneof("kind") == "frames"
            frames = list(batching.unpack(message))
            assert payloads(frames) == [b"answer A", b"answer AAAA"]
            assert {(f.session, f.datagram.peer.port) for f in frames} == {(1, source_port)}
            call.cancel()

    run(scenario())


def test_a_malformed_address_inside_a_message_ends_the_stream(tmp_path: pathlib.Path) -> None:
    async def scenario() -> None:
        async with (
            agent(f"unix:{tmp_path}/a.sock", token=TOKEN) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            call = rpc.Stub(channel).datagram_sessions(metadata=rpc.bearer_metadata(TOKEN))
            bad = rpc.Address(ip=bytes(3), port=1)
            frames = [rpc.UdpClientFrame(open=rpc.UdpOpen(family=rpc.FAMILY_INET), session=1), datagram(b"ok")]
            with contextlib.suppress(grpc.aio.AioRpcError):
                await call.write(batching.pack_client([*frames, datagram(b"bad", peer=bad)]))
            with contextlib.suppress(grpc.aio.AioRpcError):
                while await call.read() is not grpc.aio.EOF:  # the status follows what was sent before it
                    pass
            assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT

    run(scenario())


class _RecordingCall:
    """Stands for a ``DatagramSessions`` call: records what ktrace writes, never answers."""

    def __init__(self) -> None:
        self.written: list[rpc.UdpClientFrame] = []
        self.wrote = asyncio.Event()

    async def write(self, message: rpc.UdpClientFrame) -> None:
        self.written.append(message)
        self.wrote.set()

    async def read(self) -> object:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    def cancel(self) -> bool:
        return True


def test_ktrace_writes_what_waits_together_as_one_message() -> None:
    """A session's ``open`` and the two questions a resolver sends right behind it leave as one
    message, before any answer."""

    async def scenario() -> None:
        call = _RecordingCall()
        mux = UdpMux(lambda: cast(rpc.UdpCall, call))
        session = mux.start(socket.AF_INET)
        dest = Endpoint.parse("10.96.0.10:53")
        for question in (b"A?", b"AAAA?"):
            assert session.send(dest, question)
        await asyncio.wait_for(call.wrote.wait(), DEADLINE)
        [message] = call.written
        frames = list(batching.unpack(message))
        assert [(f.WhichOneof("kind"), f.session) for f in frames] == [("open", 1), ("datagram", 1), ("datagram", 1)]
        assert payloads(frames[1:]) == [b"A?", b"AAAA?"]
        assert {codec.decode_address(f.datagram.peer) for f in frames[1:]} == {dest}
        await mux.close()

    run(scenario())
