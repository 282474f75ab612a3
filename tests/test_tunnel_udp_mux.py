"""UDP sessions multiplexed on DatagramSessions streams, through a real agent to real loopback
UDP servers: many sessions on one stream, each with an agent socket and port of its own;
errors stay with their session; closing frees the agent's socket; a lost stream or a killed
agent ends every session at once; a malformed frame ends the stream, not the agent; the
agent's caps; and an agent without multiplexing (or of another protocol) refused at the handshake."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import signal
import socket
import subprocess
from typing import Any

import grpc
import grpc.aio
import pytest
from agent_helpers import (
    TOKEN,
    UdpEcho,
    agent,
    agent_and_client,
    agent_command,
    end_process,
    run,
    udp_echo,
    wait_for_line,
)
from ktrace_agent import udp_mux
from ktrace_agent.server import AgentServer
from ktrace_agent.udp_socket import QUEUE_DATAGRAMS
from ktrace_agent.wire import PROTOCOL_VERSION, codec, rpc

from ktrace import __version__
from ktrace.tunnel import client as client_module
from ktrace.tunnel.client import AgentClient
from ktrace.tunnel.types import AgentUnavailable, Endpoint, TunnelError
from ktrace.tunnel.udp_mux import MuxSession
from ktrace.tunnel.udp_session import Session

DEADLINE = 10.0


class StreamCountingAgent(AgentServer):
    """The real agent, counting the UDP streams it served: what multiplexing changes, seen where
    it happens."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.session_streams = 0  # DatagramSessions: shared by many sessions

    async def DatagramSessions(self, request_iterator: object, context: rpc.UdpContext) -> None:
        self.session_streams += 1
        await super().DatagramSessions(request_iterator, context)


def counting(server: AgentServer) -> StreamCountingAgent:
    assert isinstance(server, StreamCountingAgent)
    return server


async def _echo_server() -> tuple[asyncio.DatagramTransport, UdpEcho, Endpoint]:
    """Answers every datagram with ``<payload upper-cased> from <source port>``."""
    transport, protocol, port = await udp_echo(tell_source=True)
    return transport, protocol, Endpoint.parse(f"127.0.0.1:{port}")


def _closed_port() -> Endpoint:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return Endpoint.parse(f"127.0.0.1:{s.getsockname()[1]}")


class _Inbox:
    """What one session received, and the errors it heard."""

    def __init__(self, session: Session) -> None:
        self.datagrams: asyncio.Queue[tuple[Endpoint, bytes]] = asyncio.Queue()
        self.errors: asyncio.Queue[TunnelError] = asyncio.Queue()
        self.peer_errors: asyncio.Queue[tuple[Endpoint, str]] = asyncio.Queue()
        session.set_receiver(lambda source, payload: self.datagrams.put_nowait((source, payload)))
        session.set_error_receiver(self.errors.put_nowait)
        session.set_peer_error_receiver(lambda peer, error: self.peer_errors.put_nowait((peer, error.errno_name)))

    async def next(self) -> tuple[Endpoint, bytes]:
        return await asyncio.wait_for(self.datagrams.get(), DEADLINE)


