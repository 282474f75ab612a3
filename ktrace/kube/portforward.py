"""The tunnel to the agent: a private local socket whose every connection becomes a new port-forward.

ktrace's single gRPC channel dials ``unix:<private dir>/agent.sock``. The bridge accepts each
connection and opens a WebSocket port-forward to the agent's loopback port through the API
server (``v4.channel.k8s.io``), then copies bytes both ways. When the port-forward drops (API
server or kubelet restart, network change), the streams in flight on that connection fail (the
program sees resets) and gRPC dials again; the bridge keeps trying to reach the agent for a
while before giving up on one dial, so new connections work again as soon as the path is back.

A connection is handed to gRPC only once the agent has answered: a gRPC server speaks first (its
HTTP/2 SETTINGS frame), so the first data byte proves the port-forward reached a listening agent.
Until then nothing is read from the local socket, and an attempt that fails (the agent not
listening yet, the API server restarting) is simply retried on a new WebSocket.

Wire format (``v4.channel.k8s.io``, one port): each WebSocket message is one channel byte and a
payload. Channel 0 carries data, channel 1 error text. The server's first two bytes on each
channel are the port number, little-endian. The protocol has no half-close: gRPC needs none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from ktrace_agent.wire.pumps import run_both

log = logging.getLogger("ktrace.kube")

PROTOCOL = "v4.channel.k8s.io"
DATA_CHANNEL = 0
ERROR_CHANNEL = 1
CHUNK = 256 * 1024


class ProtocolError(Exception):
    """The server broke the port-forward protocol."""


@dataclass(frozen=True)
class Data:
    payload: bytes


@dataclass(frozen=True)
class Failed:
    message: str


class ChannelDecoder:
    """Decodes the server's messages for one forwarded port into ``Data`` and ``Failed`` (pure)."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._prefix: dict[int, bytearray] = {DATA_CHANNEL: bytearray(), ERROR_CHANNEL: bytearray()}

    def feed(self, message: bytes) -> list[Data | Failed]:
        if not message:
            raise ProtocolError("empty message (no channel byte)")
        channel = message[0]
        if channel not in self._prefix:
            raise ProtocolError(f"message on unknown channel {channel}")
        payload = message[1:]
        prefix = self._prefix[channel]
        if len(prefix) < 2:
            take = 2 - len(prefix)
            prefix += payload[:take]
            payload = payload[take:]
            if len(prefix) == 2 and int.from_bytes(prefix, "little") != self._port:
                raise ProtocolError(
                    f"channel {channel} is for port {int.from_bytes(prefix, 'little')}, not {self._port}"
                )
        if not payload:
            return []
        if channel == DATA_CHANNEL:
            return [Data(bytes(payload))]
        return [Failed(payload.decode("utf-8", "replace").strip())]


def encode_data(payload: bytes) -> bytes:
    return bytes([DATA_CHANNEL]) + payload


class ForwardSocket(Protocol):
    """One forwarded connection (``portforward_transports``): ``receive`` gives the server's events,
    ``None`` once it is closed (``close_reason`` says how), and raises ``ProtocolError``."""

    @property
    def close_reason(self) -> str: ...

    async def send(self, data: bytes) -> None: ...

    async def receive(self) -> list[Data | Failed] | None: ...

    async def close(self) -> None: ...


class Unreachable(Exception):
    """Opening a port-forward failed. ``final``: retrying cannot help (forbidden, pod gone)."""

    def __init__(self, message: str, *, final: bool) -> None:
        super().__init__(message)
        self.final = final


OpenSocket = Callable[[], Awaitable[ForwardSocket]]


