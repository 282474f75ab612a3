"""The program's keepalive options reach the agent's socket to the destination on every way a
connection travels: a Connect stream (the tunnel), a Connect stream handed over with a ticket,
and the keyed desk line; an agent that does not offer it is sent nothing and keeps working.

A real agent in this process, real loopback connections: the agent's socket is found among this
process's descriptors by its addresses and its options read with getsockopt.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import os
import pathlib
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from agent_helpers import TOKEN, agent, run, spliced
from handler_helpers import until
from ktrace_agent.wire import codec, rpc
from ktrace_agent.wire.values import TcpOptions

from ktrace.tracer import options_follow
from ktrace.tracer.threads import ThreadGroups
from ktrace.tunnel.client import AgentClient
from ktrace.tunnel.types import Endpoint, TcpStats

pytestmark = pytest.mark.timeout(60)

WANTED = TcpOptions(True, 1, 2, 3, 4000)


def agent_socket_options(local: tuple[Any, ...], peer: tuple[Any, ...]) -> TcpOptions | None:
    """The options of this process's TCP socket from ``local`` to ``peer`` (the agent's), or None."""
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = os.dup(int(name))
        except OSError:
            continue
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            continue
        with sock:
            if sock.type != socket.SOCK_STREAM or sock.family != socket.AF_INET:
                continue
            try:
                if sock.getsockname() != local or sock.getpeername() != peer:
                    continue
            except OSError:
                continue
            return options_follow.options_of(sock)
    return None


def has_options(local: tuple[Any, ...], peer: tuple[Any, ...], wanted: TcpOptions) -> bool:
    return agent_socket_options(local, peer) == wanted


# A socket filter that keeps nothing (BPF_RET|BPF_K 0): TCP drops every segment that reaches the
# socket, unanswered (tcp_filter), as if its host had vanished. Attaching one to a TCP socket takes
# CAP_NET_ADMIN on Linux 6.x: the suite runs as root.
SO_ATTACH_FILTER = 26  # asm-generic/socket.h
_DROP_ALL = ctypes.create_string_buffer(struct.pack("=HBBI", 0x06, 0, 0, 0), 8)
DROP_ALL_PROG = struct.pack("@HP", 1, ctypes.addressof(_DROP_ALL))  # struct sock_fprog


def silence(sock: socket.socket) -> None:
    """Everything that reaches ``sock`` is dropped unanswered."""
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, DROP_ALL_PROG)


class Target:
    """A loopback server that keeps each connection open until the client ends it; ``peers``:
    the client addresses it accepted (the agent's sockets). ``silent``: after its first answer it
    goes silent, a socket filter dropping everything that reaches it, as a peer that vanished."""

    def __init__(self, *, silent: bool = False) -> None:
        self.peers: list[tuple[Any, ...]] = []
        self.port = 0
        self.silent = silent

    async def __aenter__(self) -> Target:
        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.peers.append(writer.get_extra_info("peername"))
            with contextlib.suppress(OSError):
                while data := await reader.read(65536):
                    writer.write(data.upper())
                    await writer.drain()
                    if self.silent:
                        silence(writer.get_extra_info("socket"))
            writer.close()

        self._server = await asyncio.start_server(hold, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


@contextlib.asynccontextmanager
async def connected(tmp_path: pathlib.Path, way: str, **agent_kwargs: Any) -> AsyncIterator[AgentClient]:
    handover = way != "tunnel"
    agent_kwargs.setdefault("tcp_desk", way == "desk")
    async with agent(f"unix:{tmp_path}/agent.sock", token=TOKEN, **agent_kwargs) as server:
        client = await AgentClient.connect(server.address, TOKEN, timeout=10, handover=handover)
        try:
            yield client
        finally:
            await client.close()


@pytest.fixture(params=["tunnel", "ticket", "desk"])
def way(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_the_agents_socket_gets_the_options(tmp_path: pathlib.Path, way: str) -> None:
    async def scenario() -> None:
        async with Target() as target, connected(tmp_path, way) as client:
            assert client.info.tcp_options
            for round_ in range(2):  # the second one on a reused stream (or the same line)
                stream = await client.open_tcp(Endpoint.parse(f"127.0.0.1:{target.port}"))
                (p_reader, p_writer), splice = await spliced(stream)
                p_writer.write(b"hi")
                assert await p_reader.readexactly(2) == b"HI"
                peer = target.peers[round_]
                assert agent_socket_options(peer, target.address) == options_follow.kernel_defaults()  # nothing set yet
                stream.set_options(WANTED)
                await until(functools.partial(has_options, peer, target.address, WANTED), "the agent socket's options")
                p_writer.write(b"still")  # the connection goes on as before
                assert await p_reader.readexactly(5) == b"STILL"
                p_writer.write_eof()
                assert await p_reader.read() == b""
                assert (await splice).outcome == "closed"
                stream.set_options(TcpOptions(True, 9, 9, 9, 0))  # ended: nothing is sent, nothing breaks
                p_writer.close()

    run(scenario())


def test_an_agent_that_does_not_offer_it_is_sent_nothing(tmp_path: pathlib.Path, way: str) -> None:
    async def scenario() -> None:
        async with Target() as target, connected(tmp_path, way, tcp_options=False) as client:
            assert not client.info.tcp_options
            stream = await client.open_tcp(Endpoint.parse(f"127.0.0.1:{target.port}"))
            (p_reader, p_writer), splice = await spliced(stream)
            stream.set_options(WANTED)
            p_writer.write(b"hi")
            assert await p_reader.readexactly(2) == b"HI"
            assert agent_socket_options(target.peers[0], target.address) == options_follow.kernel_defaults()
            p_writer.write_eof()
            assert await p_reader.read() == b""
            assert await splice == TcpStats(bytes_up=2, bytes_down=2, outcome="closed")
            p_writer.close()

    run(scenario())


def test_options_for_an_ended_connection_are_ignored_where_open_is_expected(tmp_path: pathlib.Path) -> None:
    """On a Connect stream: an ``options`` frame the client wrote as its connection ended comes
    where the agent waits for the next ``open``; the stream goes on."""

    async def scenario() -> None:
        async with (
            Target() as target,
            agent(f"unix:{tmp_path}/agent.sock", token=TOKEN) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            call = rpc.Stub(channel).connect(metadata=rpc.bearer_metadata(TOKEN))
            await call.write(rpc.TcpClientFrame(options=codec.encode_tcp_options(WANTED)))
            dest = codec.encode_address(Endpoint.parse(f"127.0.0.1:{target.port}"))
            await call.write(rpc.TcpClientFrame(open=rpc.TcpOpen(destination=dest)))
            reply = await call.read()
            assert isinstance(reply, rpc.TcpServerFrame) and reply.WhichOneof("kind") == "opened"
            await call.write(rpc.TcpClientFrame(data=b"ok"))
            answer = await call.read()
            assert isinstance(answer, rpc.TcpServerFrame) and answer.data == b"OK"
            call.cancel()

    run(scenario())


def test_a_peer_gone_silent_times_the_program_out(tmp_path: pathlib.Path, way: str) -> None:
    """The agent's keepalive (the program's options) finds the peer gone: ETIMEDOUT on the agent's
    socket, and then on the program's own (ktrace's part: tracer/options_follow.py)."""

    async def scenario() -> None:
        async with Target(silent=True) as target, connected(tmp_path, way) as client:
            stream = await client.open_tcp(Endpoint.parse(f"127.0.0.1:{target.port}"))
            (p_reader, p_writer), splice = await spliced(stream)
            program = p_writer.get_extra_info("socket")
            follower = options_follow.OptionsFollower(ThreadGroups(), read_after=())
            inode = os.fstat(program.fileno()).st_ino
            follower.follow(os.getpid(), program.fileno(), socket.AF_INET, inode, stream)
            stream.set_options(TcpOptions(True, 1, 1, 1, 0))
            p_writer.write(b"hi")
            assert await p_reader.readexactly(2) == b"HI"
            with pytest.raises(TimeoutError):  # ETIMEDOUT
                await asyncio.wait_for(p_reader.read(), 30)
            assert (await splice).outcome == "reset: ETIMEDOUT"
            follower.close()
            p_writer.close()

    run(scenario())