def _port_in_use(port: int) -> bool:
    """Whether a UDP socket holds ``port`` on the wildcard address (where the agent binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return True
        return False


async def _until(condition: Any, what: str) -> None:
    async with asyncio.timeout(DEADLINE):
        while not condition():
            await asyncio.sleep(0.005)  # polling a state of the other side, with a deadline
    assert condition(), what


def test_many_sessions_share_one_stream_each_with_its_own_agent_socket(tmp_path: pathlib.Path) -> None:
    """40 sessions, started at once and used together: one stream, 40 agent ports, every
    answer routed to the session that asked; closing a session frees its agent socket."""

    async def scenario() -> None:
        transport, echo, dest = await _echo_server()
        try:
            async with agent_and_client(f"unix:{tmp_path}/a.sock", server_class=StreamCountingAgent) as (
                server,
                client,
            ):
                sessions = [client.start_udp(socket.AF_INET) for _ in range(40)]
                assert all(isinstance(session, MuxSession) for session in sessions)
                inboxes = [_Inbox(session) for session in sessions]
                for i, session in enumerate(sessions):
                    assert session.send(dest, b"question %d" % i)
                for i, (session, inbox) in enumerate(zip(sessions, inboxes, strict=True)):
                    source, payload = await inbox.next()
                    assert source == dest
                    assert payload == b"QUESTION %d from %d" % (i, session.local.port)
                ports = {session.local.port for session in sessions}
                assert len(ports) == 40  # one agent socket, one random port, per session
                assert {addr[1] for addr in echo.sources} == ports
                assert counting(server).session_streams == 1
                assert server.udp_sessions.open >= 40  # the spares opened ahead of need too

                # A second round on the same sessions: still one stream, still their own ports.
                for i, session in enumerate(sessions):
                    session.send(dest, b"again %d" % i)
                for i, (session, inbox) in enumerate(zip(sessions, inboxes, strict=True)):
                    assert (await inbox.next())[1] == b"AGAIN %d from %d" % (i, session.local.port)

                closing = sessions[:20]
                assert all(_port_in_use(session.local.port) for session in closing)
                open_before = server.udp_sessions.open
                for session in closing:
                    await session.close()
                await _until(lambda: server.udp_sessions.open == open_before - 20, "the agent closed 20 sessions")
                await _until(
                    lambda: not any(_port_in_use(session.local.port) for session in closing),
                    "the closed sessions' ports are free",
                )
                assert not closing[0].send(dest, b"after close")
                for i, session in enumerate(sessions[20:]):
                    session.send(dest, b"still %d" % i)
                    assert (await inboxes[20 + i].next())[1] == b"STILL %d from %d" % (i, session.local.port)
                assert counting(server).session_streams == 1
        finally:
            transport.close()

    run(scenario())


def test_an_error_on_one_session_leaves_the_others_alone(tmp_path: pathlib.Path) -> None:
    """A port unreachable reaches only the session whose datagram caused it; a refused open
    (the agent's cap) ends only that session."""

    async def scenario() -> None:
        transport, _echo, dest = await _echo_server()
        try:
            async with agent_and_client(f"unix:{tmp_path}/a.sock", server_class=StreamCountingAgent) as (
                server,
                client,
            ):
                first, second = await client.open_udp(socket.AF_INET), await client.open_udp(socket.AF_INET)
                one, two = _Inbox(first), _Inbox(second)
                nobody = _closed_port()
                first.send(nobody, b"nobody home")
                assert await asyncio.wait_for(one.peer_errors.get(), DEADLINE) == (nobody, "ECONNREFUSED")
                second.send(dest, b"fine")
                assert (await two.next())[1] == b"FINE from %d" % second.local.port
                first.send(dest, b"first survives")
                assert (await one.next())[1] == b"FIRST SURVIVES from %d" % first.local.port
                assert two.peer_errors.empty() and two.errors.empty() and one.errors.empty()

                # The agent's cap on sessions: the next open is refused, only that one.
                server.udp_sessions.limit = server.udp_sessions.open
                with pytest.raises(TunnelError) as refused:
                    await client.open_udp(socket.AF_INET)
                assert refused.value.errno_name == "EMFILE"
                second.send(dest, b"second survives")
                assert (await two.next())[1] == b"SECOND SURVIVES from %d" % second.local.port
                server.udp_sessions.limit = 1_000_000
                third = await client.open_udp(socket.AF_INET)
                three = _Inbox(third)
                third.send(dest, b"room again")
                assert (await three.next())[1] == b"ROOM AGAIN from %d" % third.local.port
                assert counting(server).session_streams == 1
        finally:
            transport.close()

    run(scenario())


def test_the_per_stream_cap_refuses_only_the_session_beyond_it(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        transport, _echo, dest = await _echo_server()
        monkeypatch.setattr("ktrace_agent.udp_mux.MAX_SESSIONS_PER_STREAM", 3)
        try:
            async with (
                agent(f"unix:{tmp_path}/a.sock", token=TOKEN),
                grpc.aio.insecure_channel(f"unix:{tmp_path}/a.sock") as channel,
            ):
                call = rpc.Stub(channel).datagram_sessions(metadata=rpc.bearer_metadata(TOKEN))
                opens = [_open(n) for n in (1, 2, 3, 4)]
                await call.write(rpc.UdpClientFrame(frames=rpc.UdpClientFrames(frames=opens)))
                answers = await _read_frames(call, 4)
                assert [(f.session, f.WhichOneof("kind")) for f in answers] == [
                    (1, "opened"),
                    (2, "opened"),
                    (3, "opened"),
                    (4, "refused"),
                ]
                assert answers[3].refused.errno_name == "EMFILE"
                await call.write(_datagram(3, dest, b"three"))
                (answer,) = await _read_frames(call, 1)
                assert (answer.session, answer.datagram.payload) == (3, b"THREE from %d" % answers[2].opened.local.port)
                await call.write(rpc.UdpClientFrame(close=True, session=1))
                await call.write(_open(5))
                (fifth,) = await _read_frames(call, 1)
                assert (fifth.session, fifth.WhichOneof("kind")) == (5, "opened")
                call.cancel()
        finally:
            transport.close()

    run(scenario())


def _open(number: int, family: int = rpc.FAMILY_INET) -> rpc.UdpClientFrame:
    request = rpc.UdpOpen()
    request.family = family  # type: ignore[assignment]  # any number, also one no Family names
    return rpc.UdpClientFrame(open=request, session=number)


def _datagram(number: int, dest: Endpoint, payload: bytes) -> rpc.UdpClientFrame:
    return rpc.UdpClientFrame(datagram=rpc.Datagram(peer=codec.encode_address(dest), payload=payload), session=number)


async def _read_frames(call: rpc.UdpCall, count: int) -> list[rpc.UdpServerFrame]:
    """The next ``count`` frames, ``frames`` messages unpacked."""
    frames: list[rpc.UdpServerFrame] = []
    while len(frames) < count:
        message = await asyncio.wait_for(call.read(), DEADLINE)
        assert isinstance(message, rpc.UdpServerFrame)
        if message.WhichOneof("kind") == "frames":
            frames.extend(message.frames.frames)
        else:
            frames.append(message)
    return frames


def test_wire_frames_waiting_together_travel_together(tmp_path: pathlib.Path) -> None:
    """Two sessions opened and used in one message; the answers of both come back in one
    ``frames`` message when they wait together; datagrams for a closed or never opened
    session are dropped without ending the stream."""

    async def scenario() -> None:
        transport, _echo, dest = await _echo_server()
        try:
            async with (
                agent(f"unix:{tmp_path}/a.sock", token=TOKEN),
                grpc.aio.insecure_channel(f"unix:{tmp_path}/a.sock") as channel,
            ):
                call = rpc.Stub(channel).datagram_sessions(metadata=rpc.bearer_metadata(TOKEN))
                first = [_open(7), _open(9), _datagram(7, dest, b"a"), _datagram(9, dest, b"b")]
                await call.write(rpc.UdpClientFrame(frames=rpc.UdpClientFrames(frames=first)))
                frames = await _read_frames(call, 4)
                opened = {f.session: f.opened.local.port for f in frames if f.WhichOneof("kind") == "opened"}
                assert set(opened) == {7, 9} and opened[7] != opened[9]
                answers = {f.session: f.datagram.payload for f in frames if f.WhichOneof("kind") == "datagram"}
                assert answers == {7: b"A from %d" % opened[7], 9: b"B from %d" % opened[9]}

                # Both answers waiting on the agent at once leave in one message.
                await call.write(rpc.UdpClientFrame(close=True, session=9))
                await call.write(_datagram(9, dest, b"closed"))
                await call.write(_datagram(11, dest, b"never opened"))
                batch = [_datagram(7, dest, b"x%d" % i) for i in range(20)]
                await call.write(rpc.UdpClientFrame(frames=rpc.UdpClientFrames(frames=batch)))
                got = await _read_frames(call, 20)
                assert {(f.session, f.datagram.payload) for f in got} == {
                    (7, b"X%d from %d" % (i, opened[7])) for i in range(20)
                }
                assert _port_in_use(opened[7])

                # Opens sent together are answered together: one message, whatever the load.
                await call.write(
                    rpc.UdpClientFrame(frames=rpc.UdpClientFrames(frames=[_open(n) for n in (21, 22, 23, 24)]))
                )
                message = await asyncio.wait_for(call.read(), DEADLINE)
                assert isinstance(message, rpc.UdpServerFrame) and message.WhichOneof("kind") == "frames"
                assert [(f.session, f.WhichOneof("kind")) for f in message.frames.frames] == [
                    (n, "opened") for n in (21, 22, 23, 24)
                ]
                assert len({f.opened.local.port for f in message.frames.frames}) == 4
                call.cancel()
        finally:
            transport.close()

    run(scenario())


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(rpc.UdpClientFrame(open=rpc.UdpOpen(family=rpc.FAMILY_INET)), id="session-0"),
        pytest.param(_open(1), id="open-twice"),
        pytest.param(
            rpc.UdpClientFrame(datagram=rpc.Datagram(peer=rpc.Address(ip=b"\x01\x02\x03", port=53)), session=1),
            id="bad-address",
        ),
        pytest.param(
            rpc.UdpClientFrame(frames=rpc.UdpClientFrames(frames=[rpc.UdpClientFrame(frames=rpc.UdpClientFrames())])),
            id="nested-frames",
        ),
        pytest.param(_open(2, family=7), id="unknown-family"),
    ],
)
def test_a_malformed_frame_ends_the_stream_and_its_sessions_not_the_agent(
    bad: rpc.UdpClientFrame, tmp_path: pathlib.Path
) -> None:
    async def scenario() -> None:
        transport, _echo, dest = await _echo_server()
        try:
            async with (
                agent(f"unix:{tmp_path}/a.sock", token=TOKEN) as server,
                grpc.aio.insecure_channel(f"unix:{tmp_path}/a.sock") as channel,
            ):
                call = rpc.Stub(channel).datagram_sessions(metadata=rpc.bearer_metadata(TOKEN))
                await call.write(_open(1))
                (opened,) = await _read_frames(call, 1)
                assert opened.WhichOneof("kind") == "opened"
                await call.write(bad)
                assert await asyncio.wait_for(call.code(), DEADLINE) == grpc.StatusCode.INVALID_ARGUMENT
                await _until(lambda: server.udp_sessions.open == 0, "the stream's sessions were closed")
                await _until(lambda: not _port_in_use(opened.opened.local.port), "its socket is closed")

                client = await AgentClient.connect(server.address, TOKEN, timeout=DEADLINE)
                try:
                    session = await client.open_udp(socket.AF_INET)
                    inbox = _Inbox(session)
                    session.send(dest, b"agent still here")
                    assert (await inbox.next())[1] == b"AGENT STILL HERE from %d" % session.local.port
                finally:
                    await client.close()
        finally:
            transport.close()

    run(scenario())


