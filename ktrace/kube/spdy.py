"""The SPDY/3.1 framing of a Kubernetes port-forward (``portforward.k8s.io``): a pure codec.

Why SPDY as well as the WebSocket (``portforward.py``): a WebSocket port-forward reaches the
node's container runtime as a WebSocket, whose Go reader unmasks the client's frames a byte at a
time; a SPDY upgrade is passed through by the API server and the kubelet as bytes and read by the
runtime in whole frames, as kubectl's own port-forwards are. On a small node that CPU comes out of
the same cores as the transfer (docs/performance.md, "Through the API server").

Only what a port-forward client needs: it opens two streams per forwarded connection, ``error``
(the server writes a failure's text there) and ``data``, and sends data frames; it never reads
the server's header blocks, so it needs no decompressor. Its own header blocks are compressed
as SPDY requires (one zlib stream per connection, a sync flush per block) but without SPDY's
preset dictionary, which a zlib reader only uses when the stream says it was compressed with
one. The servers (Go's ``spdystream``, in the kubelet and the runtimes) do no flow control:
``WINDOW_UPDATE`` and ``SETTINGS`` are read and ignored, as they ignore them.

Frames (big-endian): a control frame is ``1|version(15) type(16) flags(8) length(24)`` and a
body; a data frame is ``0|stream(31) flags(8) length(24)`` and its payload.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

VERSION = 3
SYN_STREAM = 1
SYN_REPLY = 2
RST_STREAM = 3
SETTINGS = 4
PING = 6
GOAWAY = 7
HEADERS = 8
WINDOW_UPDATE = 9
FLAG_FIN = 0x01
MAX_LENGTH = (1 << 24) - 1
MAX_STREAM = (1 << 31) - 1

RST_REFUSED = 3
RST_CANCEL = 5
GOAWAY_OK = 0

_HEADER = struct.Struct(">II")


class SpdyError(Exception):
    """The peer broke SPDY framing; the connection cannot go on."""


@dataclass(frozen=True)
class DataFrame:
    stream: int
    fin: bool
    payload: bytes


@dataclass(frozen=True)
class ControlFrame:
    kind: int
    flags: int
    body: bytes

    @property
    def stream(self) -> int:
        """The stream a per-stream frame names (SYN_REPLY, RST_STREAM, HEADERS, WINDOW_UPDATE), else 0."""
        if self.kind in (SYN_STREAM, SYN_REPLY, RST_STREAM, HEADERS, WINDOW_UPDATE) and len(self.body) >= 4:
            return int.from_bytes(self.body[:4], "big") & MAX_STREAM
        return 0

    @property
    def status(self) -> int:
        """RST_STREAM's and GOAWAY's status code (their second word), else 0."""
        if self.kind in (RST_STREAM, GOAWAY) and len(self.body) >= 8:
            return int.from_bytes(self.body[4:8], "big")
        return 0


Frame = DataFrame | ControlFrame


class FrameDecoder:
    """Bytes in, whole frames out; keeps a partial frame for the next ``feed``."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        buffer = self._buffer
        buffer += data
        frames: list[Frame] = []
        at = 0
        while len(buffer) - at >= 8:
            first, second = _HEADER.unpack_from(buffer, at)
            length = second & MAX_LENGTH
            end = at + 8 + length
            if end > len(buffer):
                break
            flags = second >> 24
            body = bytes(buffer[at + 8 : end])
            if first & 0x80000000:
                version = (first >> 16) & 0x7FFF
                if version != VERSION:
                    raise SpdyError(f"control frame of SPDY version {version}, not {VERSION}")
                frames.append(ControlFrame(first & 0xFFFF, flags, body))
            else:
                frames.append(DataFrame(first, bool(flags & FLAG_FIN), body))
            at = end
        if at:
            del buffer[:at]
        return frames


def data_header(stream: int, length: int, *, fin: bool = False) -> bytes:
    """The 8 bytes before a data frame's payload (sent as its own write, so the payload is not copied)."""
    if not 0 < stream <= MAX_STREAM or not 0 <= length <= MAX_LENGTH:
        raise ValueError(f"no data frame for stream {stream} of {length} bytes")
    return _HEADER.pack(stream, (FLAG_FIN if fin else 0) << 24 | length)


def _control(kind: int, flags: int, body: bytes) -> bytes:
    return _HEADER.pack(0x80000000 | VERSION << 16 | kind, flags << 24 | len(body)) + body


def header_block(headers: list[tuple[str, str]]) -> bytes:
    """A name/value block before compression: names lower-case, 32-bit counts and lengths."""
    out = [struct.pack(">I", len(headers))]
    for name, value in headers:
        for text in (name.lower(), value):
            raw = text.encode()
            out.append(struct.pack(">I", len(raw)) + raw)
    return b"".join(out)


class Encoder:
    """The control frames a client sends; one per connection (its header compression is one stream)."""

    def __init__(self) -> None:
        self._zlib = zlib.compressobj()

    def syn_stream(self, stream: int, headers: list[tuple[str, str]], *, fin: bool = False) -> bytes:
        block = self._zlib.compress(header_block(headers)) + self._zlib.flush(zlib.Z_SYNC_FLUSH)
        body = struct.pack(">IIBB", stream, 0, 0, 0) + block
        return _control(SYN_STREAM, FLAG_FIN if fin else 0, body)

    def forward_pair(self, error: int, port: int, request_id: int) -> bytes:
        """The frames that open one forwarded connection: the ``error`` stream (closed for writing
        at once, as kubectl does: only the server writes there) and the ``data`` stream after it
        (``error`` + 2), both for ``port`` under ``request_id``."""
        common = [("port", str(port)), ("requestid", str(request_id))]
        return (
            self.syn_stream(error, [("streamtype", "error"), *common])
            + data_header(error, 0, fin=True)
            + self.syn_stream(error + 2, [("streamtype", "data"), *common])
        )

    @staticmethod
    def ping(ping_id: bytes) -> bytes:
        return _control(PING, 0, ping_id)

    @staticmethod
    def rst_stream(stream: int, status: int) -> bytes:
        return _control(RST_STREAM, 0, struct.pack(">II", stream, status))

    @staticmethod
    def goaway(last_stream: int, status: int = GOAWAY_OK) -> bytes:
        return _control(GOAWAY, 0, struct.pack(">II", last_stream, status))
