"""A UDP socket on the agent, as one ``Datagrams`` stream.

``send`` never blocks: datagrams wait in a bounded queue for the stream and are
dropped (and counted) when it is full, as a full socket buffer would drop them.
Received datagrams go to the receiver callback; agent socket errors (ICMP) go to
the error callback, or to the peer error callback when the agent knows which
destination they are about; the session stays open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

import grpc
import grpc.aio

from . import rpc
from .types import Endpoint, TunnelError

log = logging.getLogger("ktrace.tunnel")

QUEUE_DATAGRAMS = 512

Receiver = Callable[[Endpoint, bytes], None]


class UdpSession:
    def __init__(self, call: rpc.UdpCall, local: Endpoint) -> None:
        self._call = call
        self.local = local
        self._queue: asyncio.Queue[rpc.UdpClientFrame] = asyncio.Queue(QUEUE_DATAGRAMS)
        self._receiver: Receiver | None = None
        self._on_error: Callable[[TunnelError], None] | None = None
        self._on_peer_error: Callable[[Endpoint, TunnelError], None] | None = None
        self.dropped = 0
        self.closed = asyncio.Event()
        self._tasks = (asyncio.create_task(self._write_loop()), asyncio.create_task(self._read_loop()))

    @classmethod
    async def open(cls, stub: rpc.Stub, metadata: tuple[tuple[str, str], ...], family: int) -> UdpSession:
        wire_family = rpc.FAMILY_INET6 if family == socket.AF_INET6 else rpc.FAMILY_INET
        call = stub.datagrams(metadata=metadata)
        try:
            await call.write(rpc.UdpClientFrame(open=rpc.UdpOpen(family=wire_family)))
            reply: object = await call.read()
        except grpc.aio.AioRpcError as exc:
            call.cancel()
            raise TunnelError("EIO", f"tunnel: {exc.code().name}: {exc.details()}") from exc
        except BaseException:
            call.cancel()
            raise
        if reply is grpc.aio.EOF:
            raise TunnelError("EIO", f"agent ended the stream without an answer ({(await call.code()).name})")
        assert isinstance(reply, rpc.UdpServerFrame)
        if reply.WhichOneof("kind") == "failure":
            call.cancel()
            raise TunnelError(reply.failure.errno_name or "EIO", reply.failure.message)
        if reply.WhichOneof("kind") != "opened":
            call.cancel()
            raise TunnelError("EIO", f"agent answered {reply.WhichOneof('kind')!r} to open")
        return cls(call, rpc.decode_address(reply.opened.local))

    def send(self, dest: Endpoint, payload: bytes) -> bool:
        """Queue one datagram for ``dest``; False when dropped (queue full or session closed)."""
        if self.closed.is_set():
            self.dropped += 1
            return False
        frame = rpc.UdpClientFrame(datagram=rpc.Datagram(peer=rpc.encode_address(dest), payload=payload))
        try:
            self._queue.put_nowait(frame)
        except asyncio.QueueFull:
            self.dropped += 1
            return False
        return True

    def set_receiver(self, callback: Receiver) -> None:
        self._receiver = callback

    def set_error_receiver(self, callback: Callable[[TunnelError], None]) -> None:
        self._on_error = callback

    def set_peer_error_receiver(self, callback: Callable[[Endpoint, TunnelError], None]) -> None:
        """ICMP errors the agent's socket got for datagrams to a known peer."""
        self._on_peer_error = callback

    async def close(self) -> None:
        self.closed.set()
        self._call.cancel()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await task

    async def _write_loop(self) -> None:
        try:
            while True:
                frame = await self._queue.get()
                await self._call.write(frame)
        except grpc.aio.AioRpcError:
            self.closed.set()
        except (asyncio.InvalidStateError, RuntimeError):
            self.closed.set()  # call already finished

    async def _read_loop(self) -> None:
        try:
            while True:
                frame: object = await self._call.read()
                if frame is grpc.aio.EOF:
                    return
                assert isinstance(frame, rpc.UdpServerFrame)
                kind = frame.WhichOneof("kind")
                if kind == "datagram":
                    if self._receiver is not None:
                        source = rpc.decode_address(frame.datagram.peer)
                        try:
                            self._receiver(source, frame.datagram.payload)
                        except Exception:
                            log.exception("UDP receiver callback failed")
                elif kind == "failure" and self._on_error is not None:
                    self._on_error(TunnelError(frame.failure.errno_name or "EIO", frame.failure.message))
                elif kind == "peer_failure" and self._on_peer_error is not None:
                    failure = frame.peer_failure.failure
                    try:
                        peer = rpc.decode_address(frame.peer_failure.peer)
                        self._on_peer_error(peer, TunnelError(failure.errno_name or "EIO", failure.message))
                    except Exception:
                        log.exception("UDP peer error callback failed")
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                log.warning("UDP session ended: %s: %s", exc.code().name, exc.details())
        finally:
            self.closed.set()