def test_a_lost_stream_ends_every_session_at_once_and_the_next_gets_a_new_one(tmp_path: pathlib.Path) -> None:
    async def scenario() -> None:
        transport, _echo, dest = await _echo_server()
        address = f"unix:{tmp_path}/a.sock"
        client: AgentClient | None = None
        try:
            async with agent(address, StreamCountingAgent, token=TOKEN) as server:
                client = await AgentClient.connect(address, TOKEN, timeout=DEADLINE)
                sessions = [await client.open_udp(socket.AF_INET) for _ in range(5)]
                await server.stop(grace=None)
                for session in sessions:
                    await asyncio.wait_for(session.closed.wait(), DEADLINE)
                    assert not session.send(dest, b"lost")
                await server.start()
                session = await client.open_udp(socket.AF_INET)
                inbox = _Inbox(session)
                session.send(dest, b"new stream")
                assert (await inbox.next())[1] == b"NEW STREAM from %d" % session.local.port
                assert counting(server).session_streams == 2
        finally:
            if client is not None:
                await client.close()
            transport.close()

    run(scenario())


def test_a_session_started_while_the_agent_is_away_waits_for_it(tmp_path: pathlib.Path) -> None:
    """While the tunnel is down (the agent restarting, a port-forward reconnecting) a new
    session's stream waits for it, as a connect does, instead of failing at once: the program's
    datagrams leave when the agent is back, not after a resolver's 5 s retry."""

    async def scenario() -> None:
        transport, _echo, dest = await _echo_server()
        address = f"unix:{tmp_path}/a.sock"
        client: AgentClient | None = None
        try:
            async with agent(address, token=TOKEN) as server:
                client = await AgentClient.connect(address, TOKEN, timeout=DEADLINE)
                first = await client.open_udp(socket.AF_INET)
                await server.stop(grace=None)
                await asyncio.wait_for(first.closed.wait(), DEADLINE)
                # Until gRPC has given up on the agent for now, even a call that does not wait
                # for it would be queued: wait for the state where such a call fails at once.
                channel = client._channel
                while (state := channel.get_state(try_to_connect=True)) != grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                    await asyncio.wait_for(channel.wait_for_state_change(state), DEADLINE)
                session = client.start_udp(socket.AF_INET)
                inbox = _Inbox(session)
                assert session.send(dest, b"while away")
                await server.start()
                _source, payload = await inbox.next()
                assert payload == b"WHILE AWAY from %d" % session.local.port
                assert inbox.errors.empty()
        finally:
            if client is not None:
                await client.close()
            transport.close()

    run(scenario())


