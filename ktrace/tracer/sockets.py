"""What ktrace knows of each program socket it handles: one record per socket, by inode, in one
table the TCP and UDP handlers share.

A socket's inode names it whatever descriptor, thread or process uses it (a dup, a fork); socket
inodes come from a counter, not reused while the table could hold them. Records go when the
socket's connection ends (TCP), when the relays' sweep finds the socket closed (UDP), or past a
bound (failed connects nobody asked about, tcp.py).
"""

from __future__ import annotations

import asyncio
import enum
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field

from ktrace_agent.wire.values import Endpoint

from ktrace.rules import RouteDecision
from ktrace.tracer.decide import Redirected
from ktrace.tracer.sockaddr import InetAddr


class Phase(enum.Enum):
    CONNECTING = "connecting"  # parked; the agent dials
    CONNECTED = "connected"  # spliced to the agent's connection
    FAILED = "failed"  # the agent failed; the program has not been told yet
    TOLD = "told"  # told by SO_ERROR: the next connect() says ECONNABORTED, as the kernel's would


@dataclass(eq=False, slots=True)
class TcpRecord:
    """A TCP (or other IP, non-UDP) program socket ktrace redirected: its connect's progress."""

    inode: int
    family: int
    peer: InetAddr  # as the program wrote it (v4-mapped stays v4-mapped)
    dest: Endpoint
    route: RouteDecision
    tid: int
    started: float
    sock: socket.socket | None  # ktrace's duplicate while connecting or failed
    phase: Phase = Phase.CONNECTING
    error: int = 0
    local: Endpoint | None = None  # the agent socket's own address, once connected
    waiters: int = 0  # threads blocked in the kernel's connect() on it (ptrace) or in ours (notify)
    settled: asyncio.Future[int] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    task: asyncio.Task[None] | None = None
    fd: int = -1  # the descriptor the program connected it with (options_follow.py reads it again)

    def redirected(self) -> Redirected | None:
        if self.phase is not Phase.CONNECTED or self.local is None:
            return None
        return Redirected(self.family, self.peer, self.local)

    def close_sock(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


@dataclass(eq=False, slots=True)
class UdpRecord:
    """A UDP program socket with relays (it sent to, or was connected to, a cluster peer)."""

    inode: int
    family: int
    peer: InetAddr | None = None  # what ktrace connected it to, as the program wrote it
    own_port: int | None = None  # its own port, once ktrace connected it
    # (process, descriptor) it was connected with: where to find it again when the peer turns
    # out to refuse datagrams.
    where: tuple[int, int] | None = None
    seen: set[Endpoint] = field(default_factory=set)  # destinations already reported

    def disconnected(self) -> None:
        self.peer = None
        self.own_port = None


Record = TcpRecord | UdpRecord


class SocketTable:
    def __init__(self) -> None:
        self._records: dict[int, Record] = {}

    def __len__(self) -> int:
        return len(self._records)

    def tcp(self, inode: int) -> TcpRecord | None:
        record = self._records.get(inode)
        return record if isinstance(record, TcpRecord) else None

    def udp(self, inode: int) -> UdpRecord | None:
        record = self._records.get(inode)
        return record if isinstance(record, UdpRecord) else None

    def udp_record(self, inode: int, family: int) -> UdpRecord:
        """The socket's UDP record, made on first use."""
        record = self.udp(inode)
        if record is None:
            record = UdpRecord(inode, family)
            self._records[inode] = record
        return record

    def tcp_records(self) -> Iterator[TcpRecord]:
        return (r for r in self._records.values() if isinstance(r, TcpRecord))

    def put(self, record: Record) -> None:
        self._records[record.inode] = record

    def holds(self, record: Record) -> bool:
        return self._records.get(record.inode) is record

    def drop(self, record: Record) -> None:
        if self.holds(record):
            del self._records[record.inode]

    def forget(self, inode: int) -> None:
        self._records.pop(inode, None)
