"""UdpRelays: loopback relays per (program socket, peer), one agent session per program socket."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import pathlib
import socket
from collections.abc import AsyncIterator, Callable

import dns.message
import dns.rrset
import pytest
from agent_helpers import agent_and_client, run

from ktrace.tunnel.dns_answers import addresses_in_answer
from ktrace.tunnel.socket_table import live_udp_inodes
from ktrace.tunnel.types import Endpoint, IPAddress
from ktrace.tunnel.udp_relay import SWEEP_AFTER_NEW_SOCKETS, RelayTotals, UdpRelays


class _Server(asyncio.DatagramProtocol):
    """A loopback UDP server answering with ``reply(payload)``."""

    def __init__(self, reply: Callable[[bytes, tuple[str, int]], None]) -> None:
        self.reply = reply

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.reply(data, addr)


@contextlib.asynccontextmanager
async def udp_server(
    reply: Callable[[asyncio.DatagramTransport, bytes, tuple[str, int]], None], port: int = 0
) -> AsyncIterator[int]:
    holder: list[asyncio.DatagramTransport] = []
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: _Server(lambda data, addr: reply(holder[0], data, addr)), local_addr=("127.0.0.1", port)
    )
    holder.append(transport)
    try:
        yield transport.get_extra_info("sockname")[1]
    finally:
        transport.close()


async def program_socket() -> tuple[socket.socket, asyncio.Queue[tuple[bytes, tuple[str, int]]]]:
    """A UDP socket standing for the program's, with a queue of what it receives."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    received: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

    def readable() -> None:
        with contextlib.suppress(BlockingIOError):
            while True:
                received.put_nowait(sock.recvfrom(65536))

    asyncio.get_running_loop().add_reader(sock.fileno(), readable)
    return sock, received


def _echo(transport: asyncio.DatagramTransport, data: bytes, addr: tuple[str, int]) -> None:
    transport.sendto(data.upper(), addr)


def test_relay_round_trip_and_peer_of(tmp_path: pathlib.Path) -> None:
    async def scenario() -> None:
        async with udp_server(_echo) as port, agent_and_client(f"unix:{tmp_path}/a.sock") as (_, client):
            relays = UdpRelays(client)
            peer = Endpoint.parse(f"127.0.0.1:{port}")
            sock, received = await program_socket()
            try:
                relay = relays.relay_for(7, socket.AF_INET, peer)
                assert relays.relay_for(7, socket.AF_INET, peer) == relay  # stable
                for i in range(3):
                    sock.sendto(b"datagram %d" % i, relay)  # queued while the session opens
                got = sorted([await received.get() for _ in range(3)])
                assert [payload for payload, _ in got] == [b"DATAGRAM 0", b"DATAGRAM 1", b"DATAGRAM 2"]
                assert all(source == relay for _, source in got)
                assert relays.peer_of(socket.AF_INET, relay[1]) == peer
                assert relays.peer_of(socket.AF_INET, 1) is None
                relays.close_socket(7)
                assert relays.peer_of(socket.AF_INET, relay[1]) is None
            finally:
                asyncio.get_running_loop().remove_reader(sock.fileno())
                sock.close()
                await relays.close()

    run(scenario())


def test_reply_from_unknown_peer_gets_its_own_relay(tmp_path: pathlib.Path) -> None:
    """The program sends to A; B answers (A makes B reply to the agent's socket)."""

    async def scenario() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b_sock:
            b_sock.bind(("127.0.0.1", 0))
            b_peer = Endpoint.from_sockaddr(b_sock.getsockname())

            def a_makes_b_answer(_t: asyncio.DatagramTransport, _data: bytes, agent_source: tuple[str, int]) -> None:
                b_sock.sendto(b"from B", agent_source)

            async with (
                udp_server(a_makes_b_answer) as port_a,
                agent_and_client(f"unix:{tmp_path}/a.sock") as (_, client),
            ):
                relays = UdpRelays(client)
                sock, received = await program_socket()
                try:
                    relay_a = relays.relay_for(9, socket.AF_INET, Endpoint.parse(f"127.0.0.1:{port_a}"))
                    sock.sendto(b"hello A", relay_a)
                    payload, source = await received.get()
                    assert payload == b"from B"
                    assert source != relay_a
                    assert relays.peer_of(socket.AF_INET, source[1]) == b_peer
                finally:
                    asyncio.get_running_loop().remove_reader(sock.fileno())
                    sock.close()
                    await relays.close()

    run(scenario())


