"""A message's datagrams reach the program before what ktrace does besides (pure logic).

A resolver's A and AAAA answers often leave the agent in one message and the program waits
for both; the report's and the DNS map's parse of each answer come after the last one is
delivered (``SessionBase._deliver``, ``followed_up``). Driven through the client's real stream
code with a stand-in for the gRPC call (the ordering is ktrace's own logic; the end-to-end
path is in test_tunnel_udp_mux.py and test_e2e_dns_udp.py).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

import grpc.aio
import pytest
from agent_helpers import run
from ktrace_agent.wire import codec, rpc

from ktrace.tunnel.types import Endpoint
from ktrace.tunnel.udp_mux import MuxSession, _MuxStream
from ktrace_proto import tunnel_v1_pb2

SERVER = Endpoint.parse("10.96.0.10:53")


class _Call:
    """Stands in for a ``DatagramSessions`` call: hands out the messages given, then EOF."""

    def __init__(self, messages: list[rpc.UdpServerFrame]) -> None:
        self._messages: asyncio.Queue[object] = asyncio.Queue()
        for message in messages:
            self._messages.put_nowait(message)
        self._messages.put_nowait(grpc.aio.EOF)
        self.written: list[rpc.UdpClientFrame] = []
        self.cancelled = False

    async def write(self, frame: rpc.UdpClientFrame) -> None:
        self.written.append(frame)

    async def read(self) -> object:
        return await self._messages.get()

    def cancel(self) -> bool:
        self.cancelled = True
        return True


def _datagram(session: int, payload: bytes) -> rpc.UdpServerFrame:
    return rpc.UdpServerFrame(
        datagram=rpc.Datagram(peer=codec.encode_address(SERVER), payload=payload), session=session
    )


def _datagrams(session: int, *payloads: bytes) -> list[rpc.UdpServerFrame]:
    return [_datagram(session, payload) for payload in payloads]


def _opened(session: int) -> rpc.UdpServerFrame:
    local = codec.encode_address(Endpoint.parse(f"10.0.0.5:{40000 + session}"))
    return rpc.UdpServerFrame(opened=tunnel_v1_pb2.UdpOpened(local=local), session=session)


def _frames(*frames: rpc.UdpServerFrame) -> rpc.UdpServerFrame:
    return rpc.UdpServerFrame(frames=rpc.UdpServerFrames(frames=list(frames)))


def _recording(session: MuxSession, events: list[tuple[str, bytes]], fail_after: bytes = b"") -> None:
    def receive(_source: Endpoint, payload: bytes) -> Callable[[], None]:
        events.append(("delivered", payload))

        def after() -> None:
            if payload == fail_after:
                raise RuntimeError("a follow-up that fails")
            events.append(("after", payload))

        return after

    session.set_receiver(receive)


async def _stream_through(messages: list[rpc.UdpServerFrame], sessions: int) -> tuple[_Call, list[MuxSession]]:
    call = _Call(messages)
    stream = _MuxStream(call, lambda _stream: None)  # type: ignore[arg-type]
    opened = [stream.open_session(socket.AF_INET) for _ in range(sessions)]
    return call, opened


def test_every_datagram_of_a_message_is_delivered_before_any_follow_up() -> None:
    async def scenario() -> list[tuple[str, bytes]]:
        events: list[tuple[str, bytes]] = []
        message = _frames(_opened(1), _opened(2), _datagram(1, b"A"), _datagram(2, b"B"), *_datagrams(1, b"C", b"D"))
        call, sessions = await _stream_through([message, _datagram(2, b"E")], 2)
        for session in sessions:
            _recording(session, events)
        async with asyncio.timeout(10):
            while len(events) < 10:
                await asyncio.sleep(0)  # the stream's read loop runs on this same loop
        assert not call.cancelled
        return events

    events = run(scenario())
    assert events == [
        ("delivered", b"A"),
        ("delivered", b"B"),
        ("delivered", b"C"),
        ("delivered", b"D"),
        ("after", b"A"),
        ("after", b"B"),
        ("after", b"C"),
        ("after", b"D"),
        ("delivered", b"E"),
        ("after", b"E"),
    ]


def test_a_failing_follow_up_is_logged_and_the_others_still_run(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> list[tuple[str, bytes]]:
        events: list[tuple[str, bytes]] = []
        _call, sessions = await _stream_through([_frames(_opened(1), *_datagrams(1, b"A", b"B", b"C"))], 1)
        _recording(sessions[0], events, fail_after=b"B")
        async with asyncio.timeout(10):
            while len(events) < 5:
                await asyncio.sleep(0)
        return events

    with caplog.at_level(logging.ERROR, logger="ktrace.tunnel"):
        events = run(scenario())
    assert events == [("delivered", b"A"), ("delivered", b"B"), ("delivered", b"C"), ("after", b"A"), ("after", b"C")]
    assert "follow-up failed" in caplog.text


def test_a_malformed_frame_ends_the_stream_but_what_was_delivered_is_followed_up() -> None:
    async def scenario() -> tuple[list[tuple[str, bytes]], bool, bool]:
        events: list[tuple[str, bytes]] = []
        bad = rpc.UdpServerFrame(datagram=rpc.Datagram(peer=rpc.Address(ip=b"\x01\x02\x03", port=53)), session=1)
        call, sessions = await _stream_through([_frames(_opened(1), _datagram(1, b"A"), bad)], 1)
        _recording(sessions[0], events)
        async with asyncio.timeout(10):
            while not sessions[0].closed.is_set():
                await asyncio.sleep(0)
        return events, call.cancelled, sessions[0].closed.is_set()

    events, cancelled, closed = run(scenario())
    assert events == [("delivered", b"A"), ("after", b"A")]
    assert cancelled and closed
