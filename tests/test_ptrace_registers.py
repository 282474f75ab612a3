"""The ptrace backend's registers on both architectures, without ptrace.

The register structures below are written from the kernel's UAPI (x86_64 ``struct
user_regs_struct``, arm64 ``struct user_pt_regs``), not taken from python-ptrace, so that the
tests check python-ptrace's names and ktrace's layouts against the kernel's. The aarch64 rows run
here on x86_64 through an aarch64-shaped structure; end to end on aarch64 is untested until
there is hardware (docs/architecture.md).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
from typing import Any

import pytest

from ktrace.tracer import arch, syscalls
from ktrace.tracer.ptrace import kernel, scratch
from ktrace.tracer.ptrace.kernel import Registers

pytestmark = pytest.mark.timeout(10)

U64 = ctypes.c_ulong

X86_64_FIELDS = (
    "r15",
    "r14",
    "r13",
    "r12",
    "rbp",
    "rbx",
    "r11",
    "r10",
    "r9",
    "r8",
    "rax",
    "rcx",
    "rdx",
    "rsi",
    "rdi",
    "orig_rax",
    "rip",
    "cs",
    "eflags",
    "rsp",
    "ss",
    "fs_base",
    "gs_base",
    "ds",
    "es",
    "fs",
    "gs",
)


class X86_64Regs(ctypes.Structure):
    _fields_ = [(name, U64) for name in X86_64_FIELDS]


class Aarch64Regs(ctypes.Structure):
    # regs[31] (x0..x30), sp, pc, pstate; python-ptrace names x0..x30 r0..r30.
    _fields_ = [*[(f"r{i}", U64) for i in range(31)], ("sp", U64), ("pc", U64), ("pstate", U64)]


LAYOUTS: dict[str, tuple[arch.Arch, type[ctypes.Structure]]] = {
    "x86_64": (arch.X86_64, X86_64Regs),
    "aarch64": (arch.AARCH64, Aarch64Regs),
}


def entry_registers(name: str, syscall: str, args: tuple[int, ...], ip: int) -> Registers:
    """Registers as a seccomp stop shows them at ``syscall``'s entry on ``name``."""
    layout, struct = LAYOUTS[name]
    raw: Any = struct()
    nr = syscalls.number(syscall, layout)
    assert nr is not None
    setattr(raw, layout.nr_register, nr)
    for register, value in zip(layout.arg_registers, args, strict=False):
        setattr(raw, register, value)
    if name == "x86_64":
        raw.rax = -errno.ENOSYS & 0xFFFFFFFFFFFFFFFF  # what rax holds at a syscall's entry
    setattr(raw, layout.ip_register, ip)
    return Registers(raw, layout)


def test_the_kernel_layouts_have_the_sizes_of_their_uapi_structs() -> None:
    assert ctypes.sizeof(X86_64Regs) == 27 * 8
    assert ctypes.sizeof(Aarch64Regs) == 34 * 8
    assert X86_64Regs.orig_rax.offset == 15 * 8 and X86_64Regs.rip.offset == 16 * 8
    assert Aarch64Regs.r8.offset == 8 * 8 and Aarch64Regs.pc.offset == 32 * 8