def _dns_response(name: str, addresses: list[str]) -> bytes:
    query = dns.message.make_query(name, "A")
    response = dns.message.make_response(query)
    for address in addresses:
        kind = "AAAA" if ":" in address else "A"
        response.answer.append(dns.rrset.from_text(name + ".", 30, "IN", kind, address))
    return response.to_wire()


def test_addresses_in_answer() -> None:
    wire = _dns_response("db.default.svc.cluster.local", ["10.96.0.7", "fd00::7"])
    assert addresses_in_answer(wire) == (
        "db.default.svc.cluster.local",
        [ipaddress.ip_address("10.96.0.7"), ipaddress.ip_address("fd00::7")],
    )
    assert addresses_in_answer(dns.message.make_query("x.example", "A").to_wire()) is None  # a query
    assert addresses_in_answer(b"\x00\x01") is None
    assert addresses_in_answer(_dns_response("empty.example", [])) == ("empty.example", [])


def test_dns_answers_are_reported(tmp_path: pathlib.Path) -> None:
    """A DNS server on 127.0.0.1:53 (skipped if the port is taken)."""

    def answer(t: asyncio.DatagramTransport, data: bytes, addr: tuple[str, int]) -> None:
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        response.answer.append(dns.rrset.from_text(query.question[0].name, 30, "IN", "A", "10.96.0.10"))
        t.sendto(response.to_wire(), addr)

    async def scenario() -> None:
        try:
            server = udp_server(answer, port=53)
            await server.__aenter__()
        except OSError:
            pytest.skip("127.0.0.1:53 is taken")
        try:
            async with agent_and_client(f"unix:{tmp_path}/a.sock") as (_, client):
                answers: asyncio.Queue[tuple[str, list[IPAddress]]] = asyncio.Queue()
                relays = UdpRelays(client, on_dns_answer=lambda name, ips: answers.put_nowait((name, ips)))
                sock, received = await program_socket()
                try:
                    relay = relays.relay_for(11, socket.AF_INET, Endpoint.parse("127.0.0.1:53"))
                    sock.sendto(dns.message.make_query("kubernetes.default.svc.cluster.local", "A").to_wire(), relay)
                    assert await answers.get() == (
                        "kubernetes.default.svc.cluster.local",
                        [ipaddress.ip_address("10.96.0.10")],
                    )
                    _, source = await received.get()
                    assert source == relay
                    assert relays.peer_of(socket.AF_INET, relay[1]) == Endpoint.parse("127.0.0.1:53")
                finally:
                    asyncio.get_running_loop().remove_reader(sock.fileno())
                    sock.close()
                    await relays.close()
        finally:
            await server.__aexit__(None, None, None)

    run(scenario())


def test_idle_session_is_reclaimed_and_reopened(tmp_path: pathlib.Path) -> None:
    async def scenario() -> None:
        async with udp_server(_echo) as port, agent_and_client(f"unix:{tmp_path}/a.sock") as (_, client):
            relays = UdpRelays(client, idle_timeout=0.2)
            sock, received = await program_socket()
            try:
                relay = relays.relay_for(5, socket.AF_INET, Endpoint.parse(f"127.0.0.1:{port}"))
                sock.sendto(b"one", relay)
                assert (await received.get())[0] == b"ONE"
                session = relays.session_of(5)
                assert session is not None
                await asyncio.wait_for(session.closed.wait(), 10)  # reclaimed by the idle sweep
                sock.sendto(b"two", relay)  # the relay stays; a new session opens
                assert (await received.get())[0] == b"TWO"
                assert relays.session_of(5) not in (None, session)
            finally:
                asyncio.get_running_loop().remove_reader(sock.fileno())
                sock.close()
                await relays.close()

    run(scenario())


def test_relays_of_closed_program_sockets_are_reclaimed(tmp_path: pathlib.Path) -> None:
    """ktrace never sees close(): the sweep finds program sockets that left the kernel's UDP table."""

    async def scenario() -> None:
        async with udp_server(_echo) as port, agent_and_client(f"unix:{tmp_path}/a.sock") as (_, client):
            gone: list[int] = []
            relays = UdpRelays(client, live_sockets=live_udp_inodes, on_socket_gone=gone.append)
            peer = Endpoint.parse(f"127.0.0.1:{port}")
            kept, kept_received = await program_socket()
            closed, closed_received = await program_socket()
            keys = {name: os.fstat(s.fileno()).st_ino for name, s in (("kept", kept), ("closed", closed))}
            try:
                relay_kept = relays.relay_for(keys["kept"], socket.AF_INET, peer)
                relay_closed = relays.relay_for(keys["closed"], socket.AF_INET, peer)
                pairs = ((kept, relay_kept, kept_received), (closed, relay_closed, closed_received))
                for sock, relay, received in pairs:
                    sock.sendto(b"ping", relay)
                    assert (await received.get())[0] == b"PING"
                asyncio.get_running_loop().remove_reader(closed.fileno())
                closed.close()
                relays.sweep()
                assert gone == [keys["closed"]]
                assert relays.peer_of(socket.AF_INET, relay_closed[1]) is None
                assert relays.peer_of(socket.AF_INET, relay_kept[1]) == peer
                kept.sendto(b"still", relay_kept)
                assert (await kept_received.get())[0] == b"STILL"
            finally:
                asyncio.get_running_loop().remove_reader(kept.fileno())
                kept.close()
                await relays.close()

    run(scenario())


