"""The two ways a port-forward reaches the pod: SPDY/3.1 (as kubectl's) and the ``v4.channel.k8s.io`` WebSocket.

Both give the bridge (``portforward.py``) the same ``ForwardSocket``: ``send`` a payload,
``receive`` the server's ``Data`` and ``Failed`` events (``None`` once closed, ``close_reason``
saying how), ``close``. Which one a session uses is decided in ``session.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

from . import spdy
from .portforward import CHUNK, ChannelDecoder, Data, Failed, ProtocolError, encode_data

SPDY_UPGRADE = {"Upgrade": "SPDY/3.1", "X-Stream-Protocol-Version": "portforward.k8s.io"}
_ERROR_STREAM = 1
_DATA_STREAM = 3
_JOIN_BELOW = 64 * 1024


class MessageSocket(Protocol):
    """A WebSocket: whole binary messages (``api.WebSocket``)."""

    close_reason: str

    async def send(self, data: bytes) -> None: ...

    async def receive(self) -> bytes | None: ...

    async def close(self) -> None: ...


class WebSocketForward:
    """``v4.channel.k8s.io``: a channel byte before every message, the port before each channel's first."""

    def __init__(self, ws: MessageSocket, port: int) -> None:
        self._ws = ws
        self._decoder = ChannelDecoder(port)

    @property
    def close_reason(self) -> str:
        return self._ws.close_reason

    async def send(self, data: bytes) -> None:
        await self._ws.send(encode_data(data))

    async def receive(self) -> list[Data | Failed] | None:
        while (message := await self._ws.receive()) is not None:
            if events := self._decoder.feed(message):
                return events
        return None

    async def close(self) -> None:
        await self._ws.close()


class SpdyForward:
    """One forwarded connection on a SPDY/3.1 connection of its own (request 0: streams 1 and 3).

    ``start`` opens the ``error`` stream (closed for writing at once, as kubectl does: only the
    server writes there) and the ``data`` stream. What the server writes on ``error`` is a
    ``Failed``; the end of ``data`` (FIN, a reset, GOAWAY, the connection) is the end.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int) -> None:
        self._reader = reader
        self._writer = writer
        self._port = port
        self._encoder = spdy.Encoder()
        self._decoder = spdy.FrameDecoder()
        self._ended = False
        self.close_reason = ""

    def start(self) -> None:
        self._writer.write(self._encoder.forward_pair(_ERROR_STREAM, self._port, 0))

    async def send(self, data: bytes) -> None:
        for at in range(0, len(data), spdy.MAX_LENGTH):
            piece = data[at : at + spdy.MAX_LENGTH]
            header = spdy.data_header(_DATA_STREAM, len(piece))
            if len(piece) <= _JOIN_BELOW:
                # One write, one TLS record and one segment for a small message (gRPC's latency);
                # a large one is not copied to join it.
                self._writer.write(header + piece)
            else:
                self._writer.write(header)
                self._writer.write(piece)
        await self._writer.drain()

    async def receive(self) -> list[Data | Failed] | None:
        while not self._ended:
            chunk = await self._reader.read(CHUNK)
            if not chunk:
                self._end("closed by the server")
                return None
            try:
                frames = self._decoder.feed(chunk)
            except spdy.SpdyError as exc:
                raise ProtocolError(str(exc)) from None
            if events := self._handle(frames):
                return events
        return None

    def _handle(self, frames: list[spdy.Frame]) -> list[Data | Failed]:
        events: list[Data | Failed] = []
        for frame in frames:
            if self._ended:
                break
            if isinstance(frame, spdy.DataFrame):
                if frame.stream == _DATA_STREAM:
                    if frame.payload:
                        events.append(Data(frame.payload))
                    if frame.fin:
                        self._end("ended by the server")
                elif frame.stream == _ERROR_STREAM and frame.payload:
                    events.append(Failed(frame.payload.decode("utf-8", "replace").strip()))
            elif frame.kind == spdy.PING:
                self._writer.write(self._encoder.ping(frame.body))
            elif frame.kind == spdy.RST_STREAM and frame.stream in (_DATA_STREAM, _ERROR_STREAM):
                self._end(f"reset by the server (status {frame.status})")
            elif frame.kind == spdy.GOAWAY:
                self._end(f"closed by the server (GOAWAY, status {frame.status})")
            elif frame.kind == spdy.SYN_STREAM:
                self._writer.write(self._encoder.rst_stream(frame.stream, spdy.RST_REFUSED))
            # SYN_REPLY, SETTINGS, WINDOW_UPDATE, HEADERS: nothing a port-forward client needs from them.
        return events

    def _end(self, reason: str) -> None:
        self._ended = True
        self.close_reason = self.close_reason or reason

    async def close(self) -> None:
        if self._writer.transport.is_closing():
            return
        with contextlib.suppress(OSError, RuntimeError):
            self._writer.write(self._encoder.goaway(_DATA_STREAM))
        self._writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await self._writer.wait_closed()
