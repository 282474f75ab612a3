"""The stop loop: every ptrace stop of every thread of the program goes here.

The tracer runs inside ktrace's asyncio loop on the main thread, which is the
only thread that ever calls ptrace (the kernel requires the thread that
attached). It never blocks: stops arrive as SIGCHLD on a signalfd, are drained
with waitpid(WNOHANG), and a syscall that must wait for the agent is parked as
an asyncio task while every other thread keeps running.

Stop kinds (with PTRACE_SEIZE):
- seccomp stop (PTRACE_EVENT_SECCOMP): a syscall ktrace must see; the handler
  decides (see `Outcome`).
- syscall-exit stop (SIGTRAP|0x80): only after a handler asked to see the
  result of a syscall.
- fork/vfork/clone/exec events: process-tree bookkeeping, then resume.
- PTRACE_EVENT_STOP with a stop signal: group-stop; PTRACE_LISTEN keeps the
  thread stopped until SIGCONT without ktrace having to act (job control).
- PTRACE_EVENT_STOP otherwise: a new tracee's first stop; resume it.
- anything else: a signal on its way to the program; pass it on unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ktrace.tracer import linux, syscalls
from ktrace.tracer.ptrace import kernel
from ktrace.tracer.ptrace.kernel import Registers
from ktrace.tracer.ptrace.scratch import ScratchPages
from ktrace.tracer.ptrace.tracee import PtraceTracee
from ktrace.tracer.thread_access import ThreadMemory
from ktrace.tracer.threads import ThreadGroups
from ktrace.tracer.tracee import (
    Complete,
    Deferred,
    InstallFd,
    NeedScratch,
    OnExit,
    Outcome,
    Resume,
    Rewrite,
    SyscallHandler,
    TraceeGone,
    WatchExit,
)

log = logging.getLogger("ktrace.tracer")

GROUP_STOP_SIGNALS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})
SYSCALL_EXIT_TRAP = signal.SIGTRAP | 0x80
SI_KERNEL = 0x80
FORWARDED_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT})
# After a stop ktrace resumed at once, poll this long for the next stop before going
# back to the event loop. A tracee that stops again soon (an open() loop, a burst of
# UDP sends) is then seen without a SIGCHLD → signalfd → epoll wake-up of ktrace, which
# costs tens of µs on a VM whose idle vCPUs halt (docs/performance.md). Bounded, so a lone
# stop costs at most this much CPU.
SPIN_SECONDS = 30e-6

# What the loop runs at a syscall-exit stop: the thread and its registers there.
_ExitHook = Callable[[int, Registers], None]


@dataclass
class _Thread:
    tid: int
    on_exit: _ExitHook | None = None
    parked: asyncio.Task[None] | None = None


@dataclass
class TraceResult:
    exit_code: int | None = None
    signal: int | None = None


@dataclass
class Tracer:
    handler: SyscallHandler
    main_pid: int
    loop: asyncio.AbstractEventLoop
    threads_of: ThreadGroups = field(default_factory=ThreadGroups)
    scratch: ScratchPages = field(default_factory=ScratchPages)
    threads: dict[int, _Thread] = field(default_factory=dict)
    result: TraceResult = field(default_factory=TraceResult)
    finished: asyncio.Future[TraceResult] | None = None
    _signal_fd: int = -1
    _resumed_now: bool = False  # the last stop was resumed synchronously (not parked)
    # Tracees whose exit was read before the fork/clone event that announces them.
    _gone_unknown: set[int] = field(default_factory=set)
    _names: dict[int, str] = field(default_factory=dict)

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        """Start watching; the caller has already blocked the signals below."""
        self._names = syscalls.names_by_number()
        self.scratch.threads = self.threads_of
        self.finished = self.loop.create_future()
        self.threads[self.main_pid] = _Thread(self.main_pid)
        self._signal_fd = linux.signalfd({signal.SIGCHLD, *FORWARDED_SIGNALS})
        self.loop.add_reader(self._signal_fd, self._on_signals)
        # A stop may already be waiting (the exec event) before the first SIGCHLD
        # reaches the signalfd.
        self._drain()

    def close(self) -> None:
        if self._signal_fd >= 0:
            self.loop.remove_reader(self._signal_fd)
            os.close(self._signal_fd)
            self._signal_fd = -1
        for thread in self.threads.values():
            if thread.parked is not None:
                thread.parked.cancel()

    def kill_all(self) -> None:
        for tid in list(self.threads):
            with contextlib.suppress(ProcessLookupError):
                os.kill(tid, signal.SIGKILL)

    # -- signals ----------------------------------------------------------------

    def _on_signals(self) -> None:
        self._take_signals()
        # The SIGCHLD just read was raised by the first stop waiting (if any): not counted.
        self._drain(reaped=-1)

    def _take_signals(self) -> None:
        for signo, code, _sender in linux.read_signals(self._signal_fd):
            if signo == signal.SIGCHLD:
                continue
            # A signal typed at the terminal (SI_KERNEL) reached the whole
            # foreground process group, the program included; one sent to
            # ktrace alone (kill) is passed on to the program.
            if code != SI_KERNEL and self.result.exit_code is None and self.result.signal is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.main_pid, signo)

    def _drain(self, reaped: int = 0) -> None:
        """Handle every stop waiting, then the ones that come within the spin.

        ``reaped`` counts the stops handled since the signalfd was last read: each may have
        left a SIGCHLD pending there, and a pending SIGCHLD is a wake-up of the event loop
        that finds nothing to do (tens of µs, on the program's path when it comes just before
        the relay's datagram, say; docs/performance.md). So before going back to the loop, the signalfd is read once
        more and waitpid asked again: a stop after that read raises a SIGCHLD of its own.
        """
        spin_until = 0.0
        while True:
            try:
                tid, status = os.waitpid(-1, os.WNOHANG | linux.WALL)
            except ChildProcessError:
                # No tracee is left at all (tracees count as children for waitpid): whatever
                # the bookkeeping says, the program is gone.
                self.threads.clear()
                self._maybe_finish()
                return
            if tid == 0:
                if spin_until != 0.0 and time.monotonic() <= spin_until:
                    continue
                if reaped <= 0 or self._signal_fd < 0:
                    return
                self._take_signals()
                reaped = 0
                spin_until = 0.0
                continue
            reaped += 1
            self._resumed_now = False
            with contextlib.suppress(TraceeGone):
                self._on_status(tid, status)
            spin_until = time.monotonic() + SPIN_SECONDS if self._resumed_now else 0.0

    # -- stops ------------------------------------------------------------------

    def _on_status(self, tid: int, status: int) -> None:
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            self._on_gone(tid, status)
            return
        if not os.WIFSTOPPED(status):
            return
        thread = self.threads.get(tid)
        if thread is None:
            # A new thread or child can report its first stop before its parent's
            # clone/fork event.
            thread = self.threads[tid] = _Thread(tid)
        sig = os.WSTOPSIG(status)
        event = (status >> 16) & 0xFF
        if event == kernel.PTRACE_EVENT_SECCOMP:
            self._on_seccomp(thread)
        elif sig == SYSCALL_EXIT_TRAP:
            self._on_syscall_exit(thread)
        elif event in (kernel.PTRACE_EVENT_FORK, kernel.PTRACE_EVENT_VFORK, kernel.PTRACE_EVENT_CLONE):
            child = kernel.event_message(tid)
            if child in self._gone_unknown:
                # The child ran and exited before its parent's event was read (a vfork child
                # that execs a short program): adding it now would wait for it forever.
                self._gone_unknown.discard(child)
            else:
                self.threads.setdefault(child, _Thread(child))
            kernel.cont(tid)
        elif event == kernel.PTRACE_EVENT_EXEC:
            former = kernel.event_message(tid)
            if former != tid:
                # exec from a non-leader thread: it now has the leader's id and
                # the old id vanishes without an exit report.
                self.threads.pop(former, None)
                self.handler.on_thread_exit(former)
            self.handler.on_exec(tid)
            self.threads_of.forget(tid)
            self.scratch.exec_happened(tid)
            kernel.cont(tid)
        elif event == kernel.PTRACE_EVENT_STOP:
            if sig in GROUP_STOP_SIGNALS:
                kernel.listen(tid)
            else:
                kernel.cont(tid)
        else:
            kernel.cont(tid, sig)

    def _on_gone(self, tid: int, status: int) -> None:
        thread = self.threads.pop(tid, None)
        if thread is None:
            self._gone_unknown.add(tid)
        if thread is not None and thread.parked is not None:
            thread.parked.cancel()
        self.handler.on_thread_exit(tid)
        self.threads_of.forget(tid)
        if tid == self.main_pid:
            if os.WIFEXITED(status):
                self.result.exit_code = os.WEXITSTATUS(status)
            else:
                self.result.signal = os.WTERMSIG(status)
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if not self.threads and self.finished is not None and not self.finished.done():
            self.finished.set_result(self.result)

    def _on_seccomp(self, thread: _Thread) -> None:
        regs = kernel.get_registers(thread.tid)
        name = self._names.get(regs.nr)
        if name is None:
            kernel.cont(thread.tid)  # a number the filter should not have sent: run it
            return
        tracee = PtraceTracee(thread.tid, self.threads_of, regs=regs, syscall=name, scratch=self.scratch)
        try:
            outcome = self.handler.on_syscall(tracee)
        except TraceeGone:
            raise
        except Exception:
            # A bug in a handler must not wedge the program: fail the syscall, never let a call
            # ktrace could not decide on leave the machine unseen, and report loudly.
            log.exception("syscall handler failed; the program's %s fails with EIO", name)
            outcome = Complete(-errno.EIO)
        self._apply(thread, regs, outcome)

    def _apply(self, thread: _Thread, regs: Registers, outcome: Outcome) -> None:
        tid = thread.tid
        self._resumed_now = not isinstance(outcome, Deferred)
        if isinstance(outcome, Resume):
            kernel.cont(tid)
        elif isinstance(outcome, Complete):
            # At a seccomp stop, nr = -1 skips the syscall and the value left in
            # the return register is what the program sees (seccomp(2)).
            regs.nr = -1
            regs.retval = outcome.retval
            kernel.set_registers(tid, regs)
            kernel.cont(tid)
            if outcome.then is not None:
                try:
                    outcome.then()
                except Exception:
                    log.exception("after-resume callback failed")
        elif isinstance(outcome, Rewrite):
            changed = regs.copy()
            for index, value in outcome.args:
                changed.set_arg(index, value)
            kernel.set_registers(tid, changed)
            if outcome.on_exit is not None:
                thread.on_exit = _exit_hook(outcome.on_exit)
                kernel.cont_to_exit(tid)
            else:
                kernel.cont(tid)
        elif isinstance(outcome, WatchExit):
            thread.on_exit = _exit_hook(outcome.on_exit)
            kernel.cont_to_exit(tid)
        elif isinstance(outcome, NeedScratch):
            injected, mapped = self.scratch.inject_map(tid, regs)
            kernel.set_registers(tid, injected)
            thread.on_exit = mapped
            kernel.cont_to_exit(tid)
        elif isinstance(outcome, InstallFd):
            # Handlers ask can_rewrite and never install descriptors under ptrace.
            os.close(outcome.fd)
            log.error("a handler asked to install a descriptor under ptrace; the call fails with ENOSYS")
            self._apply(thread, regs, Complete(-errno.ENOSYS))
        else:
            thread.parked = self.loop.create_task(self._park(thread, regs, outcome.outcome))

    async def _park(self, thread: _Thread, regs: Registers, pending: Awaitable[Resume | Complete | InstallFd]) -> None:
        try:
            outcome: Outcome = await pending
        except asyncio.CancelledError:
            raise
        except TraceeGone:
            return  # the program's thread vanished while its call waited: nothing to answer
        except Exception:
            log.exception("deferred syscall failed; returning EIO to the program")
            outcome = Complete(-errno.EIO)
        thread.parked = None
        if self.threads.get(thread.tid) is not thread:
            return
        with contextlib.suppress(TraceeGone):
            self._apply(thread, regs, outcome)

    def _on_syscall_exit(self, thread: _Thread) -> None:
        callback, thread.on_exit = thread.on_exit, None
        if callback is not None:
            regs = kernel.get_registers(thread.tid)
            try:
                callback(thread.tid, regs)
            except TraceeGone:
                raise
            except Exception:
                log.exception("syscall exit handler failed")
        kernel.cont(thread.tid)


def _exit_hook(on_exit: OnExit) -> _ExitHook:
    """A handler's exit callback (result and memory in, new result out) as the loop runs it."""

    def hook(tid: int, regs: Registers) -> None:
        replaced = on_exit(regs.retval, ThreadMemory(tid))
        if replaced is not None and replaced != regs.retval:
            regs.retval = replaced
            kernel.set_registers(tid, regs)

    return hook
