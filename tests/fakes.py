"""A fake program: the tracer's handlers as unit tests, unprivileged (the agent: fake_agent.py).

`FakeProcess` is the program as a `Tracee` shows it: memory is a bytearray at a fixed base
(EFAULT outside it, faults on demand), descriptors are REAL sockets the test made (ktrace's
`duplicate` gets an `os.dup` of one: the same open file, as pidfd_getfd gives), and the thread
can vanish at any access (`TraceeGone`). `proc.stop(syscall, *args)` is one stop of it.
`can_rewrite` chooses the backend the handlers see: ptrace (Rewrite, WatchExit, `stable_copy`
into a separate scratch area that must first be mapped: `NeedScratch`) or notify. Nothing here
needs root, namespaces or ptrace.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import socket
import stat
import struct
from collections.abc import Coroutine, Iterator, Sequence
from typing import Any, Final, TypeVar

from ktrace.tracer.tracee import TraceeGone
from ktrace.tunnel.types import Endpoint

T = TypeVar("T")

BASE: Final = 0x7F00_0000_0000  # the program's memory
SIZE: Final = 1 << 20
SCRATCH_BASE: Final = 0x7E00_0000_0000  # ktrace's scratch area in it, once mapped
SCRATCH_SIZE: Final = 16 * 4096
FILL: Final = 0xAA  # what a buffer holds before anyone writes it
AT_FDCWD: Final = -100


def run(coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
    """One scenario on a fresh event loop, bounded by ``timeout`` (a hang fails, never waits)."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def endpoint(text: str) -> Endpoint:
    return Endpoint.parse(text)


# ---- the program's memory -------------------------------------------------------------------


class FakeMemory:
    """The program's address space: regions of bytearray. Every access by a handler counts
    (``accesses``); ``fail_at(n, exc)`` makes the n-th raise ``exc`` (a short read is EFAULT,
    as process_vm_readv moving fewer bytes is), ``gone`` makes all of them raise TraceeGone.
    Every part a handler writes is logged in ``writes`` (one tuple of parts per call)."""

    def __init__(self, tid: int) -> None:
        self.tid = tid
        self.regions: dict[int, bytearray] = {BASE: bytearray([FILL]) * SIZE}
        self._next = BASE
        self.accesses = 0
        self.faults: dict[int, BaseException] = {}
        self.gone = False
        self.writes: list[tuple[tuple[int, bytes], ...]] = []

    # -- set-up and inspection by the test (not counted, never faulted) --

    def put(self, data: bytes, align: int = 16) -> int:
        """``data`` somewhere in the program's memory; its address."""
        address = (self._next + align - 1) // align * align
        if address + len(data) > BASE + SIZE:
            raise MemoryError("fake memory full")
        self.regions[BASE][address - BASE : address - BASE + len(data)] = data
        self._next = address + max(len(data), 1)
        return address

    def reserve(self, size: int) -> int:
        """A buffer of ``size`` bytes holding FILL."""
        return self.put(bytes([FILL]) * size)

    def peek(self, address: int, size: int) -> bytes:
        region, offset = self._locate(address, size)
        return bytes(region[offset : offset + size])

    def poke(self, address: int, data: bytes) -> None:
        region, offset = self._locate(address, len(data))
        region[offset : offset + len(data)] = data

    def edge(self, data: bytes) -> int:
        """``data`` placed so that it ends exactly where the mapped memory ends."""
        address = BASE + SIZE - len(data)
        self.poke(address, data)
        return address

    def fail_at(self, access: int, exc: BaseException) -> None:
        """The ``access``-th access from now (0: the next) raises ``exc``."""
        self.faults[self.accesses + access] = exc

    def _locate(self, address: int, size: int) -> tuple[bytearray, int]:
        for base, region in self.regions.items():
            if base <= address and address + size <= base + len(region):
                return region, address - base
        raise OSError(errno.EFAULT, f"fake memory: {size} bytes at {address:#x} are not mapped")

    def _access(self) -> None:
        index = self.accesses
        self.accesses += 1
        if self.gone:
            raise TraceeGone(self.tid)
        fault = self.faults.pop(index, None)
        if fault is not None:
            raise fault

    # -- the `Memory` protocol --

    def read(self, address: int, size: int) -> bytes:
        self._access()
        if size == 0:
            return b""
        return self.peek(address, size)

    def read_string(self, address: int, limit: int = 4096) -> bytes:
        self._access()
        out = bytearray()
        while len(out) < limit:
            byte = self.peek(address + len(out), 1)  # EFAULT at the end of the mapping
            if byte == b"\0":
                return bytes(out)
            out += byte
        raise OSError(errno.ENAMETOOLONG, "string too long")

    def read_int(self, address: int) -> int:
        self._access()
        return int(struct.unpack("=i", self.peek(address, 4))[0])

    def write(self, parts: Sequence[tuple[int, bytes]]) -> None:
        self._access()
        done: list[tuple[int, bytes]] = []
        try:
            for address, data in parts:
                self.poke(address, data)  # the parts before an unmapped one stay written
                done.append((address, bytes(data)))
        finally:
            self.writes.append(tuple(done))


# ---- the program ----------------------------------------------------------------------------


