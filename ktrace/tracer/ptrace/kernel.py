"""The one module that uses python-ptrace: ptrace requests and the tracee's registers.

python-ptrace provides the ptrace(2) binding and the register structure; this module adds
what it lacks: PTRACE_SEIZE/LISTEN/INTERRUPT, the EXITKILL option, the event message as an
unsigned long, and aarch64's syscall number, which lives outside the general registers.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Any, Final

from ptrace import PtraceError
from ptrace.binding import func as _pt

from ktrace.tracer import arch
from ktrace.tracer.arch import Arch
from ktrace.tracer.tracee import TraceeGone

# linux/ptrace.h
PTRACE_CONT: Final = 7
PTRACE_SYSCALL: Final = 24
PTRACE_SETOPTIONS: Final = 0x4200
PTRACE_GETEVENTMSG: Final = 0x4201
PTRACE_GETREGSET: Final = 0x4204
PTRACE_SETREGSET: Final = 0x4205
PTRACE_SEIZE: Final = 0x4206
PTRACE_INTERRUPT: Final = 0x4207
PTRACE_LISTEN: Final = 0x4208
NT_ARM_SYSTEM_CALL: Final = 0x404

PTRACE_O_TRACESYSGOOD: Final = 0x1
PTRACE_O_TRACEFORK: Final = 0x2
PTRACE_O_TRACEVFORK: Final = 0x4
PTRACE_O_TRACECLONE: Final = 0x8
PTRACE_O_TRACEEXEC: Final = 0x10
PTRACE_O_TRACESECCOMP: Final = 0x80
PTRACE_O_EXITKILL: Final = 0x100000

PTRACE_EVENT_FORK: Final = 1
PTRACE_EVENT_VFORK: Final = 2
PTRACE_EVENT_CLONE: Final = 3
PTRACE_EVENT_EXEC: Final = 4
PTRACE_EVENT_SECCOMP: Final = 7
PTRACE_EVENT_STOP: Final = 128

TRACE_OPTIONS: Final = (
    PTRACE_O_TRACESYSGOOD
    | PTRACE_O_TRACEFORK
    | PTRACE_O_TRACEVFORK
    | PTRACE_O_TRACECLONE
    | PTRACE_O_TRACEEXEC
    | PTRACE_O_TRACESECCOMP
    # If ktrace dies, every tracee dies with it: the program must never go on
    # running (and connecting directly) without its tracer.
    | PTRACE_O_EXITKILL
)


def _ptrace(request: int, pid: int, addr: int = 0, data: int = 0) -> int:
    try:
        return int(_pt.ptrace(request, pid, addr, data))
    except PtraceError as exc:
        if exc.errno == errno.ESRCH:
            raise TraceeGone(pid) from None
        raise OSError(exc.errno, f"ptrace({request:#x}, {pid}): {os.strerror(exc.errno or 0)}") from None


# ---- attaching and resuming -------------------------------------------------


def seize(pid: int, options: int = TRACE_OPTIONS) -> None:
    _ptrace(PTRACE_SEIZE, pid, 0, options)


def cont(tid: int, signal: int = 0) -> None:
    _ptrace(PTRACE_CONT, tid, 0, signal)


def cont_to_exit(tid: int, signal: int = 0) -> None:
    """Resume and stop again at this syscall's exit (SIGTRAP|0x80)."""
    _ptrace(PTRACE_SYSCALL, tid, 0, signal)


def listen(tid: int) -> None:
    """Leave a tracee in group-stop so that SIGCONT can wake it (job control)."""
    _ptrace(PTRACE_LISTEN, tid)


def interrupt(tid: int) -> None:
    _ptrace(PTRACE_INTERRUPT, tid)


def event_message(tid: int) -> int:
    # The kernel stores an unsigned long; python-ptrace's helper passes a 4-byte
    # int, which the kernel would overrun.
    value = ctypes.c_ulong()
    _ptrace(PTRACE_GETEVENTMSG, tid, 0, ctypes.addressof(value))
    return value.value


# ---- registers ----------------------------------------------------------------


class Registers:
    """A tracee's general registers with arch-neutral accessors (``layout`` names them)."""

    __slots__ = ("layout", "raw")

    def __init__(self, raw: Any, layout: Arch = arch.NATIVE) -> None:
        self.raw = raw
        self.layout = layout

    @property
    def nr(self) -> int:
        return int(ctypes.c_long(getattr(self.raw, self.layout.nr_register)).value)

    @nr.setter
    def nr(self, value: int) -> None:
        setattr(self.raw, self.layout.nr_register, value & 0xFFFFFFFFFFFFFFFF)

    @property
    def retval(self) -> int:
        return int(ctypes.c_long(getattr(self.raw, self.layout.return_register)).value)

    @retval.setter
    def retval(self, value: int) -> None:
        setattr(self.raw, self.layout.return_register, value & 0xFFFFFFFFFFFFFFFF)

    def arg(self, index: int) -> int:
        return int(getattr(self.raw, self.layout.arg_registers[index]))

    def set_arg(self, index: int, value: int) -> None:
        setattr(self.raw, self.layout.arg_registers[index], value & 0xFFFFFFFFFFFFFFFF)

    @property
    def ip(self) -> int:
        return int(getattr(self.raw, self.layout.ip_register))

    @ip.setter
    def ip(self, value: int) -> None:
        setattr(self.raw, self.layout.ip_register, value)

    def rewind_to_reissue(self) -> None:
        """Turn registers saved at a syscall's entry into those that issue it again when set
        at an exit stop: the instruction pointer back over the syscall instruction, and the
        number where the instruction reads it if the result overwrote it there."""
        self.ip = self.ip - self.layout.syscall_insn_len
        if self.layout.reissue_number_register is not None:
            setattr(self.raw, self.layout.reissue_number_register, self.nr & 0xFFFFFFFFFFFFFFFF)

    def copy(self) -> Registers:
        clone = type(self.raw)()
        ctypes.pointer(clone)[0] = self.raw
        return Registers(clone, self.layout)


def get_registers(tid: int) -> Registers:
    try:
        return Registers(_pt.ptrace_getregs(tid))
    except PtraceError as exc:
        if exc.errno == errno.ESRCH:
            raise TraceeGone(tid) from None
        raise


def set_registers(tid: int, regs: Registers) -> None:
    try:
        _pt.ptrace_setregs(tid, regs.raw)
    except PtraceError as exc:
        if exc.errno == errno.ESRCH:
            raise TraceeGone(tid) from None
        raise
    if regs.layout.nr_in_regset:
        # aarch64: the number the kernel will run is not x8 but a separate register set;
        # -1 there skips the syscall (what `Complete` needs).
        value = ctypes.c_int(regs.nr)
        iov = (ctypes.c_void_p * 2)(ctypes.addressof(value), ctypes.sizeof(value))
        _ptrace(PTRACE_SETREGSET, tid, NT_ARM_SYSTEM_CALL, ctypes.addressof(iov))