def test_a_killed_agent_fails_sessions_promptly_even_unanswered_ones(tmp_path: pathlib.Path) -> None:
    """SIGKILL of a real agent process: answered sessions close, one still waiting for its
    answer hears the loss (never hangs)."""
    (tmp_path / "token").write_text(TOKEN + "\n")
    proc = subprocess.Popen(
        agent_command("--listen", f"unix:{tmp_path}/a.sock", "--token-file", str(tmp_path / "token")),
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_line(proc, "listening on", deadline=30)

        async def scenario() -> None:
            transport, _echo, dest = await _echo_server()
            client = await AgentClient.connect(f"unix:{tmp_path}/a.sock", TOKEN, timeout=DEADLINE)
            try:
                answered = [await client.open_udp(socket.AF_INET) for _ in range(3)]
                proc.send_signal(signal.SIGSTOP)  # the next open cannot be answered
                waiting = client.start_udp(socket.AF_INET6)
                inbox = _Inbox(waiting)
                waiting.send(dest, b"into the void")
                proc.kill()
                for session in [*answered, waiting]:
                    await asyncio.wait_for(session.closed.wait(), DEADLINE)
                await asyncio.wait_for(waiting.until_answered(), DEADLINE)
                assert waiting.local_port is None
                assert (await asyncio.wait_for(inbox.errors.get(), DEADLINE)).errno_name == "EIO"
            finally:
                await client.close()
                transport.close()

        run(scenario())
    finally:
        end_process(proc)


class AgentOfAnotherKind(AgentServer):
    """The real agent, answering the handshake as an agent of another protocol version, or one
    without multiplexing, would."""

    def __init__(self, *args: Any, protocol: int = PROTOCOL_VERSION, multiplex: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.protocol = protocol
        self.multiplex = multiplex

    async def Handshake(self, request: rpc.HandshakeRequest, context: rpc.HandshakeContext) -> rpc.HandshakeReply:
        reply = await super().Handshake(request, context)
        reply.protocol_version = self.protocol
        reply.udp_multiplex = self.multiplex
        return reply


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (
            {"protocol": PROTOCOL_VERSION - 1, "multiplex": False},
            f"speaks tunnel protocol {PROTOCOL_VERSION - 1}, ktrace {__version__} speaks {PROTOCOL_VERSION}",
        ),
        ({"protocol": PROTOCOL_VERSION + 1}, f"speaks tunnel protocol {PROTOCOL_VERSION + 1}, ktrace"),
        ({"multiplex": False}, f"does not offer DatagramSessions, which ktrace {__version__} needs"),
    ],
    ids=["older", "newer", "no-multiplex"],
)
def test_an_agent_without_multiplexing_or_of_another_protocol_is_refused_at_the_handshake(
    kind: dict[str, Any], expected: str, tmp_path: pathlib.Path
) -> None:
    """No fallback: one line that names the agent to use."""

    async def scenario() -> None:
        address = f"unix:{tmp_path}/a.sock"
        async with agent(address, AgentOfAnotherKind, token=TOKEN, **kind):
            with pytest.raises(AgentUnavailable) as refused:
                await AgentClient.connect(address, TOKEN, timeout=DEADLINE)
        line = str(refused.value)
        assert "\n" not in line
        assert line.startswith(f"the agent at {address} (ktrace-agent {__version__}) ")
        assert expected in line
        assert line.endswith(f"(hint: use the agent of ktrace {__version__}; `ktrace image build` makes its image)")

    run(scenario())


