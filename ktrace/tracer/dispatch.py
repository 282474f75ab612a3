"""The syscall handler of one `ktrace run`: each stop goes to the handler its row of
`syscalls.TABLE` names."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ktrace.tracer import syscalls
from ktrace.tracer.files import FileViews
from ktrace.tracer.network import NetworkHandler
from ktrace.tracer.threads import ThreadGroups
from ktrace.tracer.tracee import Outcome, Resume, Rewrite, Tracee

Handler = Callable[[Tracee], Outcome]


def handlers(network: NetworkHandler, files: FileViews) -> dict[str, Handler]:
    """Dispatch key (syscalls.Row.handler) -> handler."""
    return {
        "connect": network.on_connect,
        "names": network.on_names,
        "so_error": network.on_so_error,
        "send": network.on_send,
        "receive": network.on_receive,
        "open": files.on_open,
        "path": files.on_path,
        "clone": untraced_clone,
    }


def untraced_clone(t: Tracee) -> Outcome:
    """clone(CLONE_UNTRACED) under ptrace (the filter stops only that): the child is traced like
    any other, so it cannot outlive ktrace. Its flags are a register: rewritten, not raced."""
    if not t.can_rewrite:
        return Resume()
    return Rewrite(((0, t.arg(0) & ~syscalls.CLONE_UNTRACED),))


@dataclass
class SessionHandler:
    network: NetworkHandler
    files: FileViews
    # Shared with the handlers (one /proc read per thread for all of them).
    threads: ThreadGroups

    def __post_init__(self) -> None:
        table = handlers(self.network, self.files)
        self._by_syscall: Mapping[str, Handler] = {
            row.name: table[row.handler] for row in syscalls.TABLE if row.handler is not None
        }

    def on_syscall(self, tracee: Tracee) -> Outcome:
        handler = self._by_syscall.get(tracee.syscall)
        return handler(tracee) if handler is not None else Resume()

    def on_exec(self, tid: int) -> None:
        # exec from a non-leader thread gives it the leader's id: what was known of it is stale.
        self.threads.forget(tid)

    def on_thread_exit(self, tid: int) -> None:
        self.threads.forget(tid)
