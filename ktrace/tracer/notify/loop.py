"""The notify backend's loop: every notification of the program's threads goes here.

It runs in ktrace's asyncio loop: the listener is readable when a notification is pending; it
is received, handed to the handler as a `NotifyTracee`, and answered at once, or, for a
`Deferred` outcome, when that resolves (the program's thread waits in the kernel meanwhile,
where a signal can interrupt it: the answer then finds the notification gone, and the kernel
restarts the call or fails it with EINTR). The guardian reports how the program ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
from dataclasses import dataclass, field

from ktrace.tracer import linux, syscalls
from ktrace.tracer.launcher import PendingChild
from ktrace.tracer.notify import kernel
from ktrace.tracer.notify.kernel import Notification, NotificationGone
from ktrace.tracer.notify.tracee import NotifyTracee
from ktrace.tracer.ptrace.loop import FORWARDED_SIGNALS, SI_KERNEL, TraceResult
from ktrace.tracer.threads import ThreadGroups
from ktrace.tracer.tracee import Complete, Deferred, InstallFd, Outcome, Resume, SyscallHandler, TraceeGone

log = logging.getLogger("ktrace.notify")


@dataclass
class Supervisor:
    handler: SyscallHandler
    child: PendingChild
    loop: asyncio.AbstractEventLoop
    threads_of: ThreadGroups = field(default_factory=ThreadGroups)
    result: TraceResult = field(default_factory=TraceResult)
    finished: asyncio.Future[TraceResult] | None = None
    _names: dict[int, str] = field(default_factory=dict)
    _signal_fd: int = -1
    _status: bytes = b""
    _pending: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def main_pid(self) -> int:
        return self.child.pid

    def start(self) -> None:
        """Start answering; the caller has already blocked the forwarded signals."""
        self.finished = self.loop.create_future()
        self._names = syscalls.names_by_number()
        self.loop.add_reader(self.child.listener, self._on_notification)
        self.loop.add_reader(self.child.status_fd, self._on_status)
        self._signal_fd = linux.signalfd(set(FORWARDED_SIGNALS))
        self.loop.add_reader(self._signal_fd, self._on_signals)

    def close(self) -> None:
        for fd in (self.child.listener, self.child.status_fd, self._signal_fd):
            if fd >= 0:
                self.loop.remove_reader(fd)
        if self._signal_fd >= 0:
            os.close(self._signal_fd)
            self._signal_fd = -1
        for task in self._pending:
            task.cancel()

    def kill_all(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self.child.control_fd, b"k")

    # -- the program's notifications --------------------------------------------------

    def _on_notification(self) -> None:
        note = kernel.receive(self.child.listener)
        if note is None:
            return
        name = self._names.get(note.nr)
        if name is None:
            self._answer(note, Resume())  # not one the table stops: cannot happen, never wedge it
            return
        tracee = NotifyTracee(note.pid, self.threads_of, syscall=name, args=note.args)
        try:
            outcome = self.handler.on_syscall(tracee)
        except TraceeGone:
            return  # killed while ktrace looked: nothing waits for the answer
        except Exception:
            log.exception("syscall handler failed; the program's %s fails with EIO", name)
            outcome = Complete(-errno.EIO)
        self._answer(note, outcome)

    def _answer(self, note: Notification, outcome: Outcome) -> None:
        listener = self.child.listener
        try:
            if isinstance(outcome, Resume):
                kernel.let_run(listener, note.id)
            elif isinstance(outcome, Complete):
                kernel.respond(listener, note.id, outcome.retval)
                if outcome.then is not None:
                    try:
                        outcome.then()
                    except Exception:
                        log.exception("after-answer callback failed")
            elif isinstance(outcome, InstallFd):
                try:
                    kernel.install_fd(listener, note.id, outcome.fd, outcome.cloexec)
                finally:
                    os.close(outcome.fd)
            elif isinstance(outcome, Deferred):
                task = self.loop.create_task(self._later(note, outcome))
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)
            else:
                # Rewrite, WatchExit, NeedScratch: handlers ask can_rewrite first.
                log.error("a handler asked for %s under the notify backend; the call fails with ENOSYS", outcome)
                kernel.respond(listener, note.id, -errno.ENOSYS)
        except NotificationGone:
            pass  # interrupted by a signal (restarted or EINTR) or killed: the answer is moot

    async def _later(self, note: Notification, deferred: Deferred) -> None:
        try:
            outcome: Outcome = await deferred.outcome
        except asyncio.CancelledError:
            raise
        except TraceeGone:
            return  # the program's thread vanished while its call waited: nothing to answer
        except Exception:
            log.exception("deferred syscall failed; returning EIO to the program")
            outcome = Complete(-errno.EIO)
        self._answer(note, outcome)

    # -- the guardian's reports, and signals ------------------------------------------

    def _on_status(self) -> None:
        try:
            data = os.read(self.child.status_fd, 4096)
        except OSError:
            data = b""
        self._status += data
        *lines, self._status = self._status.split(b"\n")
        done = not data  # the guardian is gone
        for line in lines:
            if line.startswith(b"exited "):
                status = int(line.split()[1])
                if os.WIFSIGNALED(status):
                    self.result.signal = os.WTERMSIG(status)
                else:
                    self.result.exit_code = os.WEXITSTATUS(status)
            elif line == b"done":
                done = True
        if done and self.finished is not None and not self.finished.done():
            self.loop.remove_reader(self.child.status_fd)
            self.finished.set_result(self.result)

    def _on_signals(self) -> None:
        for signo, code, _sender in linux.read_signals(self._signal_fd):
            # A signal typed at the terminal (SI_KERNEL) reached the whole foreground process
            # group, the program included; one sent to ktrace alone is passed on to the program.
            if code != SI_KERNEL and self.result.exit_code is None and self.result.signal is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.main_pid, signal.Signals(signo))
