"""Several datagrams in one frame (``batch``) on ``Datagrams`` streams: the shared gather
logic, the agent with a raw stream, and ktrace's session towards agents that do and do not
accept batches."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import socket
from collections.abc import Sequence
from typing import cast

import grpc
import grpc.aio
import pytest
from agent_helpers import TOKEN, agent, agent_and_client, run, udp_echo
from ktrace_agent import batching

from ktrace.tunnel import rpc
from ktrace.tunnel.udp_session import UdpSession

PEER = rpc.Address(ip=bytes([127, 0, 0, 1]), port=9)


def datagram(payload: bytes, peer: rpc.Address = PEER) -> rpc.UdpClientFrame:
    return rpc.UdpClientFrame(datagram=rpc.Datagram(peer=peer, payload=payload))


def as_batch(datagrams: Sequence[rpc.Datagram]) -> rpc.UdpClientFrame:
    return rpc.UdpClientFrame(batch=rpc.DatagramBatch(datagrams=datagrams))


def payloads(frame: rpc.UdpClientFrame | rpc.UdpServerFrame) -> list[bytes]:
    if frame.WhichOneof("kind") == "batch":
        return [d.payload for d in frame.batch.datagrams]
    return [frame.datagram.payload]


def queue_of(*frames: rpc.UdpClientFrame) -> asyncio.Queue[rpc.UdpClientFrame]:
    queue: asyncio.Queue[rpc.UdpClientFrame] = asyncio.Queue()
    for frame in frames:
        queue.put_nowait(frame)
    return queue


def test_gather_joins_the_datagrams_queued_behind_the_first() -> None:
    other = rpc.UdpClientFrame(open=rpc.UdpOpen(family=rpc.FAMILY_INET))
    queue = queue_of(datagram(b"b"), datagram(b"c"), other, datagram(b"d"))
    first, after = batching.gather(datagram(b"a"), queue, as_batch)
    assert first.WhichOneof("kind") == "batch" and payloads(first) == [b"a", b"b", b"c"]
    assert after is other  # ends the batch, written right after it
    assert queue.qsize() == 1  # the rest waits for the next write

    lone = datagram(b"x")
    assert batching.gather(lone, queue_of(), as_batch) == [lone]  # nothing behind it: as it was
    assert batching.gather(other, queue_of(datagram(b"y")), as_batch) == [other]  # not a datagram first


def test_gather_stays_within_its_limits() -> None:
    many = queue_of(*(datagram(b"%d" % i) for i in range(1, 100)))
    [first] = batching.gather(datagram(b"0"), many, as_batch)
    assert payloads(first) == [b"%d" % i for i in range(batching.MAX_BATCH_DATAGRAMS)]
    big = b"x" * (batching.MAX_BATCH_BYTES // 2)
    large = queue_of(datagram(big), datagram(big), datagram(b"next"))
    [first] = batching.gather(datagram(big), large, as_batch)
    assert len(payloads(first)) == 2 and large.qsize() == 2  # a batch stops once it is large enough


@pytest.mark.parametrize("accepts_batches", [True, False])
def test_agent_takes_batches_and_sends_them_only_when_accepted(tmp_path: pathlib.Path, accepts_batches: bool) -> None:
    async def scenario() -> None:
        transport, _, port = await udp_echo()
        echo = rpc.Address(ip=bytes([127, 0, 0, 1]), port=port)
        try:
            async with (
                agent(f"unix:{tmp_path}/a.sock", token=TOKEN) as server,
                grpc.aio.insecure_channel(server.address) as channel,
            ):
                call = rpc.Stub(channel).datagrams(metadata=rpc.bearer_metadata(TOKEN))
                await call.write(rpc.UdpClientFrame(open=rpc.UdpOpen(family=rpc.FAMILY_INET, batches=accepts_batches)))
                sent = [b"q%d" % i for i in range(40)]
                await call.write(as_batch([rpc.Datagram(peer=echo, payload=p) for p in sent[:20]]))
                for payload in sent[20:]:
                    await call.write(datagram(payload, echo))
                kinds: set[str | None] = set()
                got: list[bytes] = []
                while len(got) < len(sent):
                    frame = await asyncio.wait_for(call.read(), 10)
                    assert isinstance(frame, rpc.UdpServerFrame)
                    kind = frame.WhichOneof("kind")
                    if kind == "opened":
                        continue
                    kinds.add(kind)
                    got += payloads(frame)
                assert got == [p.upper() for p in sent]  # in order, whatever the framing
                if not accepts_batches:
                    assert kinds == {"datagram"}
                call.cancel()
        finally:
            transport.close()

    run(scenario())


def test_agent_sends_datagrams_that_arrived_together_as_one_batch(tmp_path: pathlib.Path) -> None:
    """A resolver's A and AAAA answers reach the agent's socket back to back: both are read
    before the writer runs, so they go to ktrace as one frame (asyncio alone reads one per
    wake-up, and the first would leave alone)."""

    async def scenario() -> None:
        async with (
            agent(f"unix:{tmp_path}/a.sock", token=TOKEN) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            call = rpc.Stub(channel).datagrams(metadata=rpc.bearer_metadata(TOKEN))
            await call.write(rpc.UdpClientFrame(open=rpc.UdpOpen(family=rpc.FAMILY_INET, batches=True)))
            opened = await asyncio.wait_for(call.read(), 10)
            assert isinstance(opened, rpc.UdpServerFrame) and opened.WhichOneof("kind") == "opened"
            port = opened.opened.local.port
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server_side:
                # The agent runs on this event loop: both are queued before it reads the first.
                server_side.sendto(b"answer A", ("127.0.0.1", port))
                server_side.sendto(b"answer AAAA", ("127.0.0.1", port))
                source_port = server_side.getsockname()[1]
                frame = await asyncio.wait_for(call.read(), 10)
            assert isinstance(frame, rpc.UdpServerFrame)
            assert frame.WhichOneof("kind") == "batch"
            assert payloads(frame) == [b"answer A", b"answer AAAA"]
            assert {d.peer.port for d in frame.batch.datagrams} == {source_port}
            call.cancel()

    run(scenario())


def test_a_malformed_address_inside_a_batch_ends_the_stream(tmp_path: pathlib.Path) -> None:
    async def scenario() -> None:
        async with (
            agent(f"unix:{tmp_path}/a.sock", token=TOKEN) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            call = rpc.Stub(channel).datagrams(metadata=rpc.bearer_metadata(TOKEN))
            await call.write(rpc.UdpClientFrame(open=rpc.UdpOpen(family=rpc.FAMILY_INET, batches=True)))
            bad = rpc.Address(ip=bytes(3), port=1)
            with contextlib.suppress(grpc.aio.AioRpcError):
                await call.write(as_batch([rpc.Datagram(peer=PEER, payload=b"ok"), rpc.Datagram(peer=bad)]))
            with contextlib.suppress(grpc.aio.AioRpcError):
                while await call.read() is not grpc.aio.EOF:  # the status follows what was sent before it
                    pass
            assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT

    run(scenario())


class _RecordingCall:
    """Stands for a ``Datagrams`` call: records what the session writes, never answers."""

    def __init__(self) -> None:
        self.written: list[rpc.UdpClientFrame] = []
        self.wrote = asyncio.Event()

    async def write(self, frame: rpc.UdpClientFrame) -> None:
        self.written.append(frame)
        self.wrote.set()

    async def read(self) -> object:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    def cancel(self) -> bool:
        return True


@pytest.mark.parametrize("agent_accepts", [True, False])
def test_session_batches_only_towards_an_agent_that_accepts_them(agent_accepts: bool) -> None:
    async def scenario() -> None:
        call = _RecordingCall()
        session = UdpSession(cast(rpc.UdpCall, call), socket.AF_INET, batches=agent_accepts)
        dest = rpc.decode_address(PEER)
        for payload in (b"A?", b"AAAA?"):  # queued together, like a resolver's two questions
            assert session.send(dest, payload)
        while sum(len(payloads(f)) for f in call.written[1:]) < 2:
            call.wrote.clear()
            await asyncio.wait_for(call.wrote.wait(), 10)
        opening, *rest = call.written
        assert opening.WhichOneof("kind") == "open" and opening.open.batches  # it always accepts them
        assert [f.WhichOneof("kind") for f in rest] == (["batch"] if agent_accepts else ["datagram", "datagram"])
        assert [p for f in rest for p in payloads(f)] == [b"A?", b"AAAA?"]
        await session.close()

    run(scenario())


def test_the_handshake_says_the_agent_accepts_batches(tmp_path: pathlib.Path) -> None:
    async def scenario() -> None:
        async with agent_and_client(f"unix:{tmp_path}/a.sock") as (_, client):
            assert client.info.datagram_batches

    run(scenario())
