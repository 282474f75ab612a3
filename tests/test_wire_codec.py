"""The wire's one codec (ktrace_agent.wire.codec), as a table, as properties, and from both ends:
ktrace's client and the real agent over a real channel. The rule (the proto's): an IPv4-mapped IPv6
address travels as IPv4, whichever side encodes it, and is read as IPv4 when it arrives mapped anyway."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import pathlib
import socket

import grpc
import grpc.aio
import pytest
from agent_helpers import TOKEN, LoopbackServer, agent, agent_and_client, local_pair, run, udp_echo, upper_echo
from hypothesis import given
from hypothesis import strategies as st
from ktrace_agent.wire import codec, rpc
from ktrace_agent.wire.errnos import errno_name, errno_number
from ktrace_agent.wire.values import Endpoint, IPAddress, TunnelError

from ktrace.tunnel.types import Endpoint as TunnelEndpoint

DEADLINE = 10.0
MAPPED_PREFIX = bytes(10) + b"\xff\xff"


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


@pytest.mark.parametrize(
    ("given_ip", "wire_ip", "read_back"),
    [
        ("10.0.0.1", "0a000001", "10.0.0.1"),
        ("::ffff:10.0.0.1", "0a000001", "10.0.0.1"),  # v4-mapped travels as IPv4
        ("::ffff:0.0.0.0", "00000000", "0.0.0.0"),
        ("::ffff:255.255.255.255", "ffffffff", "255.255.255.255"),
        ("::1", "00000000000000000000000000000001", "::1"),
        ("::", "00000000000000000000000000000000", "::"),
        ("fd00:96::1:10", "fd000096000000000000000000010010", "fd00:96::1:10"),
        ("::a00:1", "0000000000000000000000000a000001", "::a00:1"),  # IPv4-compatible: not mapped
        ("64:ff9b::a00:1", "0064ff9b0000000000000000" + "0a000001", "64:ff9b::a00:1"),  # NAT64: not mapped
        ("::ffff:0:a00:1", "0000000000000000ffff00000a000001", "::ffff:0:a00:1"),  # IPv4-translated: not mapped
    ],
)
def test_address_table(given_ip: str, wire_ip: str, read_back: str) -> None:
    endpoint = Endpoint(ip(given_ip), 443)
    encoded = codec.encode_address(endpoint)
    assert (encoded.ip.hex(), encoded.port) == (wire_ip, 443)
    assert codec.decode_address(encoded) == Endpoint(ip(read_back), 443)
    assert codec.encode_ip(endpoint.ip).hex() == wire_ip
    assert codec.decode_ip(bytes.fromhex(wire_ip)) == ip(read_back)


@pytest.mark.parametrize(
    ("raw", "port", "expected"),
    [
        (bytes([127, 0, 0, 1]), 0, Endpoint(ip("127.0.0.1"), 0)),
        (MAPPED_PREFIX + bytes([127, 0, 0, 1]), 53, Endpoint(ip("127.0.0.1"), 53)),  # sent mapped anyway
        (bytes(15) + b"\x01", 65535, Endpoint(ip("::1"), 65535)),
        (b"", 80, "0 bytes"),
        (bytes(3), 80, "3 bytes"),
        (bytes(5), 80, "5 bytes"),
        (bytes(15), 80, "15 bytes"),
        (bytes(17), 80, "17 bytes"),
        (bytes(4), 65536, "port 65536"),
        (bytes(16), 1 << 31, "port"),
    ],
)
def test_decoding_table(raw: bytes, port: int, expected: Endpoint | str) -> None:
    address = rpc.Address(ip=raw, port=port)
    if isinstance(expected, Endpoint):
        assert codec.decode_address(address) == expected
    else:
        with pytest.raises(codec.AddressError, match=expected):
            codec.decode_address(address)


def _normal(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@given(st.ip_addresses(), st.integers(0, 65535))
def test_what_one_side_encodes_the_other_decodes_as_the_rule_says(address: IPAddress, port: int) -> None:
    # Through the bytes a message is on the wire, as the other process parses them.
    sent = codec.encode_address(Endpoint(address, port)).SerializeToString()
    received = codec.decode_address(rpc.Address.FromString(sent))
    assert received == Endpoint(_normal(address), port)
    assert codec.decode_address(codec.encode_address(received)) == received  # the rule is stable
    assert len(codec.encode_ip(address)) == (4 if _normal(address).version == 4 else 16)


@given(st.binary(min_size=16, max_size=16))
def test_sixteen_bytes_read_as_ipv4_exactly_when_mapped(raw: bytes) -> None:
    decoded = codec.decode_ip(raw)
    assert (decoded.version == 4) == raw.startswith(MAPPED_PREFIX)
    assert decoded.packed == (raw[12:] if raw.startswith(MAPPED_PREFIX) else raw)


@given(st.binary(max_size=20).filter(lambda b: len(b) not in (4, 16)))
def test_other_lengths_are_refused(raw: bytes) -> None:
    with pytest.raises(codec.AddressError):
        codec.decode_address(rpc.Address(ip=raw, port=1))


def test_the_tunnel_and_the_wire_share_one_endpoint_type() -> None:
    assert TunnelEndpoint is Endpoint


@pytest.mark.parametrize(
    ("sockaddr", "wire_ip"),
    [
        (("10.0.0.1", 5), "0a000001"),
        (("::ffff:10.0.0.1", 5, 0, 0), "0a000001"),  # an AF_INET6 socket's IPv4 peer
        (("fe80::1%eth0", 5, 0, 2), "fe800000000000000000000000000001"),  # scope id dropped
    ],
)
def test_socket_addresses(sockaddr: tuple[object, ...], wire_ip: str) -> None:
    assert codec.encode_sockaddr(sockaddr) == rpc.Address(ip=bytes.fromhex(wire_ip), port=5)


@pytest.mark.parametrize(
    ("endpoint", "family", "sockaddr"),
    [
        ("10.0.0.1:53", socket.AF_INET, ("10.0.0.1", 53)),
        ("10.0.0.1:53", socket.AF_INET6, ("::ffff:10.0.0.1", 53)),  # the socket family decides
        ("[::1]:53", socket.AF_INET6, ("::1", 53)),
    ],
)
def test_sockaddr_for(endpoint: str, family: int, sockaddr: tuple[str, int]) -> None:
    assert codec.sockaddr_for(Endpoint.parse(endpoint), family) == sockaddr


def test_families() -> None:
    assert codec.wire_family(socket.AF_INET) == rpc.FAMILY_INET
    assert codec.wire_family(socket.AF_INET6) == rpc.FAMILY_INET6
    assert codec.socket_family(rpc.FAMILY_INET) == socket.AF_INET
    assert codec.socket_family(rpc.FAMILY_INET6) == socket.AF_INET6
    assert [codec.ip_version(f) for f in (rpc.FAMILY_INET, rpc.FAMILY_INET6)] == [4, 6]
    for unknown in (0, 3, 99):
        assert codec.socket_family(unknown) is None and codec.ip_version(unknown) is None


@pytest.mark.parametrize(
    ("exc", "name", "message"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), "ECONNREFUSED", "connect: Connection refused"),
        (OSError(errno.EHOSTUNREACH, "x"), "EHOSTUNREACH", "connect: No route to host"),
        (TimeoutError(), "ETIMEDOUT", "connect: connection timed out"),
        (OSError(errno.ETIMEDOUT, "x"), "ETIMEDOUT", "connect: Connection timed out"),
        (OSError(), "EIO", "connect: OSError"),
        (RuntimeError("?"), "EIO", "connect: ?"),
    ],
)
def test_failures_both_ways(exc: BaseException, name: str, message: str) -> None:
    assert errno_name(exc) == name
    failure = codec.encode_failure(exc, "connect")
    assert (failure.errno_name, failure.message) == (name, message)
    error = codec.decode_failure(rpc.Failure.FromString(failure.SerializeToString()))
    assert isinstance(error, TunnelError)
    assert (error.errno_name, error.message, error.errno) == (name, message, getattr(errno, name))
    assert codec.decode_failure(rpc.Failure()).errno_name == "EIO"  # names nothing: EIO


@pytest.mark.parametrize(
    ("name", "number"),
    [("ECONNREFUSED", errno.ECONNREFUSED), ("ENOSUCH", -1), ("", -1), ("errorcode", -1), ("EWOULDBLOCK", errno.EAGAIN)],
)
def test_errno_numbers(name: str, number: int) -> None:
    assert errno_number(name, -1) == number


# --- from both ends: ktrace's client and the real agent ---


def test_a_mapped_destination_is_dialled_as_ipv4_and_reported_so(tmp_path: pathlib.Path) -> None:
    """ktrace asks for ``[::ffff:127.0.0.1]:port`` (a program's AF_INET6 socket may name it so):
    it leaves as IPv4, the agent dials IPv4, and the addresses it reports read back as IPv4."""

    async def scenario() -> None:
        async with LoopbackServer(upper_echo) as target, agent_and_client(f"unix:{tmp_path}/a.sock") as (_, client):
            stream = await client.open_tcp(Endpoint(ip("::ffff:127.0.0.1"), target.port), timeout=DEADLINE)
            assert stream.peer == Endpoint(ip("127.0.0.1"), target.port)
            assert stream.local.ip == ip("127.0.0.1")
            (reader, writer), ours = await local_pair()
            splice = asyncio.create_task(stream.splice(ours))
            writer.write(b"over ipv4")
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), DEADLINE) == b"OVER IPV4"
            assert (await asyncio.wait_for(splice, DEADLINE)).outcome == "closed"
            writer.close()

    run(scenario())


def test_the_agent_reads_an_address_sent_mapped_as_ipv4(tmp_path: pathlib.Path) -> None:
    """Another client (or an older codec) that sends 16 mapped bytes: the agent applies the same
    rule, dials and sends over IPv4, and answers with 4-byte addresses."""

    async def scenario() -> None:
        mapped = MAPPED_PREFIX + bytes([127, 0, 0, 1])
        transport, _echo, echo_port = await udp_echo()
        try:
            async with (
                LoopbackServer(upper_echo) as target,
                agent(f"unix:{tmp_path}/a.sock", token=TOKEN) as server,
                grpc.aio.insecure_channel(server.address) as channel,
            ):
                stub, metadata = rpc.Stub(channel), rpc.bearer_metadata(TOKEN)
                tcp = stub.connect(metadata=metadata)
                await tcp.write(
                    rpc.TcpClientFrame(open=rpc.TcpOpen(destination=rpc.Address(ip=mapped, port=target.port)))
                )
                opened = await asyncio.wait_for(tcp.read(), DEADLINE)
                assert isinstance(opened, rpc.TcpServerFrame) and opened.WhichOneof("kind") == "opened"
                assert opened.opened.peer == rpc.Address(ip=bytes([127, 0, 0, 1]), port=target.port)
                tcp.cancel()

                udp = stub.datagram_sessions(metadata=metadata)
                await udp.write(rpc.UdpClientFrame(open=rpc.UdpOpen(family=rpc.FAMILY_INET), session=1))
                peer = rpc.Address(ip=mapped, port=echo_port)
                await udp.write(rpc.UdpClientFrame(datagram=rpc.Datagram(peer=peer, payload=b"ping"), session=1))
                kinds: dict[str, rpc.UdpServerFrame] = {}
                while "datagram" not in kinds:
                    message = await asyncio.wait_for(udp.read(), DEADLINE)
                    assert isinstance(message, rpc.UdpServerFrame)
                    for frame in message.frames.frames if message.WhichOneof("kind") == "frames" else [message]:
                        kinds[str(frame.WhichOneof("kind"))] = frame
                assert set(kinds) == {"opened", "datagram"}  # no EAFNOSUPPORT: it was IPv4
                assert kinds["datagram"].datagram.peer == rpc.Address(ip=bytes([127, 0, 0, 1]), port=echo_port)
                assert kinds["datagram"].datagram.payload == b"PING"
                udp.cancel()
        finally:
            transport.close()

    run(scenario())


def test_an_ipv4_peer_of_an_ipv6_session_reaches_ktrace_as_ipv4(tmp_path: pathlib.Path) -> None:
    """The agent's AF_INET6 socket sees an IPv4 peer as ``::ffff:127.0.0.1``; ktrace reads its
    datagrams' source as ``127.0.0.1``, the address it sent to."""
    if pathlib.Path("/proc/sys/net/ipv6/bindv6only").read_text().strip() != "0" or not socket.has_ipv6:
        pytest.skip("AF_INET6 sockets here are not dual-stack")

    async def scenario() -> None:
        transport, _echo, port = await udp_echo()
        try:
            async with agent_and_client(f"unix:{tmp_path}/a.sock") as (_, client):
                session = await client.open_udp(socket.AF_INET6)
                received: asyncio.Queue[tuple[Endpoint, bytes]] = asyncio.Queue()
                session.set_receiver(lambda source, payload: received.put_nowait((source, payload)))
                dest = Endpoint(ip("127.0.0.1"), port)
                assert session.send(dest, b"dual")
                assert await asyncio.wait_for(received.get(), DEADLINE) == (dest, b"DUAL")
                await session.close()
        finally:
            transport.close()

    run(scenario())