class PortForwardBridge:
    """``await start()`` gives the local address to dial; ``close()`` ends it and every bridged connection.

    ``open_socket`` opens a new port-forward to the agent's port (raising ``Unreachable``).
    ``report`` gets the lines the user should see (drops, restores).
    ``dial_window``: how long one local connection waits for the agent before it is refused.
    """

    def __init__(
        self,
        open_socket: OpenSocket,
        *,
        report: Callable[[str], None],
        dial_window: float = 15.0,
        answer_timeout: float = 5.0,
    ) -> None:
        self._open = open_socket
        self._report = report
        self._dial_window = dial_window
        self._answer_timeout = answer_timeout
        self._server: asyncio.AbstractServer | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._dropped_at: float | None = None
        self.address = ""
        self.last_error = ""
        self.final_error: Unreachable | None = None
        self.refused = asyncio.Event()  # set with final_error
        self.connections = 0  # bridged successfully, in total

    async def start(self) -> str:
        self._tmp = tempfile.TemporaryDirectory(prefix="ktrace-kube-")  # mode 0700: only this user dials
        path = os.path.join(self._tmp.name, "agent.sock")
        self._server = await asyncio.start_unix_server(self._accepted, path=path)
        self.address = f"unix:{path}"
        return self.address

    async def close(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ws: ForwardSocket | None = None
        try:
            reached = await self._reach_agent()
            if reached is None:
                return
            ws, first = reached
            self.connections += 1
            if self._dropped_at is not None:
                self._report(
                    f"tunnel to the agent restored after {asyncio.get_running_loop().time() - self._dropped_at:.1f} s"
                )
                self._dropped_at = None
            writer.write(first)
            await writer.drain()
            remote_ended = await self._pump(reader, writer, ws)
            if remote_ended and not self._closing:
                self._dropped_at = asyncio.get_running_loop().time()
                self._report(
                    f"lost the tunnel to the agent ({self.last_error or 'port-forward closed'}): connections open "
                    "through it were reset; reconnecting"
                )
        except (ConnectionError, OSError) as exc:
            log.debug("bridge: local connection failed: %s", exc)
        finally:
            if ws is not None:
                with contextlib.suppress(Exception):
                    await ws.close()
            # RST rather than FIN: gRPC must drop this connection at once, not wait for more frames.
            writer.transport.abort()

    async def _reach_agent(self) -> tuple[ForwardSocket, bytes] | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._dial_window
        delay = 0.05
        while not self._closing:
            try:
                ws = await self._open()
            except Unreachable as exc:
                self.last_error = str(exc)
                if exc.final:
                    self.final_error = exc
                    self.refused.set()
                    return None
            else:
                first = await self._first_answer(ws)
                if first is not None:
                    return ws, first
                with contextlib.suppress(Exception):
                    await ws.close()
            if loop.time() + delay > deadline:
                log.debug("bridge: giving up on this dial: %s", self.last_error)
                return None
            log.debug("bridge: agent not reached (%s); retrying in %.2f s", self.last_error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        return None

    async def _first_answer(self, ws: ForwardSocket) -> bytes | None:
        try:
            async with asyncio.timeout(self._answer_timeout):
                while True:
                    events = await ws.receive()
                    if events is None:
                        self.last_error = f"port-forward {ws.close_reason or 'closed'}"
                        return None
                    for event in events:
                        if isinstance(event, Data):
                            return event.payload
                        self.last_error = event.message
                        return None
        except TimeoutError:
            self.last_error = f"the agent did not answer through the port-forward within {self._answer_timeout:g} s"
        except ProtocolError as exc:
            self.last_error = f"port-forward protocol error: {exc}"
        return None

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ws: ForwardSocket) -> bool:
        """Copy until one side ends; True when the port-forward side ended first."""

        async def up() -> None:
            while True:
                try:
                    data = await reader.read(CHUNK)
                except OSError:
                    raise _LocalEnded from None
                if not data:
                    raise _LocalEnded
                try:
                    await ws.send(data)
                except Exception as exc:
                    raise _RemoteEnded(f"port-forward failed: {exc or type(exc).__name__}") from None

        async def down() -> None:
            while True:
                try:
                    events = await ws.receive()
                except ProtocolError as exc:
                    raise _RemoteEnded(f"port-forward protocol error: {exc}") from None
                except Exception as exc:
                    raise _RemoteEnded(f"port-forward failed: {exc or type(exc).__name__}") from None
                if events is None:
                    raise _RemoteEnded(f"port-forward {ws.close_reason or 'closed'}")
                for event in events:
                    if isinstance(event, Failed):
                        raise _RemoteEnded(event.message)
                    writer.write(event.payload)
                    try:
                        await writer.drain()
                    except OSError:
                        raise _LocalEnded from None

        try:
            await run_both(up(), down())  # neither returns: each ends by raising
        except _RemoteEnded as ended:
            self.last_error = str(ended)
            return True
        except _LocalEnded:
            pass
        return False


class _LocalEnded(Exception):
    """The local (gRPC) side of a bridged connection ended."""


class _RemoteEnded(Exception):
    """The port-forward side ended; the message says how."""
