"""A private page in each traced process, for arguments ktrace rewrites.

Rewriting a path argument means the kernel must read a string ktrace chose
from the program's memory. Writing it below the stack pointer is unsafe (a Go
goroutine's stack can be a few KiB) and editing the program's own buffer races
with its other threads. Instead ktrace maps a page of its own into the process
the first time it needs one, by injecting an mmap() at a syscall stop:

    seccomp stop of syscall S   → registers saved, the syscall becomes mmap(...)
    exit stop of that mmap      → page address kept; the entry's registers restored
                                  with the instruction pointer rewound over the
                                  syscall instruction (x86_64 also needs rax = S
                                  again, where the kernel put mmap's result; aarch64
                                  gets x0, the first argument, back), so S is
                                  issued again
    seccomp stop of S again     → now rewritten using the page

The page belongs to the address space: threads share it, a forked child gets a
copy at the same address (but ktrace does not rely on that), exec drops it.
Slots rotate; the kernel copies a path argument as soon as the syscall starts,
long before a slot comes round again.
"""

from __future__ import annotations

import mmap as _mmap
from collections.abc import Callable
from dataclasses import dataclass, field

from ktrace.tracer import linux, syscalls
from ktrace.tracer.ptrace import kernel
from ktrace.tracer.ptrace.kernel import Registers
from ktrace.tracer.threads import ThreadGroups

# Slots hold a path (up to PATH_MAX) or a sockaddr; the kernel copies an argument as the call
# starts, long before sixteen other stops of the same process come round to reuse its slot.
PAGE_BYTES = 16 * 4096
SLOT_BYTES = 4096
SLOTS = PAGE_BYTES // SLOT_BYTES
MAX_ERRNO = 4095


@dataclass
class _Space:
    address: int | None = None
    failed: bool = False
    next_slot: int = 0


@dataclass
class ScratchPages:
    spaces: dict[int, _Space] = field(default_factory=dict)  # by thread group id
    threads: ThreadGroups = field(default_factory=ThreadGroups)

    def tgid(self, tid: int) -> int:
        return self.threads.of(tid)

    def exec_happened(self, tid: int) -> None:
        # After exec the thread is the leader of a fresh address space.
        self.spaces.pop(tid, None)

    def slot_for(self, tid: int, data: bytes) -> int | None:
        """Address of a slot holding `data`, or None if the page is not mapped yet."""
        if len(data) > SLOT_BYTES:
            raise ValueError("argument too large for a scratch slot")
        space = self.spaces.get(self.tgid(tid))
        if space is None or space.address is None:
            return None
        slot = space.address + space.next_slot * SLOT_BYTES
        space.next_slot = (space.next_slot + 1) % SLOTS
        linux.write_memory(tid, slot, data)
        return slot

    def unavailable(self, tid: int) -> bool:
        space = self.spaces.get(self.tgid(tid))
        return space is not None and space.failed

    def inject_map(self, tid: int, regs: Registers) -> tuple[Registers, Callable[[int, Registers], None]]:
        """Registers that turn the current syscall into mmap(), and the exit
        callback that records the page and re-issues the original syscall."""
        saved = regs.copy()
        injected = regs.copy()
        mmap = syscalls.number("mmap", regs.layout)
        assert mmap is not None
        injected.nr = mmap
        for index, value in enumerate(
            (0, PAGE_BYTES, _mmap.PROT_READ | _mmap.PROT_WRITE, _mmap.MAP_PRIVATE | _mmap.MAP_ANONYMOUS, -1, 0)
        ):
            injected.set_arg(index, value)
        tgid = self.tgid(tid)

        def mapped(tid: int, exit_regs: Registers) -> None:
            result = exit_regs.retval
            space = self.spaces.setdefault(tgid, _Space())
            if -MAX_ERRNO <= result < 0:
                space.failed = True
            else:
                space.address = result
            restored = saved.copy()
            restored.rewind_to_reissue()
            kernel.set_registers(tid, restored)

        return injected, mapped
