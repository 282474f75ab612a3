"""A UDP socket on the agent, as one ``Datagrams`` stream.

``send`` never blocks: datagrams wait in a bounded queue for the stream and are
dropped (and counted) when it is full, as a full socket buffer would drop them.
Received datagrams go to the receiver callback; agent socket errors (ICMP) go to
the error callback, and the session stays open.
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
from .call_pool import CallPool
from .types import Endpoint, TunnelError

log = logging.getLogger("ktrace.tunnel")

QUEUE_DATAGRAMS = 512

Receiver = Callable[[Endpoint, bytes], None]


class _CallLost(TunnelError):
    """The stream failed before the agent answered ``open``."""


class UdpSession:
    def __init__(self, call: rpc.UdpCall, local: Endpoint) -> None:
        self._call = call
        self.local = local
        self._queue: asyncio.Queue[rpc.UdpClientFrame] = asyncio.Queue(QUEUE_DATAGRAMS)
        self._receiver: Receiver | None = None
        self._on_error: Callable[[TunnelError], None] | None = None
        self.dropped = 0
        self.closed = asyncio.Event()
        self._tasks = (asyncio.create_task(self._write_loop()), asyncio.create_task(self._read_loop()))

    @classmethod
    async def open(cls, calls: CallPool[rpc.UdpCall], family: int) -> UdpSession:
        call, spare = calls.take()
        try:
            return await cls._open_on(call, family)
        except _CallLost:
            if not spare:
                raise
        return await cls._open_on(calls.fresh(), family)  # the spare had ended: one retry

    @classmethod
    async def _open_on(cls, call: rpc.UdpCall, family: int) -> UdpSession:
        wire_family = rpc.FAMILY_INET6 if family == socket.AF_INET6 else rpc.FAMILY_INET
        reading = asyncio.ensure_future(call.read())  # in flight while the write completes
        try:
            await call.write(rpc.UdpClientFrame(open=rpc.UdpOpen(family=wire_family)))
            reply: object = await reading
        except grpc.aio.AioRpcError as exc:
            call.cancel()
            raise _CallLost("EIO", f"tunnel: {exc.code().name}: {exc.details()}") from exc
        except (asyncio.InvalidStateError, grpc.aio.UsageError) as exc:
            call.cancel()
            raise _CallLost("EIO", f"tunnel: stream ended before open ({exc})") from None
        except BaseException:
            call.cancel()
            raise
        finally:
            if not reading.done():
                reading.cancel()
            elif not reading.cancelled():
                reading.exception()  # retrieved: an error here was handled above
        if reply is grpc.aio.EOF:
            raise _CallLost("EIO", f"agent ended the stream without an answer ({(await call.code()).name})")
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
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                log.warning("UDP session ended: %s: %s", exc.code().name, exc.details())
        finally:
            self.closed.set()
