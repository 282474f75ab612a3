"""Connect stream reuse, through a real agent to real loopback servers: one stream carries
connection after connection while each ends cleanly (both half-close orders, refused dials in
between), a reset still ends the stream, and agents or clients without the feature keep the
one-stream-per-connection protocol."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import pathlib
import socket
import struct
from typing import Any, cast

import grpc
import grpc.aio
import pytest
from agent_helpers import TOKEN, LoopbackServer, agent, agent_and_client, local_pair, run, upper_echo
from ktrace_agent.server import AgentServer
from ktrace_agent.wire import codec, rpc

from ktrace.tunnel import client as client_module
from ktrace.tunnel.client import AgentClient
from ktrace.tunnel.types import Endpoint, TcpStats, TunnelError


@pytest.fixture(params=["unix", "tcp"])
def listen(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> str:
    return f"unix:{tmp_path}/agent.sock" if request.param == "unix" else "127.0.0.1:0"


def _free_port() -> int:
    """A port that was just free: nothing listens there."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class StreamWatchingAgent(AgentServer):
    """The real agent, noting which of its ``Connect`` streams carried each ``open``: what
    stream reuse changes, seen where it happens."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opens: list[int] = []  # per ``open`` frame read, in order: the number of its stream
        self._streams = 0

    async def Connect(self, request_iterator: object, context: rpc.TcpContext) -> None:
        self._streams += 1
        noting = _OpensNoted(context, self._streams, self.opens)
        await super().Connect(request_iterator, cast(rpc.TcpContext, noting))


class _OpensNoted:
    """A ``Connect`` stream's context that notes each ``open`` the agent reads from it."""

    def __init__(self, context: rpc.TcpContext, stream: int, opens: list[int]) -> None:
        self._context = context
        self._stream = stream
        self._opens = opens

    async def read(self) -> object:
        frame = await self._context.read()
        if isinstance(frame, rpc.TcpClientFrame) and frame.WhichOneof("kind") == "open":
            self._opens.append(self._stream)
        return frame

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def watching(server: AgentServer) -> StreamWatchingAgent:
    assert isinstance(server, StreamWatchingAgent)
    return server


# What close_first's server read after its own FIN, one entry per connection.
received_after_fin: list[bytes] = []


async def close_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The server says its line and finishes sending first, then answers what it still gets."""
    writer.write(b"hello first")
    writer.write_eof()
    received_after_fin.append(await reader.read())


async def reset_after_hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readexactly(5)
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def spliced(
    client: AgentClient, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.Task[TcpStats]]:
    """A tunnelled connection to ``port``: the program's end, and the splice running it."""
    stream = await client.open_tcp(Endpoint.parse(f"127.0.0.1:{port}"))
    (p_reader, p_writer), k_sock = await local_pair()
    return p_reader, p_writer, asyncio.create_task(stream.splice(k_sock))


async def echo_connection(client: AgentClient, port: int, payload: bytes) -> TcpStats:
    """The program sends, finishes sending first, reads the echo to EOF."""
    p_reader, p_writer, splice = await spliced(client, port)
    p_writer.write(payload)
    p_writer.write_eof()
    assert await p_reader.read() == payload.upper()
    stats = await splice
    p_writer.close()
    return stats


async def server_first_connection(client: AgentClient, port: int) -> TcpStats:
    """The remote finishes first; the program still sends after that FIN, then closes."""
    p_reader, p_writer, splice = await spliced(client, port)
    assert await p_reader.read() == b"hello first"  # the remote's FIN reached the program
    p_writer.write(b"after your FIN")
    p_writer.write_eof()
    stats = await splice
    p_writer.close()
    return stats


async def reset_connection(client: AgentClient, port: int) -> TcpStats:
    p_reader, p_writer, splice = await spliced(client, port)
    p_writer.write(b"hello")
    stats = await splice
    with contextlib.suppress(ConnectionResetError):
        assert await p_reader.read() == b""
    p_writer.close()
    return stats


