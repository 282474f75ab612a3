"""The SPDY/3.1 port-forward client: the pure codec (fuzzed) and ``SpdyForward`` against a scripted server.

The real server (the kubelet and containerd behind the API server) is in tests/kube/test_kube_port_forward.py;
here a loopback peer plays the frames a server may send, including the ones it rarely does (PING, RST,
GOAWAY, an unexpected SYN_STREAM), which the cluster cannot be made to send on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import zlib

import pytest
from agent_helpers import run
from hypothesis import given
from hypothesis import strategies as st

from ktrace.kube import spdy
from ktrace.kube.portforward import Data, Failed, ProtocolError
from ktrace.kube.portforward_transports import SpdyForward

pytestmark = pytest.mark.timeout(60)


def control(kind: int, body: bytes, flags: int = 0, version: int = spdy.VERSION) -> bytes:
    return struct.pack(">HHI", 0x8000 | version, kind, flags << 24 | len(body)) + body


def data(stream: int, payload: bytes, fin: bool = False) -> bytes:
    return spdy.data_header(stream, len(payload), fin=fin) + payload


def parse_block(block: bytes) -> list[tuple[str, str]]:
    (count,) = struct.unpack_from(">I", block)
    at, pairs = 4, []
    for _ in range(count):
        texts = []
        for _ in range(2):
            (length,) = struct.unpack_from(">I", block, at)
            texts.append(block[at + 4 : at + 4 + length].decode())
            at += 4 + length
        pairs.append((texts[0], texts[1]))
    assert at == len(block)
    return pairs


def syn_streams(frames: list[spdy.Frame]) -> list[tuple[int, int, list[tuple[str, str]]]]:
    """(stream, flags, headers) of each SYN_STREAM, decompressed as a server does: one zlib stream."""
    inflate = zlib.decompressobj()
    out = []
    for frame in frames:
        if isinstance(frame, spdy.ControlFrame) and frame.kind == spdy.SYN_STREAM:
            stream, associated, priority, slot = struct.unpack_from(">IIBB", frame.body)
            assert (associated, priority, slot) == (0, 0, 0)
            out.append((stream, frame.flags, parse_block(inflate.decompress(frame.body[10:]))))
    return out


def test_syn_streams_share_one_compression_stream() -> None:
    encoder = spdy.Encoder()
    wire = encoder.syn_stream(1, [("StreamType", "error"), ("port", "80")]) + encoder.syn_stream(
        3, [("streamtype", "data"), ("port", "80")], fin=True
    )
    frames = spdy.FrameDecoder().feed(wire)
    assert syn_streams(frames) == [
        (1, 0, [("streamtype", "error"), ("port", "80")]),  # names lower-case, as SPDY requires
        (3, spdy.FLAG_FIN, [("streamtype", "data"), ("port", "80")]),
    ]
    # No preset dictionary: a zlib reader given SPDY's dictionary uses it only if the stream asks for one.
    first = frames[0]
    assert isinstance(first, spdy.ControlFrame)
    assert not first.body[10 + 1] & 0x20  # FDICT clear in the zlib header


def test_data_header_limits() -> None:
    assert spdy.data_header(3, 5, fin=True) == b"\x00\x00\x00\x03\x01\x00\x00\x05"
    for stream, length in ((0, 1), (1 << 31, 1), (3, -1), (3, 1 << 24)):
        with pytest.raises(ValueError):
            spdy.data_header(stream, length)


def test_control_frame_fields() -> None:
    (rst, goaway, ping) = spdy.FrameDecoder().feed(
        spdy.Encoder.rst_stream(3, spdy.RST_CANCEL) + spdy.Encoder.goaway(7, 2) + spdy.Encoder.ping(b"\x00\x00\x00\x02")
    )
    assert isinstance(rst, spdy.ControlFrame) and (rst.kind, rst.stream, rst.status) == (spdy.RST_STREAM, 3, 5)
    assert isinstance(goaway, spdy.ControlFrame) and (goaway.kind, goaway.stream, goaway.status) == (spdy.GOAWAY, 0, 2)
    assert isinstance(ping, spdy.ControlFrame) and (ping.kind, ping.body) == (spdy.PING, b"\x00\x00\x00\x02")


def test_other_versions_are_refused() -> None:
    with pytest.raises(spdy.SpdyError, match="version 2"):
        spdy.FrameDecoder().feed(control(spdy.PING, b"\x00\x00\x00\x01", version=2))


frame_st = st.one_of(
    st.builds(
        lambda s, p, f: spdy.DataFrame(s, f, p), st.integers(1, spdy.MAX_STREAM), st.binary(max_size=300), st.booleans()
    ),
    st.builds(spdy.ControlFrame, st.integers(1, 11), st.integers(0, 255), st.binary(max_size=100)),
)


def encode(frame: spdy.Frame) -> bytes:
    if isinstance(frame, spdy.DataFrame):
        return data(frame.stream, frame.payload, frame.fin)
    return control(frame.kind, frame.body, frame.flags)


@given(st.lists(frame_st, max_size=8), st.lists(st.integers(0, 4000), max_size=6))
def test_decoder_any_split(frames: list[spdy.Frame], cuts: list[int]) -> None:
    wire = b"".join(map(encode, frames))
    points = sorted({min(c, len(wire)) for c in cuts})
    decoder = spdy.FrameDecoder()
    got: list[spdy.Frame] = []
    for start, end in zip([0, *points], [*points, len(wire)], strict=True):
        got += decoder.feed(wire[start:end])
    assert got == frames


@given(st.binary(max_size=2000))
def test_decoder_never_crashes(noise: bytes) -> None:
    with contextlib.suppress(spdy.SpdyError):
        spdy.FrameDecoder().feed(noise)


class ScriptedServer:
    """A loopback peer that reads the client's frames and sends what a test tells it to."""

    def __init__(self) -> None:
        self.frames: list[spdy.Frame] = []
        self.arrived = asyncio.Condition()
        self.writer: asyncio.StreamWriter | None = None
        self._connected = asyncio.Event()

    async def __aenter__(self) -> tuple[ScriptedServer, SpdyForward]:
        self._server = await asyncio.start_server(self._accepted, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await self._connected.wait()
        forward = SpdyForward(reader, writer, 8080)
        self._client = writer
        return self, forward

    async def __aexit__(self, *exc: object) -> None:
        self._client.transport.abort()
        if self.writer is not None:
            self.writer.transport.abort()
        self._server.close()

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self._connected.set()
        decoder = spdy.FrameDecoder()
        while chunk := await reader.read(65536):
            async with self.arrived:
                self.frames += decoder.feed(chunk)
                self.arrived.notify_all()

    async def wait_for(self, count: int) -> list[spdy.Frame]:
        async with self.arrived:
            await self.arrived.wait_for(lambda: len(self.frames) >= count)
        return self.frames

    def send(self, wire: bytes) -> None:
        assert self.writer is not None
        self.writer.write(wire)


def test_start_opens_the_error_and_data_streams_as_kubectl_does() -> None:
    async def main() -> None:
        async with ScriptedServer() as (server, forward):
            forward.start()
            frames = await server.wait_for(3)
            headers = [("streamtype", "error"), ("port", "8080"), ("requestid", "0")]
            assert syn_streams(frames) == [(1, 0, headers), (3, 0, [("streamtype", "data"), *headers[1:]])]
            assert frames[1] == spdy.DataFrame(1, True, b"")  # the error stream is the server's alone

            await forward.send(b"x" * 100_000)
            frames = await server.wait_for(4)
            assert frames[3] == spdy.DataFrame(3, False, b"x" * 100_000)

    run(main())


def test_what_the_server_sends_becomes_events() -> None:
    async def main() -> None:
        async with ScriptedServer() as (server, forward):
            forward.start()
            await server.wait_for(3)
            server.send(control(spdy.SYN_REPLY, struct.pack(">I", 1) + b"\x78\x01junk") + data(3, b"\x00\x00\x00\x04"))
            assert await forward.receive() == [Data(b"\x00\x00\x00\x04")]
            # A PING is answered with its id; SETTINGS and WINDOW_UPDATE are read and ignored.
            server.send(
                control(spdy.SETTINGS, b"\x00\x00\x00\x00")
                + control(spdy.WINDOW_UPDATE, struct.pack(">II", 3, 1000))
                + control(spdy.PING, b"\x00\x00\x00\x02")
                + data(3, b"after")
            )
            assert await forward.receive() == [Data(b"after")]
            frames = await server.wait_for(4)
            assert frames[3] == spdy.ControlFrame(spdy.PING, 0, b"\x00\x00\x00\x02")
            # The server may not open streams: refused, the connection goes on.
            server.send(control(spdy.SYN_STREAM, struct.pack(">IIBB", 2, 0, 0, 0)) + data(3, b"more"))
            assert await forward.receive() == [Data(b"more")]
            frames = await server.wait_for(5)
            assert frames[4] == spdy.ControlFrame(spdy.RST_STREAM, 0, struct.pack(">II", 2, spdy.RST_REFUSED))
            # The kubelet's failure text on the error stream, then its reset of the data stream.
            server.send(data(1, b"error forwarding port 8080: connection refused\n"))
            assert await forward.receive() == [Failed("error forwarding port 8080: connection refused")]
            server.send(spdy.Encoder.rst_stream(3, spdy.RST_CANCEL) + data(3, b"ignored"))
            assert await forward.receive() is None
            assert forward.close_reason == "reset by the server (status 5)"
            assert await forward.receive() is None

    run(main())


@pytest.mark.parametrize(
    ("ending", "reason"),
    [
        (data(3, b"last", fin=True), "ended by the server"),
        (spdy.Encoder.goaway(0, 1), "closed by the server (GOAWAY, status 1)"),
        (b"", "closed by the server"),
    ],
    ids=["fin", "goaway", "eof"],
)
def test_the_end_of_the_data_stream(ending: bytes, reason: str) -> None:
    async def main() -> None:
        async with ScriptedServer() as (server, forward):
            forward.start()
            await server.wait_for(3)
            server.send(ending)
            if not ending:
                assert server.writer is not None
                server.writer.close()
            events = await forward.receive()
            if ending.startswith(b"\x00"):
                assert events == [Data(b"last")]
                events = await forward.receive()
            assert events is None
            assert forward.close_reason == reason
            await forward.close()

    run(main())


def test_broken_framing_is_a_protocol_error() -> None:
    async def main() -> None:
        async with ScriptedServer() as (server, forward):
            forward.start()
            await server.wait_for(3)
            server.send(control(spdy.PING, b"\x00\x00\x00\x01", version=2))
            with pytest.raises(ProtocolError, match="version 2"):
                await forward.receive()

    run(main())