def test_an_unauthenticated_stream_is_rejected(tmp_path: pathlib.Path) -> None:
    async def scenario() -> None:
        address = f"unix:{tmp_path}/a.sock"
        async with agent(address, token=TOKEN) as server, grpc.aio.insecure_channel(address) as channel:
            call = rpc.Stub(channel).datagram_sessions(metadata=rpc.bearer_metadata("wrong"))
            with contextlib.suppress(grpc.aio.AioRpcError):  # the agent may have ended it already
                await call.write(_open(1))
            assert await asyncio.wait_for(call.code(), DEADLINE) == grpc.StatusCode.UNAUTHENTICATED
            assert isinstance(server, AgentServer) and server.udp_sessions.open == 0

    run(scenario())


def test_ktrace_ending_closes_every_agent_socket(tmp_path: pathlib.Path) -> None:
    """The client closing (ktrace's shutdown) ends the stream: the agent closes the sockets of
    all sessions on it, spares included."""

    async def scenario() -> None:
        transport, _echo, dest = await _echo_server()
        try:
            async with agent(f"unix:{tmp_path}/a.sock", token=TOKEN) as server:
                client = await AgentClient.connect(server.address, TOKEN, timeout=DEADLINE)
                sessions = [client.start_udp(socket.AF_INET) for _ in range(6)]
                inboxes = [_Inbox(session) for session in sessions]
                for session in sessions:
                    session.send(dest, b"hi")
                for inbox in inboxes:
                    await inbox.next()
                ports = [session.local.port for session in sessions]
                assert server.udp_sessions.open >= 6
                await client.close()
                await _until(lambda: server.udp_sessions.open == 0, "the agent closed every session")
                await _until(lambda: not any(_port_in_use(port) for port in ports), "their ports are free")
        finally:
            transport.close()

    run(scenario())