def test_one_stream_carries_sequential_connections(listen: str) -> None:
    """Clean connections (either side finishing first) and refused dials start no new stream;
    a reset ends its stream, and the next connection runs on another one."""

    async def scenario() -> None:
        received_after_fin.clear()
        async with (
            LoopbackServer(upper_echo) as echo,
            LoopbackServer(close_first) as first,
            LoopbackServer(reset_after_hello) as resetting,
            agent_and_client(listen, server_class=StreamWatchingAgent) as (server, client),
        ):
            opens = watching(server).opens
            assert client.info.tcp_stream_reuse
            assert await echo_connection(client, echo.port, b"warm up") == TcpStats(7, 7, "closed")
            refused = _free_port()
            for i in range(20):
                payload = b"connection %d " % i * (i + 1)
                assert await echo_connection(client, echo.port, payload) == TcpStats(len(payload), len(payload))
                with pytest.raises(TunnelError) as info:
                    await client.open_tcp(Endpoint.parse(f"127.0.0.1:{refused}"))
                assert info.value.errno_name == "ECONNREFUSED"
                stats = await server_first_connection(client, first.port)
                assert stats == TcpStats(bytes_up=14, bytes_down=11, outcome="closed")
            assert opens == [opens[0]] * 61  # the warm-up's stream carried every one of the 60
            assert echo.accepted == 21
            assert first.accepted == 20
            await asyncio.wait_for(first.handlers_done.wait(), 10)
            assert received_after_fin == [b"after your FIN"] * 20

            assert (await reset_connection(client, resetting.port)).outcome == "reset: ECONNRESET"
            assert await echo_connection(client, echo.port, b"after the reset") == TcpStats(15, 15)
            # The reset stream was not handed out again: the next connection ran on another one.
            assert opens[-2] == opens[0] and opens[-1] != opens[0]

    run(scenario())


def test_concurrent_connections_each_get_their_own_stream(tmp_path: pathlib.Path) -> None:
    """Streams go back to the pool only once their connection ended: connections open at the
    same time never share one, and all their bytes arrive."""

    async def scenario() -> None:
        async with LoopbackServer(upper_echo) as echo, agent_and_client(f"unix:{tmp_path}/a.sock") as (_, client):
            for _round in range(3):
                payloads = [b"%d-" % i * 5000 for i in range(40)]
                results = await asyncio.gather(*(echo_connection(client, echo.port, p) for p in payloads))
                assert results == [TcpStats(len(p), len(p)) for p in payloads]

    run(scenario())


