"""The port-forward bridge: the v4.channel.k8s.io codec (pure, fuzzed), and the bridge in front of a real agent.

In the bridge tests only the API server's hop is stood in for: ``LoopbackForward`` speaks the server side
of the port-forward protocol (port prefixes, data and error channels, close) over a real TCP connection to
a real agent on 127.0.0.1, as the kubelet does inside the pod. The cluster tests (tests/kube) cover the
real API server.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import struct

import grpc
import grpc.aio
import pytest
from agent_helpers import TOKEN, LoopbackServer, agent, drain_all, local_pair, pump, run, upper_echo
from hypothesis import given
from hypothesis import strategies as st
from ktrace_agent.wire import rpc

from ktrace.kube.portforward import (
    ChannelDecoder,
    Data,
    Failed,
    PortForwardBridge,
    ProtocolError,
    Unreachable,
    encode_data,
)
from ktrace.kube.portforward_transports import WebSocketForward
from ktrace.tunnel.client import AgentClient
from ktrace.tunnel.types import Endpoint, TcpStats, TunnelError


def prefix(channel: int, port: int) -> bytes:
    return bytes([channel]) + struct.pack("<H", port)


def test_decoder_strips_port_prefixes() -> None:
    d = ChannelDecoder(8080)
    assert d.feed(prefix(0, 8080)) == []
    assert d.feed(prefix(1, 8080)) == []
    assert d.feed(b"\x00hello") == [Data(b"hello")]
    assert d.feed(b"\x00") == []
    assert d.feed(b"\x01error forwarding port 8080: connection refused\n") == [
        Failed("error forwarding port 8080: connection refused")
    ]


def test_decoder_prefix_may_share_or_split_messages() -> None:
    d = ChannelDecoder(0x1234)
    assert d.feed(b"\x00\x34") == []
    assert d.feed(b"\x00\x12data") == [Data(b"data")]
    d = ChannelDecoder(7)
    assert d.feed(b"\x00\x07\x00first") == [Data(b"first")]


def test_decoder_rejects() -> None:
    with pytest.raises(ProtocolError, match="empty"):
        ChannelDecoder(1).feed(b"")
    with pytest.raises(ProtocolError, match="unknown channel 2"):
        ChannelDecoder(1).feed(b"\x02xx")
    with pytest.raises(ProtocolError, match="port 2, not 1"):
        ChannelDecoder(1).feed(prefix(0, 2))


@given(st.binary(max_size=2000), st.lists(st.integers(min_value=0, max_value=2000), max_size=10))
def test_decoder_any_split_of_the_data_channel(payload: bytes, cuts: list[int]) -> None:
    """Whatever the message boundaries, the data comes out whole and in order, the prefix removed."""
    stream = struct.pack("<H", 443) + payload
    points = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    d = ChannelDecoder(443)
    out = b""
    for a, b in itertools.pairwise(points):
        for event in d.feed(b"\x00" + stream[a:b]):
            assert isinstance(event, Data)
            out += event.payload
    assert out == payload


@given(st.binary(min_size=1, max_size=64))
def test_decoder_never_crashes(message: bytes) -> None:
    d = ChannelDecoder(80)
    with contextlib.suppress(ProtocolError):
        d.feed(message)


def test_encode_data() -> None:
    assert encode_data(b"abc") == b"\x00abc"


class LoopbackForward:
    """The server side of a port-forward to 127.0.0.1:port, as the kubelet runs it in the pod's netns."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.close_reason = ""
        self._messages: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None

    async def open(self) -> LoopbackForward:
        self._messages.put_nowait(prefix(0, self.port))
        self._messages.put_nowait(prefix(1, self.port))
        try:
            reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError as exc:
            self._messages.put_nowait(
                b"\x01" + f"error forwarding port {self.port}: {os.strerror(exc.errno or 0)}".encode()
            )
            self._messages.put_nowait(None)
            return self
        self._reader_task = asyncio.create_task(self._read(reader))
        return self

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while data := await reader.read(65536):
            self._messages.put_nowait(b"\x00" + data)
        self._messages.put_nowait(None)

    async def send(self, data: bytes) -> None:
        assert data[0] == 0, "the client writes on the data channel only"
        assert self._writer is not None
        self._writer.write(data[1:])
        await self._writer.drain()

    async def receive(self) -> bytes | None:
        return await self._messages.get()

    def cut(self) -> None:
        """The port-forward drops (API server restart): the connection to the pod goes, the client sees a close."""
        if self._writer is not None:
            self._writer.transport.abort()
        self.close_reason = "closed by the server (code 1006)"

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.transport.abort()
        if self._reader_task is not None:
            self._reader_task.cancel()