class FakeScratch:
    """ktrace's scratch area in the program (ptrace): not there until the backend maps it, which
    it does when a handler answers `NeedScratch` (``map``)."""

    def __init__(self, memory: FakeMemory) -> None:
        self.memory = memory
        self.mapped = False
        self.unavailable = False  # the backend could not map it (ENOMEM)
        self.requests = 0  # stable_copy calls answered None
        self._next = SCRATCH_BASE

    def map(self) -> None:
        self.mapped = True
        self.memory.regions.setdefault(SCRATCH_BASE, bytearray(SCRATCH_SIZE))

    def copy(self, data: bytes) -> int | None:
        if self.unavailable:
            raise OSError(errno.ENOMEM, "no scratch page in this process")
        if not self.mapped:
            self.requests += 1
            return None
        address = self._next
        self.memory.poke(address, data)
        self._next += (len(data) + 15) // 16 * 16
        return address


Descriptor = socket.socket | int  # a real socket, or any real descriptor (a pipe, a file)


class FakeProcess:
    """A traced program: its memory, its descriptors (real ones, by the program's numbers),
    its directories, its scratch area, and whether it still exists."""

    def __init__(self, can_rewrite: bool, pid: int | None = None) -> None:
        # The program's thread is this test process by default: ThreadGroups finds it in /proc.
        self.pid = pid if pid is not None else os.getpid()
        self.can_rewrite = can_rewrite
        self.memory = FakeMemory(self.pid)
        self.scratch = FakeScratch(self.memory)
        self.fds: dict[int, Descriptor] = {}
        self.cwd = b"/"
        self.dirs: dict[int, bytes] = {}
        self.duplicate_error: OSError | None = None  # what pidfd_getfd fails with (EMFILE...)
        self.duplicates = 0

    @property
    def gone(self) -> bool:
        return self.memory.gone

    @gone.setter
    def gone(self, value: bool) -> None:
        self.memory.gone = value

    def add(self, descriptor: Descriptor, fd: int | None = None) -> int:
        """Give the program ``descriptor`` (the test keeps and closes it); its number there."""
        if fd is None:
            fd = max(self.fds, default=2) + 1
        self.fds[fd] = descriptor
        return fd

    def fileno(self, fd: int) -> int:
        descriptor = self.fds[fd]
        return descriptor if isinstance(descriptor, int) else descriptor.fileno()

    def inode(self, fd: int) -> int:
        """The inode of the program's socket ``fd`` (ktrace's key for it)."""
        return os.fstat(self.fileno(fd)).st_ino

    def stop(self, syscall: str, *args: int) -> FakeTracee:
        """The program stopped at the entry of ``syscall`` with these arguments (as registers
        hold them: unsigned 64-bit)."""
        values = [arg & 0xFFFF_FFFF_FFFF_FFFF for arg in args]
        return FakeTracee(self, syscall, (*values, *[0] * (6 - len(values))))


class FakeTracee:
    """One stop of a `FakeProcess`: the `Tracee` protocol."""

    def __init__(self, process: FakeProcess, syscall: str, args: Sequence[int]) -> None:
        self._process = process
        self.syscall = syscall
        self.args = tuple(args)
        self.can_rewrite = process.can_rewrite
        self.tid = process.pid

    def arg(self, index: int) -> int:
        return self.args[index]

    @property
    def process(self) -> int:
        if self._process.gone:
            raise TraceeGone(self.tid)
        return self._process.pid

    def read(self, address: int, size: int) -> bytes:
        return self._process.memory.read(address, size)

    def read_string(self, address: int, limit: int = 4096) -> bytes:
        return self._process.memory.read_string(address, limit)

    def read_int(self, address: int) -> int:
        return self._process.memory.read_int(address)

    def write(self, parts: Sequence[tuple[int, bytes]]) -> None:
        self._process.memory.write(parts)

    def duplicate(self, fd: int) -> int:
        proc = self._process
        if proc.gone:
            raise TraceeGone(self.tid)
        if proc.duplicate_error is not None:
            raise proc.duplicate_error
        if fd not in proc.fds:
            raise OSError(errno.EBADF, "bad file descriptor")
        proc.duplicates += 1
        return os.dup(proc.fileno(fd))

    def inode(self, fd: int) -> int | None:
        proc = self._process
        if proc.gone or fd not in proc.fds:
            return None  # /proc/<tid>/fd/<fd> unreadable: what socket_inode says
        st = os.fstat(proc.fileno(fd))
        return st.st_ino if stat.S_ISSOCK(st.st_mode) else None

    def directory(self, dirfd: int) -> bytes | None:
        proc = self._process
        if proc.gone:
            return None
        signed = int.from_bytes((dirfd & 0xFFFFFFFF).to_bytes(4, "little"), "little", signed=True)
        return proc.cwd if signed == AT_FDCWD else proc.dirs.get(signed)

    def stable_copy(self, data: bytes) -> int | None:
        if not self.can_rewrite:
            raise OSError(errno.EOPNOTSUPP, "no memory of ktrace's in the program under the notify backend")
        return self._process.scratch.copy(data)


# ---- helpers for tests ------------------------------------------------------------------------


def open_fds() -> set[str]:
    """This process's descriptors (a handler must leave none of its own behind)."""
    return set(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def no_fd_leak() -> Iterator[None]:
    before = open_fds()
    yield
    leaked = open_fds() - before
    assert not leaked, f"descriptors left open: {_described(leaked)}"


def _described(fds: set[str]) -> list[str]:
    described = []
    for fd in sorted(fds, key=int):
        try:
            described.append(f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            described.append(fd)
    return described


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)