def test_python_ptrace_s_structure_has_this_machine_s_layout() -> None:
    from ptrace.binding.linux_struct import user_regs_struct

    name = {"x86_64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}.get(platform.machine())
    if name is None:
        pytest.skip(f"no layout written for {platform.machine()}")
    _, struct = LAYOUTS[name]
    assert ctypes.sizeof(user_regs_struct) == ctypes.sizeof(struct)
    theirs = [(field[0], getattr(user_regs_struct, field[0]).offset) for field in user_regs_struct._fields_]
    ours = [(field[0], getattr(struct, field[0]).offset) for field in struct._fields_]
    assert theirs == ours
    assert arch.NATIVE is LAYOUTS[name][0]


@pytest.mark.parametrize("name", LAYOUTS)
def test_a_connect_s_number_and_arguments_read_from_their_registers(name: str) -> None:
    regs = entry_registers(name, "connect", (7, 0x7FFF0000, 16), ip=0x401000)
    assert regs.nr == syscalls.number("connect", LAYOUTS[name][0])
    assert [regs.arg(i) for i in range(3)] == [7, 0x7FFF0000, 16]
    assert regs.ip == 0x401000


@pytest.mark.parametrize("name", LAYOUTS)
def test_skipping_a_call_and_a_negative_result_round_trip_as_signed(name: str) -> None:
    regs = entry_registers(name, "connect", (7, 0x7FFF0000, 16), ip=0x401000)
    regs.nr = -1
    regs.retval = -errno.EINPROGRESS
    assert regs.nr == -1 and regs.retval == -errno.EINPROGRESS
    layout = LAYOUTS[name][0]
    assert getattr(regs.raw, layout.nr_register) == 0xFFFFFFFFFFFFFFFF


def test_aarch64_s_result_register_is_its_first_argument() -> None:
    regs = entry_registers("aarch64", "connect", (7, 0x7FFF0000, 16), ip=0x401000)
    regs.retval = -errno.ECONNREFUSED
    assert regs.arg(0) == -errno.ECONNREFUSED & 0xFFFFFFFFFFFFFFFF
    assert regs.arg(1) == 0x7FFF0000  # the others untouched


@pytest.mark.parametrize("name", LAYOUTS)
def test_a_rewritten_argument_is_masked_to_64_bits_and_the_copy_is_independent(name: str) -> None:
    regs = entry_registers(name, "connect", (7, 0x7FFF0000, 16), ip=0x401000)
    changed = regs.copy()
    changed.set_arg(1, 0x10000)
    changed.set_arg(4, -1)
    assert changed.arg(1) == 0x10000 and changed.arg(4) == 0xFFFFFFFFFFFFFFFF
    assert regs.arg(1) == 0x7FFF0000 and regs.arg(4) == 0


@pytest.mark.parametrize("name", LAYOUTS)
def test_the_scratch_page_s_mmap_is_injected_and_the_original_call_issued_again(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a rewrite of an argument (a connect's address into the scratch page) asks of the
    registers: the call becomes mmap(), and at mmap's exit the original call is set up to run
    again: same number, same arguments, the instruction pointer back on the syscall instruction."""
    layout = LAYOUTS[name][0]
    set_at_exit: list[Registers] = []
    monkeypatch.setattr(kernel, "set_registers", lambda tid, regs: set_at_exit.append(regs.copy()))
    tid = os.getpid()
    pages = scratch.ScratchPages()
    entry = entry_registers(name, "connect", (7, 0x7FFF0000, 16), ip=0x401000)

    injected, mapped = pages.inject_map(tid, entry)

    assert injected.nr == syscalls.number("mmap", layout)
    assert [injected.arg(i) for i in range(6)] == [
        0,
        scratch.PAGE_BYTES,
        mmap.PROT_READ | mmap.PROT_WRITE,
        mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
        0xFFFFFFFFFFFFFFFF,
        0,
    ]
    assert entry.arg(0) == 7  # the saved entry registers are not the injected ones

    at_exit = injected.copy()
    at_exit.retval = 0x7F1234560000  # mmap's result, where the kernel leaves a result
    mapped(tid, at_exit)

    [restored] = set_at_exit
    assert restored.ip == 0x401000 - layout.syscall_insn_len
    assert [restored.arg(i) for i in range(3)] == [7, 0x7FFF0000, 16]
    # The syscall instruction reads its number from rax on x86_64 and x8 on aarch64.
    number_register = layout.reissue_number_register or layout.nr_register
    assert getattr(restored.raw, number_register) == syscalls.number("connect", layout)
    assert pages.spaces[tid].address == 0x7F1234560000
    assert pages.slot_for(tid, b"") is not None  # the page is known now


@pytest.mark.parametrize("name", LAYOUTS)
def test_a_failed_scratch_mmap_marks_the_process_unavailable(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel, "set_registers", lambda tid, regs: None)
    tid = os.getpid()
    pages = scratch.ScratchPages()
    injected, mapped = pages.inject_map(tid, entry_registers(name, "sendto", (3, 0x1000, 5, 0, 0x2000, 16), ip=0x500))
    injected.retval = -errno.ENOMEM
    mapped(tid, injected)
    assert pages.unavailable(tid)


class _Calls:
    def __init__(self) -> None:
        self.setregs: list[Any] = []
        self.requests: list[tuple[int, int, int, int]] = []

    def ptrace_setregs(self, tid: int, raw: Any) -> None:
        self.setregs.append(raw)


def test_aarch64_sets_the_syscall_number_through_its_register_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """On aarch64 the kernel runs the number in NT_ARM_SYSTEM_CALL, not x8: skipping a call
    (``Complete``) or injecting mmap must write it there, as a 4-byte int."""
    calls = _Calls()
    written: list[int] = []

    def fake_ptrace(request: int, pid: int, addr: int = 0, data: int = 0) -> int:
        calls.requests.append((request, pid, addr, data))
        iov = (ctypes.c_void_p * 2).from_address(data)
        assert iov[1] == ctypes.sizeof(ctypes.c_int)
        assert iov[0] is not None
        written.append(ctypes.c_int.from_address(iov[0]).value)
        return 0

    monkeypatch.setattr(kernel, "_pt", calls)
    monkeypatch.setattr(kernel, "_ptrace", fake_ptrace)
    regs = entry_registers("aarch64", "connect", (7, 0x7FFF0000, 16), ip=0x401000)
    regs.nr = -1
    regs.retval = -errno.EINPROGRESS
    kernel.set_registers(4242, regs)

    assert calls.setregs == [regs.raw]
    assert [(r, p, a) for r, p, a, _ in calls.requests] == [(kernel.PTRACE_SETREGSET, 4242, kernel.NT_ARM_SYSTEM_CALL)]
    assert written == [-1]


def test_x86_64_sets_the_number_with_the_general_registers_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _Calls()
    monkeypatch.setattr(kernel, "_pt", calls)

    def fake_ptrace(request: int, pid: int, addr: int = 0, data: int = 0) -> int:
        calls.requests.append((request, pid, addr, data))
        return 0

    monkeypatch.setattr(kernel, "_ptrace", fake_ptrace)
    regs = entry_registers("x86_64", "connect", (7, 0x7FFF0000, 16), ip=0x401000)
    regs.nr = -1
    kernel.set_registers(4242, regs)
    assert calls.setregs == [regs.raw] and calls.requests == []