class Forwards:
    """``open_socket`` for the bridge; remembers every forward so a test can cut them."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.opened: list[LoopbackForward] = []
        self.changed = asyncio.Event()
        self.refuse: Unreachable | None = None

    async def __call__(self) -> WebSocketForward:
        if self.refuse is not None:
            raise self.refuse
        forward = await LoopbackForward(self.port).open()
        self.opened.append(forward)
        self.changed.set()
        return WebSocketForward(forward, self.port)

    async def wait_opened(self, count: int) -> None:
        while len(self.opened) < count:
            self.changed.clear()
            await self.changed.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_bridge_carries_the_channel_to_a_real_agent() -> None:
    async def scenario() -> None:
        async with agent("127.0.0.1:0", token=TOKEN) as server, LoopbackServer(upper_echo) as echo:
            port = int(server.address.rpartition(":")[2])
            lines: list[str] = []
            bridge = PortForwardBridge(Forwards(port), report=lines.append)
            address = await bridge.start()
            assert address.startswith("unix:")
            try:
                client = await AgentClient.connect(address, TOKEN, timeout=10)
                stream = await client.open_tcp(Endpoint.parse(f"127.0.0.1:{echo.port}"))
                await stream.abort()
                await client.ping()
                await client.close()
            finally:
                await bridge.close()
            assert bridge.connections == 1
            assert lines == []

    run(scenario())


def test_bridge_carries_bulk_both_ways_intact() -> None:
    total = 24 * 1024 * 1024

    async def scenario() -> None:
        results: dict[str, object] = {}

        async def sink_and_source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sent = asyncio.create_task(pump(writer, total, seed=4))
            results["server_got"] = await drain_all(reader)
            results["server_sent"] = await sent

        async with agent("127.0.0.1:0", token=TOKEN) as server, LoopbackServer(sink_and_source) as target:
            port = int(server.address.rpartition(":")[2])
            bridge = PortForwardBridge(Forwards(port), report=lambda _line: None)
            address = await bridge.start()
            try:
                client = await AgentClient.connect(address, TOKEN, timeout=10)
                stream = await client.open_tcp(Endpoint.parse(f"127.0.0.1:{target.port}"))
                (p_reader, p_writer), k_sock = await local_pair()
                splice = asyncio.create_task(stream.splice(k_sock))
                sent_hash, (got_n, got_hash) = await asyncio.gather(pump(p_writer, total, seed=3), drain_all(p_reader))
                stats = await splice
                await asyncio.wait_for(target.handlers_done.wait(), 10)
                assert results["server_got"] == (total, sent_hash)
                assert (got_n, got_hash) == (total, results["server_sent"])
                assert stats == TcpStats(bytes_up=total, bytes_down=total, outcome="closed")
                p_writer.close()
                await client.close()
            finally:
                await bridge.close()

    run(scenario(), timeout=100)


def test_bridge_waits_for_an_agent_that_is_not_listening_yet() -> None:
    async def scenario() -> None:
        port = free_port()
        forwards = Forwards(port)
        bridge = PortForwardBridge(forwards, report=lambda _line: None)
        address = await bridge.start()
        connecting = asyncio.create_task(AgentClient.connect(address, TOKEN, timeout=10))
        # The first attempts find nothing listening (the kubelet's "connection refused" on the error channel).
        await forwards.wait_opened(2)
        assert "error forwarding port" in bridge.last_error and "refused" in bridge.last_error.lower()
        assert not connecting.done()
        async with agent(f"127.0.0.1:{port}", token=TOKEN):
            client = await connecting
            assert client.info.version
            await client.close()
        await bridge.close()

    run(scenario())


def test_bridge_reports_a_drop_and_reconnects() -> None:
    async def scenario() -> None:
        async with agent("127.0.0.1:0", token=TOKEN) as server, LoopbackServer(upper_echo) as echo:
            port = int(server.address.rpartition(":")[2])
            forwards = Forwards(port)
            lines: list[str] = []
            bridge = PortForwardBridge(forwards, report=lines.append)
            address = await bridge.start()
            client = await AgentClient.connect(address, TOKEN, timeout=10)
            stream = await client.open_tcp(Endpoint.parse(f"127.0.0.1:{echo.port}"))
            local, remote = await local_socket_pair()
            splice = asyncio.create_task(stream.splice(remote))
            reader, writer = local
            writer.write(b"before\n")
            assert await reader.readline() == b"BEFORE\n"

            for forward in forwards.opened:
                forward.cut()
            # The connection in flight is reset, and the user is told.
            with pytest.raises(ConnectionResetError):
                while await reader.read(100):
                    pass
            stats = await splice
            assert stats.outcome.startswith("error: UNAVAILABLE"), stats.outcome
            assert len(lines) == 1 and lines[0].startswith("lost the tunnel to the agent (port-forward closed")

            # New connections work again, over a new port-forward.
            deadline = asyncio.get_running_loop().time() + 10
            while True:
                try:
                    again = await client.open_tcp(Endpoint.parse(f"127.0.0.1:{echo.port}"))
                    break
                except TunnelError:
                    assert asyncio.get_running_loop().time() < deadline, "no reconnection"
                    await asyncio.sleep(0.05)
            await again.abort()
            assert len(forwards.opened) == 2
            assert lines[1].startswith("tunnel to the agent restored after")
            writer.close()
            await client.close()
            await bridge.close()

    run(scenario())


def test_bridge_refused_for_good() -> None:
    async def scenario() -> None:
        forwards = Forwards(1)
        forwards.refuse = Unreachable("forbidden: cannot get pods/portforward a in namespace ns", final=True)
        bridge = PortForwardBridge(forwards, report=lambda _line: None)
        address = await bridge.start()
        connecting = asyncio.create_task(AgentClient.connect(address, TOKEN, timeout=10))
        await asyncio.wait_for(bridge.refused.wait(), 10)
        assert bridge.final_error is forwards.refuse
        connecting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await connecting
        await bridge.close()

    run(scenario())


def test_wrong_token_through_the_bridge_is_rejected() -> None:
    async def scenario() -> None:
        async with agent("127.0.0.1:0", token=TOKEN) as server:
            port = int(server.address.rpartition(":")[2])
            bridge = PortForwardBridge(Forwards(port), report=lambda _line: None)
            address = await bridge.start()
            channel = grpc.aio.insecure_channel(address)
            stub = rpc.Stub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.handshake(rpc.HandshakeRequest(), metadata=rpc.bearer_metadata("wrong"), timeout=10)
            assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
            await channel.close()
            await bridge.close()

    run(scenario())


async def local_socket_pair() -> tuple[tuple[asyncio.StreamReader, asyncio.StreamWriter], socket.socket]:
    """A loopback TCP connection: (one end as streams, the other end's socket, for a splice)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        local = await asyncio.open_connection("127.0.0.1", listener.getsockname()[1])
        remote, _ = listener.accept()
    return local, remote