def test_spares_on_a_shared_stream_are_replaced_several_at_a_time(tmp_path: pathlib.Path) -> None:
    """Spares are taken down to the low mark before they are replaced, then all at once (their
    opens leave as one message); every spare handed out has its own answered agent socket."""

    async def scenario() -> None:
        transport, echo, dest = await _echo_server()
        try:
            async with agent_and_client(f"unix:{tmp_path}/a.sock") as (server, client):
                size, low = client_module.SPARE_UDP_SESSIONS, client_module.SPARE_UDP_LOW
                assert 0 < low < size - 1
                first = client.start_udp(socket.AF_INET)  # none spare yet: opened now, spares follow
                await asyncio.sleep(0)  # one loop turn: with none left, the refill is at once
                spares = client._udp_sessions.idle(socket.AF_INET)
                assert len(spares) == size
                taken = [first]
                for left in range(size - 1, low, -1):
                    taken.append(client.start_udp(socket.AF_INET))
                    await asyncio.sleep(0)
                    assert len(client._udp_sessions.idle(socket.AF_INET)) == left  # not replaced yet
                taken.append(client.start_udp(socket.AF_INET))  # down to the low mark: replaced later
                assert taken[1:] == list(spares[: len(taken) - 1])
                await _until(lambda: len(client._udp_sessions.idle(socket.AF_INET)) == size, "refilled to size")
                inboxes = [_Inbox(session) for session in taken]
                for i, session in enumerate(taken):
                    session.send(dest, b"spare %d" % i)
                for i, (session, inbox) in enumerate(zip(taken, inboxes, strict=True)):
                    assert (await inbox.next())[1] == b"SPARE %d from %d" % (i, session.local.port)
                assert len({addr[1] for addr in echo.sources}) == len(taken)
                assert server.udp_sessions.open == len(taken) + size
        finally:
            transport.close()

    run(scenario())