class _Flows:
    """The report's view of the relays (UdpObserver): flows started and ended."""

    def __init__(self) -> None:
        self.started: list[tuple[int, Endpoint]] = []
        self.ended: list[tuple[int, Endpoint, int, int]] = []

    def sent(self, sock_key: int, server: Endpoint, payload: bytes) -> None:
        pass

    def received(self, sock_key: int, server: Endpoint, payload: bytes) -> None:
        pass

    def flow_started(self, sock_key: int, peer: Endpoint) -> None:
        self.started.append((sock_key, peer))

    def flow_ended(self, sock_key: int, peer: Endpoint, totals: RelayTotals) -> None:
        self.ended.append((sock_key, peer, totals.datagrams_up, totals.bytes_up))


def test_sink_hands_what_it_receives_to_a_relay_made_then(tmp_path: pathlib.Path) -> None:
    """A socket connected to port 0 of a peer is connected to the sink, which holds no relay of
    its own; a datagram it nevertheless sends goes on as through a relay of its own: the same
    session, flow and totals (here with a real peer, so that the datagram is seen to arrive)."""

    async def scenario() -> None:
        seen: asyncio.Queue[bytes] = asyncio.Queue()

        def record(_t: asyncio.DatagramTransport, data: bytes, _addr: tuple[str, int]) -> None:
            seen.put_nowait(data)

        async with udp_server(record) as port, agent_and_client(f"unix:{tmp_path}/a.sock") as (_, client):
            flows = _Flows()
            relays = UdpRelays(client, observer=flows)
            peer = Endpoint.parse(f"127.0.0.1:{port}")
            sock, _ = await program_socket()
            try:
                sink = relays.sink_for(socket.AF_INET)
                assert relays.sink_for(socket.AF_INET) == sink  # one per family
                sock.connect(sink)
                relays.connected_to_sink(3, socket.AF_INET, peer, sock.getsockname()[1])
                assert relays.session_of(3) is None and flows.started == []  # nothing made for it yet
                sock.send(b"one")
                sock.send(b"two")
                assert [await seen.get(), await seen.get()] == [b"one", b"two"]
                assert flows.started == [(3, peer)] and relays.session_of(3) is not None
                relays.close_socket(3)
                assert flows.ended == [(3, peer, 2, 6)]
                before = relays.dropped
                sock.send(b"after close")  # the sink no longer knows this socket: dropped

                async def dropped() -> None:
                    while relays.dropped == before:
                        await asyncio.sleep(0.005)  # polling a counter, bounded by wait_for

                await asyncio.wait_for(dropped(), 10)
                assert seen.empty()
            finally:
                asyncio.get_running_loop().remove_reader(sock.fileno())
                sock.close()
                await relays.close()

    run(scenario())


def test_many_new_program_sockets_trigger_a_sweep(tmp_path: pathlib.Path) -> None:
    """Past SWEEP_AFTER_NEW_SOCKETS new program sockets, closed ones are reclaimed at once,
    not at the next periodic sweep."""

    async def scenario() -> None:
        async with agent_and_client(f"unix:{tmp_path}/a.sock") as (_, client):
            gone: list[int] = []
            live: set[int] = set()
            relays = UdpRelays(client, live_sockets=lambda: live, on_socket_gone=gone.append)
            peer = Endpoint.parse("127.0.0.1:9")
            try:
                for key in range(1, SWEEP_AFTER_NEW_SOCKETS):
                    relays.relay_for(key, socket.AF_INET, peer)
                await asyncio.sleep(0)
                assert gone == []  # not yet
                live.add(SWEEP_AFTER_NEW_SOCKETS)  # the newest is still open, the others closed
                relays.relay_for(SWEEP_AFTER_NEW_SOCKETS, socket.AF_INET, peer)
                await asyncio.sleep(0)
                assert sorted(gone) == list(range(1, SWEEP_AFTER_NEW_SOCKETS))
            finally:
                await relays.close()

    run(scenario())
