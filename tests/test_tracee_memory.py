"""linux.read_memory / write_memory against a real process: through the preallocated buffer
(small) and a buffer of their own (larger than it), and their errors."""

from __future__ import annotations

import errno
import subprocess
import sys
from collections.abc import Iterator

import pytest
from e2e_helpers import read_line

from ktrace.tracer import linux
from ktrace.tracer.tracee import TraceeGone

pytestmark = pytest.mark.timeout(30)

SIZE = 200_000  # more than linux._READ_BUFFER_SIZE
# A process that holds SIZE bytes of a known pattern and prints where they are.
HOLDER = rf"""
import ctypes, sys
data = ctypes.create_string_buffer(bytes(i % 251 for i in range({SIZE})), {SIZE})
print(ctypes.addressof(data), flush=True)
sys.stdin.read()
"""
PATTERN = bytes(i % 251 for i in range(SIZE))


@pytest.fixture
def holder() -> Iterator[tuple[int, int]]:
    """(pid, address of the pattern)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        yield proc.pid, int(read_line(proc, timeout=20))
    finally:
        proc.kill()
        proc.communicate(timeout=20)


def test_small_and_large_reads(holder: tuple[int, int]) -> None:
    pid, address = holder
    assert SIZE > linux._READ_BUFFER_SIZE
    assert linux.read_memory(pid, address + 7, 16) == PATTERN[7:23]
    assert linux.read_memory(pid, address, SIZE) == PATTERN
    assert linux.read_memory(pid, address, 0) == b""


def test_small_and_large_writes_read_back(holder: tuple[int, int]) -> None:
    pid, address = holder
    large = bytes(255 - b for b in PATTERN)
    linux.write_memory(pid, address, large)
    assert linux.read_memory(pid, address, SIZE) == large
    linux.write_memory(pid, address + 100, b"small")
    assert linux.read_memory(pid, address + 98, 9) == large[98:100] + b"small" + large[105:107]


def test_writes_in_parts_land_in_order_in_one_call_or_several(holder: tuple[int, int]) -> None:
    pid, address = holder
    linux.write_memory(pid, address, PATTERN)
    linux.write_memory_parts(pid, ((address + 10, b"one"), (address + 400, b""), (address + 300, b"three")))
    assert linux.read_memory(pid, address + 8, 7) == PATTERN[8:10] + b"one" + PATTERN[13:15]
    assert linux.read_memory(pid, address + 299, 7) == PATTERN[299:300] + b"three" + PATTERN[305:306]
    assert linux.read_memory(pid, address + 400, 1) == PATTERN[400:401]
    # Larger than the preallocated buffer, and more parts than one call takes: one by one.
    big = bytes(255 - b for b in PATTERN[: linux._READ_BUFFER_SIZE])
    linux.write_memory_parts(pid, ((address, big), (address + SIZE - 4, b"tail")))
    assert linux.read_memory(pid, address, len(big)) == big
    assert linux.read_memory(pid, address + SIZE - 4, 4) == b"tail"
    parts = [(address + 1000 + 10 * i, b"p%d" % i) for i in range(linux._MAX_PARTS + 2)]
    linux.write_memory_parts(pid, parts)
    assert [linux.read_memory(pid, a, len(d)) for a, d in parts] == [d for _a, d in parts]


def test_writes_in_parts_stop_at_an_unmapped_part(holder: tuple[int, int]) -> None:
    pid, address = holder
    linux.write_memory(pid, address, PATTERN)
    with pytest.raises(OSError) as write:
        linux.write_memory_parts(pid, ((address + 20, b"first"), (4096, b"unmapped"), (address + 40, b"third")))
    assert write.value.errno == errno.EFAULT
    assert linux.read_memory(pid, address + 20, 5) == b"first"
    assert linux.read_memory(pid, address + 40, 5) == PATTERN[40:45]


@pytest.mark.parametrize("size", [16, SIZE])
def test_unmapped_memory_is_efault(holder: tuple[int, int], size: int) -> None:
    pid, _address = holder
    with pytest.raises(OSError) as read:
        linux.read_memory(pid, 4096, size)
    assert read.value.errno == errno.EFAULT
    with pytest.raises(OSError) as write:
        linux.write_memory(pid, 4096, bytes(size))
    assert write.value.errno == errno.EFAULT


@pytest.mark.parametrize("size", [16, SIZE])
def test_a_process_that_is_gone_is_tracee_gone(size: int) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=20)  # reaped: its pid names no process
    with pytest.raises(TraceeGone):
        linux.read_memory(gone.pid, 4096, size)
    with pytest.raises(TraceeGone):
        linux.write_memory(gone.pid, 4096, bytes(size))