def test_a_client_that_leaves_its_answers_unread_cannot_grow_the_agent_without_bound(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Answers to ``open`` are never dropped, so their queue is bounded another way: a stream
    that opens sessions while that many answers wait unread (its peer stopped reading) ends."""
    monkeypatch.setattr("ktrace_agent.udp_mux.QUEUE_ANSWERS", 0)  # every answer counts as unread

    async def scenario() -> None:
        async with (
            agent(f"unix:{tmp_path}/a.sock", token=TOKEN) as server,
            grpc.aio.insecure_channel(f"unix:{tmp_path}/a.sock") as channel,
        ):
            call = rpc.Stub(channel).datagram_sessions(metadata=rpc.bearer_metadata(TOKEN))
            with contextlib.suppress(grpc.aio.AioRpcError):
                await call.write(_open(1))
            assert await asyncio.wait_for(call.code(), DEADLINE) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert server.udp_sessions.open == 0

    run(scenario())


def test_the_agents_outbox_bounds_per_session_and_per_stream() -> None:
    """Pure queue logic: received datagrams are bounded per session and per stream, answers to
    ``open`` always fit and are counted until taken; what is taken leaves in order."""

    async def scenario() -> None:
        outbox = udp_mux._Outbox()
        datagram = rpc.Datagram(peer=codec.encode_address(Endpoint.parse("10.0.0.1:53")), payload=b"x")
        assert outbox.put(rpc.UdpServerFrame(opened=rpc.UdpOpened(), session=1), counted=False)
        per_session = [outbox.put(rpc.UdpServerFrame(datagram=datagram, session=1)) for _ in range(600)]
        assert per_session.count(True) == QUEUE_DATAGRAMS
        others = [
            outbox.put(rpc.UdpServerFrame(datagram=datagram, session=n))
            for n in range(2, 10)
            for _ in range(QUEUE_DATAGRAMS)
        ]
        assert others.count(True) == udp_mux.QUEUE_FRAMES - QUEUE_DATAGRAMS
        assert outbox.put(rpc.UdpServerFrame(refused=rpc.Failure(), session=99), counted=False)
        assert outbox.answers == 2
        taken: list[rpc.UdpServerFrame] = []
        while len(taken) < udp_mux.QUEUE_FRAMES + 2:
            taken += await outbox.take()
        assert outbox.answers == 0
        assert (taken[0].session, taken[0].WhichOneof("kind")) == (1, "opened")
        assert (taken[-1].session, taken[-1].WhichOneof("kind")) == (99, "refused")
        assert outbox.put(rpc.UdpServerFrame(datagram=datagram, session=1))  # room again

    run(scenario())