@pytest.mark.parametrize("old", ["agent", "client"])
def test_without_reuse_on_either_side_each_connection_has_its_own_stream(
    old: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent that does not offer reuse (an older one), or a client that does not ask for it
    (an older one): the stream ends with each connection as before, and everything works."""

    async def scenario() -> None:
        received_after_fin.clear()
        if old == "client":
            # An older client never sets TcpOpen.reuse, whatever the agent offers.
            monkeypatch.setattr(client_module, "_parse_info", _parse_info_ignoring_reuse)
        async with (
            LoopbackServer(upper_echo) as echo,
            LoopbackServer(close_first) as first,
            agent_and_client(
                f"unix:{tmp_path}/a.sock", tcp_stream_reuse=old != "agent", server_class=StreamWatchingAgent
            ) as (server, client),
        ):
            assert not client.info.tcp_stream_reuse
            assert await echo_connection(client, echo.port, b"warm up") == TcpStats(7, 7)
            for i in range(5):
                payload = b"connection %d" % i
                assert await echo_connection(client, echo.port, payload) == TcpStats(len(payload), len(payload))
                with pytest.raises(TunnelError) as info:
                    await client.open_tcp(Endpoint.parse(f"127.0.0.1:{_free_port()}"))
                assert info.value.errno_name == "ECONNREFUSED"
                assert (await server_first_connection(client, first.port)) == TcpStats(14, 11)
            # Each connection and each refused dial on a stream of its own.
            opens = watching(server).opens
            assert len(opens) == len(set(opens)) == 16
            await asyncio.wait_for(first.handlers_done.wait(), 10)
            assert received_after_fin == [b"after your FIN"] * 5

    run(scenario())


_parse_info = client_module._parse_info


def _parse_info_ignoring_reuse(reply: rpc.HandshakeReply) -> client_module.AgentInfo:
    info = _parse_info(reply)
    assert info.tcp_stream_reuse  # the agent offers it; this client ignores the offer
    return dataclasses.replace(info, tcp_stream_reuse=False)


def test_wire_frames_of_a_reused_stream(tmp_path: pathlib.Path) -> None:
    """On the wire: ``ended`` after each clean connection (never ``eof`` once the client has
    finished sending), a stream that stays after ``failure``, and a reset that ends it."""

    async def scenario() -> None:
        received_after_fin.clear()
        address = f"unix:{tmp_path}/a.sock"
        async with (
            LoopbackServer(upper_echo) as echo,
            LoopbackServer(close_first) as first,
            LoopbackServer(reset_after_hello) as resetting,
            agent(address, token=TOKEN),
            grpc.aio.insecure_channel(address) as channel,
        ):
            call = rpc.Stub(channel).connect(metadata=rpc.bearer_metadata(TOKEN))

            async def open_(port: int) -> None:
                dest = codec.encode_address(Endpoint.parse(f"127.0.0.1:{port}"))
                await call.write(rpc.TcpClientFrame(open=rpc.TcpOpen(destination=dest, reuse=True)))

            async def frames_until(last: set[str]) -> list[str | None]:
                kinds: list[str | None] = []
                while True:
                    frame = await asyncio.wait_for(call.read(), 10)
                    assert isinstance(frame, rpc.TcpServerFrame)
                    kinds.append(frame.WhichOneof("kind"))
                    if kinds[-1] == "eof":
                        await call.write(rpc.TcpClientFrame(data=b"after your FIN"))
                        await call.write(rpc.TcpClientFrame(shutdown_write=True))
                    if kinds[-1] in last:
                        return kinds

            await open_(echo.port)
            await call.write(rpc.TcpClientFrame(data=b"abc"))
            await call.write(rpc.TcpClientFrame(shutdown_write=True))
            kinds = await frames_until({"ended"})
            assert kinds[0] == "opened" and kinds[-1] == "ended" and "eof" not in kinds

            await open_(_free_port())
            assert await frames_until({"failure", "opened"}) == ["failure"]

            await open_(first.port)
            assert await frames_until({"ended"}) == ["opened", "data", "eof", "ended"]

            await open_(resetting.port)
            await call.write(rpc.TcpClientFrame(data=b"hello"))
            assert await frames_until({"reset"}) == ["opened", "reset"]
            assert await asyncio.wait_for(call.read(), 10) is grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK
            assert received_after_fin == [b"after your FIN"]

    run(scenario())


def test_a_second_open_before_the_connection_ended_is_a_protocol_error(tmp_path: pathlib.Path) -> None:
    """Reuse does not relax the frame order: ``open`` while a connection runs ends the stream."""

    async def scenario() -> None:
        address = f"unix:{tmp_path}/a.sock"
        async with (
            LoopbackServer(upper_echo) as echo,
            agent(address, token=TOKEN),
            grpc.aio.insecure_channel(address) as channel,
        ):
            call = rpc.Stub(channel).connect(metadata=rpc.bearer_metadata(TOKEN))
            dest = codec.encode_address(Endpoint.parse(f"127.0.0.1:{echo.port}"))
            frame = rpc.TcpClientFrame(open=rpc.TcpOpen(destination=dest, reuse=True))
            await call.write(frame)
            first = await asyncio.wait_for(call.read(), 10)
            assert isinstance(first, rpc.TcpServerFrame) and first.WhichOneof("kind") == "opened"
            await call.write(frame)
            assert await asyncio.wait_for(call.code(), 10) == grpc.StatusCode.INVALID_ARGUMENT

    run(scenario())


def test_a_restarted_agent_gets_a_fresh_stream(tmp_path: pathlib.Path) -> None:
    """Streams kept for reuse end with their agent: the next connection runs on a new one."""

    async def scenario() -> None:
        address = f"unix:{tmp_path}/a.sock"
        async with LoopbackServer(upper_echo) as echo:
            client: AgentClient | None = None
            try:
                async with agent(address, StreamWatchingAgent, token=TOKEN) as first:
                    client = await AgentClient.connect(address, TOKEN, timeout=10)
                    assert await echo_connection(client, echo.port, b"one") == TcpStats(3, 3)
                    assert len(watching(first).opens) == 1
                # The agent stopped, ending every stream, the kept ones too.
                async with agent(address, StreamWatchingAgent, token=TOKEN) as second:
                    assert await echo_connection(client, echo.port, b"two") == TcpStats(3, 3)
                    assert len(watching(second).opens) == 1  # on a stream of the new agent
            finally:
                if client is not None:
                    await client.close()

    run(scenario())
